"""MLflow tracking and registry: log a training run, register the best model as a
pyfunc with the alias ``challenger``, and the champion/challenger promotion gate."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.models import infer_signature

from hyperrec.settings import Settings
from hyperrec.tracking import configure
from training.bundle import load_bundle
from training.models import InteractionMatrix
from training.pyfunc import RecommenderPyfunc
from training.evaluation import relevant_items, score_model

CHAMPION, CHALLENGER = "champion", "challenger"


@dataclass
class Registration:
    run_id: str
    version: int
    model_uri: str


def log_and_register(
    settings: Settings,
    *,
    run_name: str,
    params: dict,
    metrics: dict[str, float],
    bundle_dir: Path,
    artifact_dirs: dict[str, Path],
    tags: dict[str, str],
) -> Registration:
    """Log one training run and register its model; the new version gets ``challenger``."""
    configure(settings)
    name = settings.mlflow.registered_model
    example = pd.DataFrame({"user_id": [str(u) for u in list(load_bundle(bundle_dir).history)[:2]], "k": [10, 10]})
    with mlflow.start_run(run_name=run_name, tags=tags) as run:
        mlflow.log_params(params)
        mlflow.log_metrics({k.replace("@", "_at_"): float(v) for k, v in metrics.items()})
        for artifact_path, directory in artifact_dirs.items():
            if directory.exists():
                mlflow.log_artifacts(str(directory), artifact_path=artifact_path)
        model = RecommenderPyfunc()
        output = model.recommend(load_bundle(bundle_dir), example)
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=model,
            artifacts={"bundle": str(bundle_dir)},
            signature=infer_signature(example, output),
            input_example=example,
            registered_model_name=name,
        )
    version = int(info.registered_model_version)
    client = MlflowClient()
    client.set_registered_model_alias(name, CHALLENGER, str(version))
    return Registration(run.info.run_id, version, f"models:/{name}/{version}")


def bundle_dir_of(settings: Settings, version: int | str, dest: Path) -> Path:
    """Download the serving bundle logged with a registered version into ``dest``."""
    configure(settings)
    uri = f"models:/{settings.mlflow.registered_model}/{version}"
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest)))
    flavor = mlflow.models.Model.load(str(local / "MLmodel")).flavors["python_function"]
    return local / flavor["artifacts"]["bundle"]["path"]


def champion_version(settings: Settings) -> int | None:
    configure(settings)
    try:
        return int(MlflowClient().get_model_version_by_alias(settings.mlflow.registered_model, CHAMPION).version)
    except mlflow.exceptions.MlflowException:
        return None


@dataclass
class GateDecision:
    promote: bool
    reason: str
    challenger_version: int
    champion_version: int | None
    challenger_ndcg: float
    champion_ndcg: float | None


def evaluate_bundle_on(bundle_dir: Path, train_df: pd.DataFrame, test_df: pd.DataFrame, k: int) -> dict[str, float]:
    """Score a registered model's bundle on another run's split (same holdout as the challenger)."""
    bundle = load_bundle(bundle_dir)
    train = InteractionMatrix.from_frame(train_df, item_ids=bundle.item_ids)
    return score_model(bundle.model, train, relevant_items(train, test_df), k)


def promotion_gate(
    settings: Settings,
    *,
    challenger_version: int,
    challenger_ndcg: float,
    train_df: pd.DataFrame,
    test_df: pd.DataFrame,
    workdir: Path,
) -> GateDecision:
    """Promote the challenger when no champion exists, or when its NDCG@k on this run's
    holdout is at least the champion's NDCG@k on the same holdout plus ``promotion.min_ndcg_gain``.

    The decision and its reason are written as tags on the challenger version.
    """
    k = settings.training.k
    workdir.mkdir(parents=True, exist_ok=True)
    current = champion_version(settings)
    if current is None:
        decision = GateDecision(True, "no champion yet", challenger_version, None, challenger_ndcg, None)
    elif current == challenger_version:
        decision = GateDecision(False, "challenger is already champion", challenger_version, current, challenger_ndcg, challenger_ndcg)
    else:
        champ = evaluate_bundle_on(bundle_dir_of(settings, current, workdir / f"champion-v{current}"), train_df, test_df, k)[f"ndcg@{k}"]
        margin = settings.promotion.min_ndcg_gain
        promote = challenger_ndcg >= champ + margin
        verb = "reaches" if promote else "falls short of"
        reason = f"challenger ndcg@{k}={challenger_ndcg:.4f} {verb} champion v{current} ndcg@{k}={champ:.4f} + margin {margin}"
        decision = GateDecision(promote, reason, challenger_version, current, challenger_ndcg, champ)
    client = MlflowClient()
    name = settings.mlflow.registered_model
    client.set_model_version_tag(name, str(challenger_version), "gate.decision", "promoted" if decision.promote else "rejected")
    client.set_model_version_tag(name, str(challenger_version), "gate.reason", decision.reason)
    if decision.promote:
        client.set_registered_model_alias(name, CHAMPION, str(challenger_version))
    (workdir / "gate.json").write_text(json.dumps(asdict(decision), indent=2))
    return decision
