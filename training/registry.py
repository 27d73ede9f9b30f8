"""MLflow tracking and registry: log a training run and register its model (the serving
tier's pyfunc over the bundle) with the alias ``challenger``; the champion/challenger
promotion gate, manual promotion, rollback and a listing of versions. Registration is
idempotent per pipeline run (:func:`log_and_register`); the champion history is a tag of the
registered model (:data:`STACK_TAG`).

Every change of the champion (gate, manual promotion, rollback) holds :func:`registry_lock`
(MLflow has no compare-and-set): an exclusive file lock under ``<home>/locks`` serializes
the processes of one host; after writing, the alias and the history are read back and the
change is applied again on top of whatever another writer left (a writer on another
host), so no promotion is lost from the history.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric, ViewType
from mlflow.models import infer_signature

from core.errors import UserError
from core.files import exclusive_lock, write_text_atomic
from core.settings import Settings
from core.tracking import configure
from training.bundle import load_bundle
from training.evaluation import recommend_ids, relevant_items
from training.metrics import catalog_coverage, evaluate, evaluate_by_segment
from training.models import InteractionMatrix
from training.pyfunc import RecommenderPyfunc, recommendations_frame

CHAMPION, CHALLENGER = "champion", "challenger"
WEIGHT_COLUMN = "confidence"
STACK_TAG = "promotion.champion_stack"
"""Registered-model tag: the JSON list of champion versions, oldest first; a promotion pushes,
a rollback pops. Each promoted version records ``promotion.previous_champion``,
``promotion.by`` (gate, manual), ``promotion.user``, ``promotion.reason`` and ``promotion.at``."""
STACK_LIMIT = 200  # champion versions kept in the history tag (a registered-model tag holds 5000 chars)


class RegistryError(UserError, RuntimeError):
    """A registry operation that cannot be done as asked (unknown version, nothing to roll back to)."""


LOCK_TIMEOUT_S = 300.0  # longest wait for another champion change to finish
WRITE_ATTEMPTS = 5  # a champion change re-applied this often when another writer interleaved


def lock_path(settings: Settings) -> Path:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", settings.mlflow.registered_model)
    return settings.home / "locks" / f"registry-{name}.lock"


@contextlib.contextmanager
def registry_lock(settings: Settings, timeout_s: float = LOCK_TIMEOUT_S):
    """Hold the exclusive lock on champion changes of the registered model (an ``flock`` on
    :func:`lock_path`, released when the holder exits, even by SIGKILL); raise
    :class:`RegistryError` after ``timeout_s`` seconds of waiting."""
    path = lock_path(settings)
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(exclusive_lock(path, timeout_s))
        except TimeoutError as exc:
            raise RegistryError(
                f"{path}: another champion change ({exc}) still holds the registry lock after {timeout_s:.0f} s"
            ) from None
        yield


@dataclass
class Registration:
    run_id: str
    version: int
    model_uri: str
    reused: bool = False  # True when a retried register found this pipeline run's version already there


# --------------------------------------------------------------------------- registration

RUN_DIR_TAG = "hyperrec.run_dir"
DIGEST_TAG = "hyperrec.bundle_digest"
ABANDONED_TAG = "hyperrec.abandoned"
PENDING = "pending"
DESCRIPTION_LIMIT = 5000  # model version descriptions are VARCHAR(5000) in MLflow's SQL stores
GATE_HEADING = "## Promotion gate"
TRAINING_HEADING = "## Training run"
PENDING_SECTION = (
    f"{GATE_HEADING}: {PENDING}\n\nThis version is the **challenger**: the promotion gate "
    "(the `promote` task) has not compared it with the champion yet."
)
METRIC_BATCH = 1000  # metrics per log_batch call (MLflow's limit)


def bundle_digest(bundle_dir: Path) -> str:
    """SHA-256 of the bundle's ``metadata.json`` (written last by every fit, with its
    creation time): a retried ``register`` sees the same digest, a retrained model a new one."""
    return hashlib.sha256((Path(bundle_dir) / "metadata.json").read_bytes()).hexdigest()


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub-flavoured markdown table (the MLflow UI renders descriptions as markdown);
    ``align`` is one of l/r per column (default: first column left, the others right)."""

    def cell(value: Any) -> str:
        if value is None:
            return "–"
        if isinstance(value, float):
            return f"{value:.4f}"
        return str(value).replace("|", "\\|").replace("\n", " ")

    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _fit_description(text: str) -> str:
    if len(text) <= DESCRIPTION_LIMIT:
        return text
    note = "\n\n… (cut to fit; the run's artifacts hold the full tables)"
    return text[: DESCRIPTION_LIMIT - len(note)].rstrip() + note


def training_section(description: str | None) -> str:
    """The ``## Training run`` part of a version description (empty when there is none)."""
    if not description:
        return ""
    at = description.find(TRAINING_HEADING)
    return description[at:] if at >= 0 else ""


def _artifact_paths(value: Path | Sequence[Path]) -> list[Path]:
    return [Path(value)] if isinstance(value, (str, Path)) else [Path(v) for v in value]


def _experiment_id(client: MlflowClient, settings: Settings) -> str:
    return client.get_experiment_by_name(settings.mlflow.experiment).experiment_id


def _runs_of(client: MlflowClient, settings: Settings, run_dir: str) -> list:
    """Active MLflow runs tagged ``hyperrec.run_dir = run_dir``."""
    experiment = _experiment_id(client, settings)
    if "'" not in run_dir:
        found = client.search_runs(
            [experiment],
            filter_string=f"tags.`{RUN_DIR_TAG}` = '{run_dir}'",
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=1000,
        )
    else:  # a quote the filter syntax cannot hold: filter here
        found = client.search_runs(
            [experiment],
            filter_string=f"tags.`{RUN_DIR_TAG}` != ''",
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=50000,
        )
    return [r for r in found if r.data.tags.get(RUN_DIR_TAG) == run_dir]


def _versions_of_run(client: MlflowClient, name: str, run_id: str) -> list:
    # No error is swallowed here: a failed lookup must not make a registered attempt look abandoned.
    return list(client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"))


def _abandon(client: MlflowClient, run, name: str, why: str) -> None:
    """Retire a register attempt that never got a READY version: remove its non-READY
    versions and logged models, tag it, mark it FAILED and delete it (soft delete: it leaves
    the UI and every lookup, ``mlflow gc`` purges it)."""
    run_id = run.info.run_id
    for mv in _versions_of_run(client, name, run_id):
        if mv.status != "READY":
            client.delete_model_version(name, mv.version)
    for output in (run.outputs.model_outputs if run.outputs else None) or []:
        with contextlib.suppress(mlflow.exceptions.MlflowException):
            client.delete_logged_model(output.model_id)
    client.set_tag(run_id, ABANDONED_TAG, why)
    if run.info.status in ("RUNNING", "SCHEDULED"):
        client.set_terminated(run_id, "FAILED")
    client.delete_run(run_id)


def _find_registration(client: MlflowClient, settings: Settings, name: str, run_dir: str, digest: str):
    """The READY version an earlier attempt registered for this pipeline run and bundle, as
    ``(run, version)``, or None; every other attempt for that pair that has no READY version
    (it died before registering) is abandoned. Runs of the same run directory with another
    digest (a retrained model) are left alone."""
    found, stale = None, []
    for run in _runs_of(client, settings, run_dir):
        if run.data.tags.get(DIGEST_TAG) != digest:
            continue
        ready = [mv for mv in _versions_of_run(client, name, run.info.run_id) if mv.status == "READY"]
        if ready:
            best = max(ready, key=lambda mv: int(mv.version))
            if found is None or int(best.version) > int(found[1].version):
                found = (run, best)
        else:
            stale.append(run)
    for run in stale:
        _abandon(
            client,
            run,
            name,
            f"a retried register of {run_dir} replaced this attempt, which died "
            "before its model version was registered",
        )
    return found


def _set_challenger(client: MlflowClient, name: str, version: int) -> None:
    """``challenger`` → ``version``, unless a newer version already holds it (a retry of an
    old run must not take the alias back)."""
    try:
        current = int(client.get_model_version_by_alias(name, CHALLENGER).version)
    except mlflow.exceptions.MlflowException:
        current = None
    if current is None or current <= int(version):
        client.set_registered_model_alias(name, CHALLENGER, str(version))


def _log_step_metrics(client: MlflowClient, run_id: str, step_metrics: Mapping[str, Sequence[float]]) -> None:
    now = int(datetime.now(UTC).timestamp() * 1000)
    rows = [Metric(key, float(v), now, step) for key, values in step_metrics.items() for step, v in enumerate(values)]
    for start in range(0, len(rows), METRIC_BATCH):
        client.log_batch(run_id, metrics=rows[start : start + METRIC_BATCH])


def log_and_register(
    settings: Settings,
    *,
    run_name: str,
    params: dict,
    metrics: dict[str, float],
    bundle_dir: Path,
    artifact_dirs: Mapping[str, Path | Sequence[Path]],
    tags: dict[str, str],
    python_model: RecommenderPyfunc,
    description: str = "",
    step_metrics: Mapping[str, Sequence[float]] | None = None,
) -> Registration:
    """Log one training run and register its model, ``python_model`` (the serving tier's
    :class:`training.pyfunc.RecommenderPyfunc`) over ``bundle_dir``; the new version gets
    ``challenger``.

    ``artifact_dirs`` maps an artifact path to a directory or file, or a list of them
    (missing ones are skipped). ``tags`` go on the run and on the version, with
    ``gate.decision=pending`` on the version; ``description`` (markdown, the
    ``## Training run`` section) becomes the version description under a "challenger,
    awaiting the promotion gate" section that :func:`promotion_gate` replaces.
    ``step_metrics`` (name → value per step, e.g. loss per epoch) are logged with steps.

    Idempotent per pipeline run: with a ``hyperrec.run_dir`` tag, an earlier attempt's
    READY version for the same run directory and bundle (:func:`bundle_digest`) is
    returned (``reused=True``) after making sure of its alias, tags and finished run; an
    attempt that died before registering is abandoned (:func:`_abandon`) and replaced. So a
    retried ``register`` task leaves exactly one version for its pipeline run.
    """
    client = configure(settings)
    name = settings.mlflow.registered_model
    tags = {**tags, DIGEST_TAG: bundle_digest(bundle_dir)}
    run_dir = tags.get(RUN_DIR_TAG)
    found = _find_registration(client, settings, name, run_dir, tags[DIGEST_TAG]) if run_dir else None
    if found is not None:
        run, mv = found
        if run.info.status in ("RUNNING", "SCHEDULED"):  # the attempt died after registering
            client.set_terminated(run.info.run_id, "FINISHED")
        for key, value in tags.items():
            if mv.tags.get(key) != value:
                client.set_model_version_tag(name, mv.version, key, value)
        if "gate.decision" not in mv.tags:
            client.set_model_version_tag(name, mv.version, "gate.decision", PENDING)
        if not mv.description:
            client.update_model_version(name, mv.version, description=_registration_description(description))
        _set_challenger(client, name, int(mv.version))
        return Registration(run.info.run_id, int(mv.version), f"models:/{name}/{mv.version}", reused=True)

    bundle = load_bundle(bundle_dir)
    example = pd.DataFrame({"user_id": [str(u) for u in list(bundle.history)[:2]], "k": [10, 10]})
    note = _fit_description(_training_text(description)) if description.strip() else ""  # the run's description
    with mlflow.start_run(run_name=run_name, tags={**tags, **({"mlflow.note.content": note} if note else {})}) as run:
        run_id = run.info.run_id
        mlflow.log_params(params)
        mlflow.log_metrics({k.replace("@", "_at_"): float(v) for k, v in metrics.items()})
        if step_metrics:
            _log_step_metrics(client, run_id, step_metrics)
        for artifact_path, value in artifact_dirs.items():
            for path in _artifact_paths(value):
                if path.is_dir():
                    mlflow.log_artifacts(str(path), artifact_path=artifact_path)
                elif path.is_file():
                    mlflow.log_artifact(str(path), artifact_path=artifact_path)
        output = recommendations_frame(python_model.open(Path(bundle_dir)), example)
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=python_model,
            artifacts={"bundle": str(bundle_dir)},
            signature=infer_signature(example, output),
            input_example=example,
        )
        _ensure_registered_model(client, name)
        # One call: the version is born with its tags and description, so a crash can
        # never leave a version without the run-directory tag.
        mv = client.create_model_version(
            name,
            source=info.model_uri,
            run_id=run_id,
            model_id=info.model_id,
            tags={**tags, "gate.decision": PENDING},
            description=_registration_description(description),
        )
    version = int(mv.version)
    _set_challenger(client, name, version)
    return Registration(run_id, version, f"models:/{name}/{version}")


def _training_text(description: str) -> str:
    text = description.strip()
    if not text:
        return ""
    return text if text.startswith(TRAINING_HEADING) else f"{TRAINING_HEADING}\n\n{text}"


def _registration_description(description: str) -> str:
    body = _training_text(description)
    return _fit_description(f"{PENDING_SECTION}\n\n{body}" if body else PENDING_SECTION)


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        try:
            client.create_registered_model(name)
        except mlflow.exceptions.MlflowException:  # created meanwhile by another process
            client.get_registered_model(name)


def bundle_dir_of(settings: Settings, version: int | str, dest: Path) -> Path:
    """Download the serving bundle logged with a registered version into ``dest``."""
    configure(settings)
    uri = f"models:/{settings.mlflow.registered_model}/{version}"
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest)))
    flavor = mlflow.models.Model.load(str(local / "MLmodel")).flavors["python_function"]
    return local / flavor["artifacts"]["bundle"]["path"]


def champion_version(settings: Settings) -> int | None:
    """The version holding the ``champion`` alias, or None when there is none."""
    configure(settings)
    try:
        return int(MlflowClient().get_model_version_by_alias(settings.mlflow.registered_model, CHAMPION).version)
    except mlflow.exceptions.MlflowException:
        return None


def challenger_version(settings: Settings) -> int | None:
    """The version holding the ``challenger`` alias, or None when there is none."""
    configure(settings)
    try:
        return int(MlflowClient().get_model_version_by_alias(settings.mlflow.registered_model, CHALLENGER).version)
    except mlflow.exceptions.MlflowException:
        return None


def champion_artifact_json(settings: Settings, artifact_path: str) -> tuple[int, Any] | None:
    """The champion's version and the JSON artifact ``artifact_path`` of its source run (None
    when that run has no readable one); None when there is no champion."""
    client = configure(settings)
    try:
        mv = client.get_model_version_by_alias(settings.mlflow.registered_model, CHAMPION)
    except mlflow.exceptions.MlflowException:
        return None
    try:
        return int(mv.version), json.loads(mlflow.artifacts.load_text(f"runs:/{mv.run_id}/{artifact_path}"))
    except (mlflow.exceptions.MlflowException, OSError, ValueError):
        return int(mv.version), None


# --------------------------------------------------------------------------- holdout scoring


def segment_ndcg(
    recommendations: Mapping[Any, list], relevant: Mapping[Any, set], segments: Mapping[str, str], k: int
) -> dict[str, float]:
    """Mean NDCG@k per segment over the users with ≥1 relevant item; ``segments`` maps
    ``str(user_id)`` → segment, and users it does not assign are left out."""
    by_user = {user: segments[str(user)] for user in relevant if str(user) in segments}
    per = evaluate_by_segment(recommendations, relevant, by_user, k)["segments"]
    return {str(segment): m[f"ndcg@{k}"] for segment, m in per.items()}


def segment_gap(per_segment: Mapping[str, float]) -> float:
    """Fairness gap: best minus worst per-segment NDCG@k; 0.0 with fewer than two segments."""
    values = list(per_segment.values())
    return float(max(values) - min(values)) if len(values) >= 2 else 0.0


def evaluate_bundle_on(
    bundle_dir: Path,
    train_df: pd.DataFrame,
    test_df: pd.DataFrame,
    k: int,
    segments: Mapping[Any, Any] | None = None,
) -> dict[str, Any]:
    """Score a bundle on a holdout (e.g. the champion on the challenger's split): the
    :func:`training.metrics.evaluate` metrics, ``coverage@k`` and, with ``segments``
    (user_id → segment), ``segment_ndcg`` (segment → NDCG@k) and ``segment_gap``."""
    bundle = load_bundle(bundle_dir)
    # The same weighted history the pipeline trains and serves with.
    weight_col = WEIGHT_COLUMN if WEIGHT_COLUMN in train_df.columns else None
    train = InteractionMatrix.from_frame(train_df, item_ids=bundle.item_ids, weight_col=weight_col)
    relevant = relevant_items(train, test_df)
    recs = recommend_ids(bundle.model, train, list(relevant), k) if relevant else {}
    metrics: dict[str, Any] = evaluate(recs, relevant, k)
    metrics[f"coverage@{k}"] = catalog_coverage(recs, len(train.item_ids), k)
    if segments is not None:
        per = segment_ndcg(recs, relevant, {str(u): str(s) for u, s in segments.items()}, k)
        metrics["segment_ndcg"], metrics["segment_gap"] = per, segment_gap(per)
    return metrics


# --------------------------------------------------------------------------- promotion gate


@dataclass
class GateCheck:
    """One gate comparison; ``passed`` is None when the check was skipped."""

    name: str
    metric: str
    challenger: float | None
    champion: float | None
    limit: float
    passed: bool | None
    detail: str


@dataclass
class GateDecision:
    promote: bool
    reason: str
    challenger_version: int
    champion_version: int | None
    challenger_ndcg: float
    champion_ndcg: float | None
    checks: list[GateCheck] = field(default_factory=list)


def _verdict(passed: bool | None) -> str:
    return "skipped" if passed is None else ("pass" if passed else "FAIL")


def gate_checks(
    settings: Settings, challenger: Mapping[str, Any], champion: Mapping[str, Any], *, fairness: bool
) -> list[GateCheck]:
    """The three gate checks of a challenger against the champion, both scored on the same holdout.

    - ndcg: challenger NDCG@k ≥ champion NDCG@k + ``promotion.min_ndcg_gain``;
    - coverage: champion coverage@k − challenger coverage@k ≤ ``promotion.max_coverage_drop``;
    - fairness: challenger segment gap − champion segment gap ≤ ``promotion.max_fairness_gap_increase``
      (skipped unless ``fairness``).
    """
    k, cfg = settings.training.k, settings.promotion
    eps = 1e-12  # float noise must not flip an exact tie at the limit
    c, h = float(challenger[f"ndcg@{k}"]), float(champion[f"ndcg@{k}"])
    ok = c - h >= cfg.min_ndcg_gain - eps
    checks = [
        GateCheck(
            "ndcg",
            f"ndcg@{k}",
            c,
            h,
            cfg.min_ndcg_gain,
            ok,
            f"ndcg@{k} {c:.4f} vs champion {h:.4f}: gain {c - h:+.4f} "
            f"{'>=' if ok else '<'} required {cfg.min_ndcg_gain:+.4f} -> {_verdict(ok)}",
        )
    ]
    c, h = float(challenger[f"coverage@{k}"]), float(champion[f"coverage@{k}"])
    ok = h - c <= cfg.max_coverage_drop + eps
    checks.append(
        GateCheck(
            "coverage",
            f"coverage@{k}",
            c,
            h,
            cfg.max_coverage_drop,
            ok,
            f"coverage@{k} {c:.4f} vs champion {h:.4f}: drop {h - c:+.4f} "
            f"{'<=' if ok else '>'} allowed {cfg.max_coverage_drop:.4f} -> {_verdict(ok)}",
        )
    )
    metric = f"segment_gap(ndcg@{k})"
    if fairness:
        c, h = float(challenger["segment_gap"]), float(champion["segment_gap"])
        ok = c - h <= cfg.max_fairness_gap_increase + eps
        checks.append(
            GateCheck(
                "fairness",
                metric,
                c,
                h,
                cfg.max_fairness_gap_increase,
                ok,
                f"segment ndcg@{k} gap (best-worst) {c:.4f} vs champion {h:.4f}: increase {c - h:+.4f} "
                f"{'<=' if ok else '>'} allowed {cfg.max_fairness_gap_increase:.4f} -> {_verdict(ok)}",
            )
        )
    else:
        checks.append(
            GateCheck(
                "fairness",
                metric,
                None,
                None,
                cfg.max_fairness_gap_increase,
                None,
                "segment ndcg gap: no user segments given -> skipped",
            )
        )
    return checks


def promotion_gate(
    settings: Settings,
    *,
    challenger_version: int,
    challenger_ndcg: float,
    train_df: pd.DataFrame,
    test_df: pd.DataFrame,
    workdir: Path,
    challenger_metrics: Mapping[str, Any] | None = None,
    segments: Mapping[Any, Any] | None = None,
) -> GateDecision:
    """Promote the challenger to ``champion`` when no champion exists, or when every
    :func:`gate_checks` check passes against the champion scored on this run's holdout.

    ``challenger_metrics`` must hold ``coverage@k`` and may hold ``segment_gap``; what it
    lacks is scored from the challenger's registered bundle on the same holdout.
    ``segments`` (user_id → segment) enables the fairness check. The decision, the reason
    (every check with its numbers) and ``gate.checks`` (JSON) are written as tags on the
    challenger version, the reason also as its description, and ``workdir/gate.json``.
    Re-running the gate on a version that is already champion changes nothing. The gate
    holds :func:`registry_lock` from reading the champion to moving the alias, so it never
    decides against a champion that another promotion has just replaced.
    """
    with registry_lock(settings):
        return _promotion_gate(
            settings,
            challenger_version=challenger_version,
            challenger_ndcg=challenger_ndcg,
            train_df=train_df,
            test_df=test_df,
            workdir=workdir,
            challenger_metrics=challenger_metrics,
            segments=segments,
        )


def _promotion_gate(
    settings: Settings,
    *,
    challenger_version: int,
    challenger_ndcg: float,
    train_df: pd.DataFrame,
    test_df: pd.DataFrame,
    workdir: Path,
    challenger_metrics: Mapping[str, Any] | None,
    segments: Mapping[Any, Any] | None,
) -> GateDecision:
    k = settings.training.k
    if challenger_metrics is not None and f"coverage@{k}" not in challenger_metrics:
        raise ValueError(
            f"challenger_metrics of v{challenger_version} must include 'coverage@{k}' "
            f"(got {sorted(challenger_metrics)})"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    client, name = configure(settings), settings.mlflow.registered_model
    current = champion_version(settings)
    if current == challenger_version:
        tags = client.get_model_version(name, str(challenger_version)).tags
        previous = tags.get("gate.reason", "set outside the gate")
        if tags.get("gate.decision") == "promoted" and "promotion.at" not in tags:
            # A retry after a crash inside the move: the alias moved, the record did not.
            _record_promotion(
                client,
                name,
                challenger_version,
                champion_history(client, name),
                by="gate",
                reason=previous,
                user=_user(None),
            )
        decision = GateDecision(
            True,
            f"v{current} is already the champion ({previous})",
            challenger_version,
            current,
            challenger_ndcg,
            challenger_ndcg,
        )
        write_text_atomic(workdir / "gate.json", json.dumps(asdict(decision), indent=2))
        return decision
    if current is None:
        decision = GateDecision(
            True,
            f"no champion yet: v{challenger_version} becomes the first champion",
            challenger_version,
            None,
            challenger_ndcg,
            None,
        )
    else:
        need_scoring = challenger_metrics is None or (segments is not None and "segment_gap" not in challenger_metrics)
        challenger: dict[str, Any] = {}
        if need_scoring:
            own = bundle_dir_of(settings, challenger_version, workdir / f"challenger-v{challenger_version}")
            challenger = evaluate_bundle_on(own, train_df, test_df, k, segments)
        challenger.update(challenger_metrics or {})
        challenger[f"ndcg@{k}"] = challenger_ndcg
        champ_dir = bundle_dir_of(settings, current, workdir / f"champion-v{current}")
        champion = evaluate_bundle_on(champ_dir, train_df, test_df, k, segments)
        checks = gate_checks(settings, challenger, champion, fairness=segments is not None)
        failed = [c.name for c in checks if c.passed is False]
        details = "; ".join(c.detail for c in checks)
        head = (
            f"promoted over champion v{current}"
            if not failed
            else f"rejected against champion v{current} (failed: {', '.join(failed)})"
        )
        decision = GateDecision(
            not failed,
            f"{head}: {details}",
            challenger_version,
            current,
            challenger_ndcg,
            float(champion[f"ndcg@{k}"]),
            checks,
        )
    version = str(challenger_version)
    decided = "promoted" if decision.promote else "rejected"
    at = _now()
    client.set_model_version_tag(name, version, "gate.decision", decided)
    client.set_model_version_tag(name, version, "gate.reason", decision.reason)
    client.set_model_version_tag(name, version, "gate.checks", json.dumps([asdict(c) for c in decision.checks]))
    client.set_model_version_tag(name, version, "gate.champion", "none" if current is None else str(current))
    client.set_model_version_tag(name, version, "gate.at", at)
    existing = client.get_model_version(name, version).description
    section = gate_markdown(decision, k, at)
    body = training_section(existing)
    client.update_model_version(
        name, version, description=_fit_description(f"{section}\n\n{body}" if body else section)
    )
    if decision.promote:
        _move_champion(client, name, challenger_version, by="gate", reason=decision.reason, user=_user(None))
    write_text_atomic(workdir / "gate.json", json.dumps(asdict(decision), indent=2))
    return decision


_LIMITS = {"ndcg": "gain ≥ {:+.4f}", "coverage": "drop ≤ {:.4f}", "fairness": "increase ≤ {:.4f}"}


def gate_markdown(decision: GateDecision, k: int, at: str) -> str:
    """The ``## Promotion gate`` section of a version description: the decision, every
    check with both numbers, the change and the limit, and the full reason."""
    decided = "promoted" if decision.promote else "rejected"
    head = decision.reason.split(": ", 1)[0]
    lines = [f"{GATE_HEADING}: {decided}", "", f"**{head}** (decided {at})."]
    if decision.checks:
        rows = []
        for c in decision.checks:
            change = None if c.challenger is None or c.champion is None else f"{c.challenger - c.champion:+.4f}"
            rows.append(
                [
                    c.name,
                    f"`{c.metric}`",
                    c.challenger,
                    c.champion,
                    change,
                    _LIMITS.get(c.name, "{}").format(c.limit),
                    _verdict(c.passed),
                ]
            )
        lines += [
            "",
            f"Challenger v{decision.challenger_version} and champion v{decision.champion_version} "
            "scored on this run's held-out split:",
            "",
            markdown_table(["check", "metric", "challenger", "champion", "change", "limit", "result"], rows, "llrrrll"),
        ]
    elif decision.champion_version is None:
        lines += ["", f"NDCG@{k} {decision.challenger_ndcg:.4f}; there was no champion to compare with."]
    lines += ["", f"Reason: {decision.reason}"]
    return "\n".join(lines)


# --------------------------------------------------------------------------- manual promotion and rollback


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _user(user: str | None) -> str:
    if user:
        return user
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _registered_model(client: MlflowClient, name: str):
    try:
        return client.get_registered_model(name)
    except mlflow.exceptions.MlflowException as exc:
        raise RegistryError(
            f"registered model {name!r} not found at {mlflow.get_tracking_uri()}: nothing has been registered yet"
        ) from exc


def _model_version(client: MlflowClient, name: str, version: int):
    try:
        mv = client.get_model_version(name, str(version))
    except mlflow.exceptions.MlflowException as exc:
        raise RegistryError(f"registered model {name!r} has no version {version}") from exc
    if mv.status != "READY":
        raise RegistryError(f"version {version} of {name!r} is {mv.status}, not READY")
    return mv


def champion_history(client: MlflowClient, name: str) -> list[int]:
    """Champion versions, oldest first, the current champion last (from :data:`STACK_TAG`).

    A champion alias moved outside hyperrec (e.g. in the MLflow UI) is appended."""
    model = _registered_model(client, name)
    raw = model.tags.get(STACK_TAG)
    stack = [int(v) for v in json.loads(raw)] if raw else []
    current = model.aliases.get(CHAMPION)
    if current is not None and (not stack or stack[-1] != int(current)):
        stack.append(int(current))
    return stack


def _written(client: MlflowClient, name: str, champion: int, stack: list[int]) -> bool:
    """Whether the registry holds ``champion`` as the alias and ``stack`` as the history."""
    model = _registered_model(client, name)
    raw = model.tags.get(STACK_TAG)
    alias = model.aliases.get(CHAMPION)
    return alias is not None and int(alias) == int(champion) and raw == json.dumps(stack[-STACK_LIMIT:])


def _move_champion(client: MlflowClient, name: str, version: int, *, by: str, reason: str, user: str) -> dict:
    """Point ``champion`` at ``version``, push it on the history and tag who, why and what it
    replaced. Call under :func:`registry_lock`; the write is read back and applied again on
    the history another writer left when it was overwritten (at most :data:`WRITE_ATTEMPTS`)."""
    for _ in range(WRITE_ATTEMPTS):
        stack = [*champion_history(client, name), int(version)]
        client.set_registered_model_alias(name, CHAMPION, str(version))
        client.set_registered_model_tag(name, STACK_TAG, json.dumps(stack[-STACK_LIMIT:]))
        if _written(client, name, int(version), stack):
            return _record_promotion(client, name, version, stack, by=by, reason=reason, user=user)
        time.sleep(0.1)
    raise RegistryError(f"v{version} of {name!r}: the champion kept changing under this promotion; try again")


def _record_promotion(
    client: MlflowClient, name: str, version: int, stack: list[int], *, by: str, reason: str, user: str
) -> dict:
    """Store ``stack`` (champion history ending with ``version``, the new champion) and tag
    ``version`` with the ``promotion.*`` record."""
    previous = stack[-2] if len(stack) >= 2 else None
    client.set_registered_model_tag(name, STACK_TAG, json.dumps(stack[-STACK_LIMIT:]))
    record = {
        "version": int(version),
        "previous_champion": previous,
        "by": by,
        "user": user,
        "reason": reason,
        "at": _now(),
    }
    tags = {
        "promotion.previous_champion": "none" if previous is None else str(previous),
        "promotion.by": by,
        "promotion.user": user,
        "promotion.reason": reason,
        "promotion.at": record["at"],
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, value)
    return record


def promote_version(
    settings: Settings, version: int, reason: str = "", *, user: str | None = None, by: str = "manual"
) -> dict:
    """Make ``version`` the champion by hand (after review in the MLflow UI), or on an online
    experiment's evidence (``by="experiment"``, :mod:`serving.experiment_report`).

    Tags the version ``gate.decision=<by>``, ``gate.reason`` (who and why; an earlier
    automatic decision is kept in ``gate.auto_decision``) and the ``promotion.*`` record.
    Returns that record: version, previous_champion, by, user, reason, at.
    """
    with registry_lock(settings):
        return _promote_version(settings, version, reason, user=user, by=by)


def _promote_version(settings: Settings, version: int, reason: str, *, user: str | None, by: str = "manual") -> dict:
    client, name = configure(settings), settings.mlflow.registered_model
    _registered_model(client, name)
    mv = _model_version(client, name, version)
    current = champion_version(settings)
    if current == int(version):
        raise RegistryError(f"version {version} of {name!r} is already the champion")
    user, reason = _user(user), reason.strip() or "no reason given"
    automatic = mv.tags.get("gate.decision")
    if automatic and automatic not in ("manual", "experiment", PENDING):
        client.set_model_version_tag(name, str(version), "gate.auto_decision", automatic)
    client.set_model_version_tag(name, str(version), "gate.decision", by)
    client.set_model_version_tag(name, str(version), "gate.reason", f"{by} promotion by {user}: {reason}")
    record = _move_champion(client, name, int(version), by=by, reason=reason, user=user)
    previous = "none" if record["previous_champion"] is None else f"v{record['previous_champion']}"
    heading = "Promoted by hand" if by == "manual" else f"Promoted by {by}"
    _prepend_note(
        client,
        name,
        int(version),
        f"## {heading}\n\n**{user}** made this version the champion (was {previous}) at {record['at']}: {reason}",
    )
    return record


def _prepend_note(client: MlflowClient, name: str, version: int, note: str) -> None:
    """Put a markdown section above the version's description (the latest event first)."""
    existing = client.get_model_version(name, str(version)).description or ""
    client.update_model_version(
        name, str(version), description=_fit_description(f"{note}\n\n{existing}" if existing else note)
    )


def rollback(settings: Settings, to: int | None = None, *, reason: str = "", user: str | None = None) -> dict:
    """Move ``champion`` back to the previous champion, or to ``to``, an earlier champion.

    The versions after the target are popped from the history, so repeated rollbacks walk
    further back. Tags the replaced version ``rollback.*`` and the restored one
    ``rollback.restored_from``. Returns version, rolled_back_from, user, reason, at, history.
    """
    with registry_lock(settings):
        return _rollback(settings, to, reason=reason, user=user)


def _rollback(settings: Settings, to: int | None, *, reason: str, user: str | None) -> dict:
    client, name = configure(settings), settings.mlflow.registered_model
    stack = champion_history(client, name)
    if not stack:
        raise RegistryError(f"registered model {name!r} has no champion: nothing to roll back")
    current, earlier = stack[-1], stack[:-1]
    if to is None:
        if not earlier:
            raise RegistryError(
                f"nothing to roll back to: v{current} is the first champion of {name!r} "
                f"(no earlier champion in its promotion history)"
            )
        target = earlier[-1]
    elif int(to) == current:
        raise RegistryError(f"version {to} of {name!r} is already the champion")
    elif int(to) not in earlier:
        raise RegistryError(
            f"version {to} of {name!r} was never champion before v{current} (earlier champions: "
            f"{earlier or 'none'}); use `hyperrec model promote {to}` to promote it"
        )
    else:
        target = int(to)
    _model_version(client, name, target)
    while stack[-1] != target:
        stack.pop()
    client.set_registered_model_alias(name, CHAMPION, str(target))
    client.set_registered_model_tag(name, STACK_TAG, json.dumps(stack))
    if not _written(client, name, target, stack):
        raise RegistryError(f"{name!r}: the champion changed during the rollback to v{target}; check and try again")
    user, reason, at = _user(user), reason.strip() or "no reason given", _now()
    for key, value in {
        "rollback.replaced_by": str(target),
        "rollback.user": user,
        "rollback.reason": reason,
        "rollback.at": at,
    }.items():
        client.set_model_version_tag(name, str(current), key, value)
    client.set_model_version_tag(name, str(target), "rollback.restored_from", str(current))
    client.set_model_version_tag(name, str(target), "rollback.restored_at", at)
    _prepend_note(
        client, name, current, f"## Rolled back\n\n**{user}** replaced this champion with v{target} at {at}: {reason}"
    )
    return {"version": target, "rolled_back_from": current, "user": user, "reason": reason, "at": at, "history": stack}


def list_versions(settings: Settings) -> list[dict]:
    """Every version of the registered model, newest first: version, aliases, gate_decision,
    gate_reason, ndcg (the run's logged ``ndcg_at_<k>``, None if absent), created (UTC ISO),
    run_id and previous_champion. Empty when nothing is registered."""
    client, name = configure(settings), settings.mlflow.registered_model
    try:
        model = client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        return []
    aliases: dict[int, list[str]] = {}
    for alias, version in model.aliases.items():
        aliases.setdefault(int(version), []).append(alias)
    metric = f"ndcg_at_{settings.training.k}"
    rows = []
    for mv in sorted(client.search_model_versions(f"name = '{name}'"), key=lambda m: int(m.version), reverse=True):
        try:
            metrics = client.get_run(mv.run_id).data.metrics if mv.run_id else {}
        except mlflow.exceptions.MlflowException:
            metrics = {}
        rows.append(
            {
                "version": int(mv.version),
                "aliases": sorted(aliases.get(int(mv.version), [])),
                "gate_decision": mv.tags.get("gate.decision"),
                "gate_reason": mv.tags.get("gate.reason"),
                "ndcg": metrics.get(metric),
                "created": datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC).isoformat(timespec="seconds"),
                "run_id": mv.run_id,
                "previous_champion": mv.tags.get("promotion.previous_champion"),
            }
        )
    return rows
