"""A behaviour simulator for online experiments (``hyperrec simulate``,
``hyperrec experiment simulate``): synthetic users from ``hyperrec generate``'s ground truth
(their latent topic preferences) request lists from the serving API and click them.

Click model (position-based): a user shown item ``i`` at position ``r`` (1-based) clicks it
with probability ``click_scale · affinity(u, i)^affinity_power · r^(-position_bias)``, where
``affinity(u, i)`` is the user's true preference for the item's topic over their favourite
topic's (as the generator draws its events), so a list ranking the user's real tastes first
earns more clicks than one that does not. Clicks are posted to ``POST /v1/events`` with the
list's impression id, which is how serving attributes them to the arm (or interleaving team)
that placed the item.

:func:`run_experiment` drives an in-process serving app (the real ASGI app, its own Valkey and
a private bundle store under ``<home>/experiments/<id>/``: the live store and serving are not
touched) with a champion and a challenger bundle, reads the report after every ``step`` users
and stops at the first verdict that is not ``unknown`` (the mSPRT is valid under such peeking).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.settings import Settings
from training.bundle import copy_bundle

SIMPLE_MODELS = ("popularity", "ease", "item_knn")
"""Candidates :func:`fit_bundle` fits on a generated dataset for a self-contained simulation."""


@dataclass(frozen=True)
class ClickModel:
    click_scale: float = 0.6
    affinity_power: float = 3.0
    position_bias: float = 0.8

    def probabilities(self, affinity: np.ndarray) -> np.ndarray:
        positions = np.arange(1, len(affinity) + 1, dtype=float)
        return np.clip(self.click_scale * affinity**self.affinity_power * positions**-self.position_bias, 0.0, 1.0)


class GroundTruth:
    """Users' latent topic preferences and items' topics, from a ``ground_truth/`` folder of
    ``hyperrec generate`` (``users.parquet``: ``user_id``, ``pref_<topic>``...;
    ``items.parquet``: ``item_id``, ``topic``)."""

    def __init__(self, users: pd.DataFrame, items: pd.DataFrame) -> None:
        topics = [c[len("pref_") :] for c in users.columns if c.startswith("pref_")]
        if not topics:
            raise ValueError("ground truth users have no pref_<topic> columns")
        self.user_ids: list[str] = users["user_id"].astype(str).tolist()
        pref = users[[f"pref_{t}" for t in topics]].to_numpy(dtype=float)
        self.relative = pref / pref.max(axis=1, keepdims=True)
        self.user_row = {u: n for n, u in enumerate(self.user_ids)}
        topic_index = {t: n for n, t in enumerate(topics)}
        self.item_topic = {str(i): topic_index[t] for i, t in zip(items["item_id"], items["topic"]) if t in topic_index}

    @classmethod
    def load(cls, root: Path) -> GroundTruth:
        """From ``root`` (a generated dataset, its ``ground_truth/``, or a run's raw folder
        holding ``ground_truth/<source>/``): the first ``users.parquet`` found with its
        ``items.parquet``."""
        root = Path(root)
        found = sorted(
            p for p in root.rglob("users.parquet") if p.parent.name == "ground_truth" or "ground_truth" in p.parts
        )
        if not found:
            raise FileNotFoundError(f"no ground_truth/users.parquet under {root}: use a `hyperrec generate` dataset")
        folder = found[0].parent
        return cls(pd.read_parquet(folder / "users.parquet"), pd.read_parquet(folder / "items.parquet"))

    def affinity(self, user_id: str, item_ids: Iterable[str]) -> np.ndarray:
        """The user's true affinity in [0, 1] for each item (0 for an item without a topic)."""
        row = self.relative[self.user_row[user_id]]
        return np.array([row[self.item_topic[i]] if i in self.item_topic else 0.0 for i in item_ids])


@dataclass
class Visit:
    user_id: str
    arm: str
    impression_id: str
    items: list[str]
    clicked: list[str]


def visit(client: Any, truth: GroundTruth, clicks: ClickModel, rng: np.random.Generator, user_id: str, k: int) -> Visit:
    """One user's request and clicks through ``client`` (anything with httpx's ``get``/``post``)."""
    response = client.get(f"/v1/recommendations/{user_id}", params={"k": k})
    response.raise_for_status()
    body = response.json()
    items = [it["item_id"] for it in body["items"]]
    probabilities = clicks.probabilities(truth.affinity(user_id, items))
    clicked = [item for item, p in zip(items, probabilities) if rng.random() < p]
    impression_id = body.get("impression_id", "")
    for item in clicked:
        event = {"user_id": user_id, "item_id": item, "event_type": "click"}
        if impression_id:
            event["impression_id"] = impression_id
        client.post("/v1/events", json=event).raise_for_status()
    return Visit(user_id, response.headers.get("x-arm", "champion"), impression_id, items, clicked)


def _metadata(bundle_dir: Path) -> dict:
    return json.loads((Path(bundle_dir) / "metadata.json").read_text())


def fit_bundle(dataset: Path, model: str, out_dir: Path, version: str) -> Path:
    """A bundle of ``model`` (one of :data:`SIMPLE_MODELS`) fitted on every interaction of
    the generated dataset ``dataset``: the self-contained simulation's arms."""
    from training.bundle import write_bundle
    from training.models import InteractionMatrix, fit_ease, fit_item_knn, fit_popularity, popularity

    if model not in SIMPLE_MODELS:
        raise ValueError(f"unknown model {model!r} for a generated dataset: use one of {', '.join(SIMPLE_MODELS)}")
    frame = pd.concat(
        [
            pd.read_parquet(p, columns=["user_id", "item_id"])
            for p in sorted((dataset / "interactions").glob("*.parquet"))
        ]
    ).dropna()
    items = pd.read_parquet(dataset / "items.parquet")
    data = InteractionMatrix.from_frame(
        frame.drop_duplicates(), item_ids=np.array(sorted(items["item_id"]), dtype=object)
    )
    x = data.matrix
    fitted = {"popularity": fit_popularity, "ease": lambda m: fit_ease(m, lam=50.0), "item_knn": fit_item_knn}[model](x)
    meta = items.set_index("item_id").reindex(data.item_ids)
    return write_bundle(
        out_dir,
        model=fitted,
        item_ids=data.item_ids,
        titles=meta["title"].fillna("").astype(str).tolist(),
        categories=[list(c) if c is not None else [] for c in meta["categories"]],
        history={u: x[i].indices.tolist() for u, i in data.user_index.items()},
        popularity=popularity(x),
        metadata={"version": version, "model_name": model, "metrics": {}, "k": 10},
    )


def run_experiment(
    settings: Settings,
    *,
    champion_dir: Path,
    challenger_dir: Path,
    truth: GroundTruth,
    experiment_id: str,
    design: str = "ab",
    share: float = 0.5,
    seed: int = 0,
    step: int = 100,
    max_users: int | None = None,
    k: int | None = None,
    clicks: ClickModel | None = None,
    progress: Callable[[dict], None] | None = None,
) -> dict:
    """One simulated experiment (module docstring): returns the final report with
    ``users`` (the users it took to decide, or all of them when undecided)."""
    import redis
    from fastapi.testclient import TestClient

    from core.object_store import ObjectStore
    from feature_store.online import open_redis
    from serving.app import create_app
    from serving.experiment import Experiment, write_experiment
    from serving.experiment_report import drain, experiment_dir, load, report
    from serving.store import publish

    k = k or settings.serving.default_k
    clicks = clicks or ClickModel()
    out = experiment_dir(settings, experiment_id)
    if out.exists():
        shutil.rmtree(out)
    store = ObjectStore(str(out / "store"))
    names = {
        role: f"{role}-" + re.sub(r"[^A-Za-z0-9_.-]", "-", str(_metadata(folder).get("model_name") or "model"))[:64]
        for role, folder in (("champion", champion_dir), ("challenger", challenger_dir))
    }
    champion = publish(
        copy_bundle(champion_dir, out / "stage" / "champion", names["champion"]), store, names["champion"]
    )
    challenger = publish(
        copy_bundle(challenger_dir, out / "stage" / "challenger", names["challenger"]),
        store,
        names["challenger"],
        move_current=False,
    )
    n_items = _metadata(challenger_dir).get("n_items")
    experiment = Experiment(experiment_id, challenger, share, design, champion=champion, catalogue_size=n_items)  # type: ignore[arg-type]
    write_experiment(store, experiment)
    rng = np.random.default_rng(seed)
    order = [truth.user_ids[n] for n in rng.permutation(len(truth.user_ids))]
    if max_users is not None:
        order = order[:max_users]
    result: dict = {"verdict": "unknown", "users": 0}
    with open_redis(None) as server:
        sim = settings.model_copy(
            update={
                "online_store": settings.online_store.model_copy(update={"url": server.url}),
                "serving": settings.serving.model_copy(
                    update={"namespace": f"sim-{experiment_id}", "reload_interval_s": 0, "cache_ttl_s": 300}
                ),
            }
        )
        sync = redis.Redis.from_url(server.url)
        try:
            with TestClient(create_app(sim, bundle_store=store)) as client:
                for n, user in enumerate(order, 1):
                    visit(client, truth, clicks, rng, user, k)
                    if n % step == 0 or n == len(order):
                        client.portal.call(client.app.state.experiment_log.flush)  # the buffered impressions
                        drain(sim, experiment_id, sync)
                        result = report(experiment, *load(sim, experiment_id), sim.experiment, k)
                        if progress is not None:
                            progress(result)
                        if result["verdict"] != "unknown":
                            break
        finally:
            sync.close()
    (out / "report.json").write_text(json.dumps(result, indent=2, sort_keys=True, default=str))
    return result


def resolve_bundle(settings: Settings, model: str, *, run_dir: Path | None, work: Path) -> Path:
    """The bundle directory ``model`` names: ``current`` (what ``CURRENT`` serves), a registry
    version (``v3`` or ``3``), or a candidate of the training run ``run_dir``
    (``<run>/models/<model>``: ``hybrid``, ``ease``, ``popularity``...)."""
    from serving.publish import object_store
    from serving.store import current_version, fetch

    if model == "current":
        store = object_store(settings)
        version = current_version(store)
        if version is None:
            raise FileNotFoundError(f"nothing is published in {store}: no current champion to simulate against")
        return fetch(store, version, work / "current")
    if model.lstrip("v").isdigit():
        from training.registry import bundle_dir_of

        return bundle_dir_of(settings, int(model.lstrip("v")), work / f"registry-{model}")
    if run_dir is None:
        raise ValueError(f"model {model!r}: name a training run (--run-dir) whose models/ holds it")
    bundle = Path(run_dir) / "models" / model
    if not (bundle / "metadata.json").is_file():
        have = sorted(p.name for p in (Path(run_dir) / "models").glob("*") if (p / "metadata.json").is_file())
        raise FileNotFoundError(f"no bundle {bundle}: the run's candidates are {', '.join(have) or 'none'}")
    return bundle


def simulate(
    settings: Settings,
    *,
    challenger: str,
    champion: str = "popularity",
    design: str = "ab",
    seed: int = 0,
    dataset: Path | None = None,
    run_dir: Path | None = None,
    share: float = 0.5,
    max_users: int | None = None,
    step: int = 100,
    progress: Callable[[dict], None] | None = None,
) -> dict:
    """One simulated experiment, ``champion`` against ``challenger``.

    With ``run_dir`` (a training run on data that includes a ``hyperrec generate`` sample, as
    the demo's): the users are that sample's (the run's ``raw/ground_truth/``), and each model
    is resolved by :func:`resolve_bundle` (a run candidate such as ``hybrid``, a registry
    version, or ``current``). Without it, each model is one of :data:`SIMPLE_MODELS` fitted by
    :func:`fit_bundle` on ``dataset`` (default: one made once under
    ``<home>/experiments/sim-data-<seed>/``: 30,000 events, 3,000 users, 300 items)."""
    from core.datasets.synthetic import generate

    work = settings.home / "experiments" / f"sim-data-{seed}"
    if run_dir is not None:
        truth = GroundTruth.load(Path(run_dir) / "raw")
        bundles = {name: resolve_bundle(settings, name, run_dir=run_dir, work=work) for name in {champion, challenger}}
    else:
        if dataset is None:
            dataset = work / "dataset"
            if not (dataset / "items.parquet").is_file():
                generate(dataset, events=30_000, users=3_000, items=300, seed=seed, progress=False)
        truth = GroundTruth.load(dataset)
        bundles = {
            name: fit_bundle(dataset, name, work / name, name.replace("_", "-")) for name in {champion, challenger}
        }
    return run_experiment(
        settings,
        champion_dir=bundles[champion],
        challenger_dir=bundles[challenger],
        truth=truth,
        experiment_id=f"sim-{design}-{champion}-{challenger}-{seed}".replace("_", "-"),
        design=design,
        share=share,
        seed=seed,
        step=step,
        max_users=max_users,
        progress=progress,
    )
