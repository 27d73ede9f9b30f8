"""Register and publish what serving answers with: the ``register`` stage logs the best
model as :class:`ServedPyfunc` (the API's own :class:`serving.recommender.ServedModel` over
the bundle, so the registered model ranks exactly as the API), and ``publish_champion``
copies the registry's champion to the object store the serving tier reads.

Every publisher of a home (the DAG's ``publish`` task, the champion watcher of
:mod:`serving.champion_watch`) goes through :func:`follow_champion`: under one lock it reads
the champion, publishes it (:func:`publish_version`) and, when ``CURRENT`` moves, appends the
decision (:func:`champion_change`: who moved the alias and why) to
``<home>/publish/decisions.jsonl`` and tags the version ``hyperrec.published_*``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from core.files import exclusive_lock
from core.object_store import ObjectStore
from core.run_context import RunContext
from core.settings import ServingSettings, Settings
from core.tracking import configure
from serving.store import current_version, publish
from training import registry
from training.pyfunc import Recommend, RecommenderPyfunc

log = logging.getLogger(__name__)

ANSWER_SETTINGS = ("candidates", "mmr_pool", "cold_popularity_weight", "quantized")
"""The serving settings that shape an answer; the registered model keeps their values."""


class ServedPyfunc(RecommenderPyfunc):
    """The registered pyfunc: :meth:`ServedModel.recommend` for ``(user_id, k)`` with no live
    events, built from the logged bundle with the serving settings given at registration
    (only :data:`ANSWER_SETTINGS`; no secret travels with the model)."""

    def __init__(self, serving: ServingSettings) -> None:
        self.serving: dict[str, Any] = {name: getattr(serving, name) for name in ANSWER_SETTINGS}

    def open(self, bundle_dir: Path) -> Recommend:
        from serving.recommender import RecommendationRequest, ServedModel
        from training.bundle import load_bundle

        served = ServedModel(load_bundle(bundle_dir), Path(bundle_dir), ServingSettings(**self.serving))

        def recommend(user_id: str, k: int) -> list[dict[str, Any]]:
            body = served.recommend(RecommendationRequest(user_id, k), [])
            return [{"item_id": it.item_id, "rank": it.rank, "score": it.score} for it in body.items]

        return recommend


def register(settings: Settings, run: RunContext) -> dict:
    """The ``register`` stage: the best candidate's bundle gets its serving files
    (:func:`add_serving_extras`, so the registered artifact is the one served) and is
    registered as :class:`ServedPyfunc` (:func:`training.stage.register`)."""
    from training.stage import register as register_run

    best = run.read_json("evaluation.json")["best"]
    try:
        add_serving_extras(run.models_dir / best, run, settings.serving)
    except Exception as exc:  # the served model then builds its index at load, as publishing would
        log.warning("no serving extras for the registered %s bundle: %s", best, exc)
    return register_run(settings, run, python_model=ServedPyfunc(settings.serving))


def object_store(settings: Settings) -> ObjectStore:
    return ObjectStore(settings.object_store_uri, settings.object_store.s3_endpoint_url)


DECISIONS = "decisions.jsonl"
OUTSIDE = "alias moved outside hyperrec (MLflow UI or API)"
EVENT_TAG = "hyperrec.published_event"
"""Version tag: the registry event (``<source>@<decided_at>``) whose publication moved
``CURRENT`` to the version last; an event explains one publication only, so a later move
back to the version that no hyperrec command made reads as :data:`OUTSIDE`."""


SETTLE_S = 5.0
"""Seconds a move that reads as :data:`OUTSIDE` is re-read: the registry functions set the
alias first and their ``promotion.*``/``rollback.*`` tags right after."""


def publish_dir(settings: Settings) -> Path:
    """``<home>/publish``: the publish lock, the watcher's work and status files and
    :data:`DECISIONS`."""
    return settings.home / "publish"


@contextlib.contextmanager
def publish_lock(settings: Settings) -> Iterator[None]:
    """Hold the exclusive ``flock`` on ``<home>/publish/publish.lock``: the publishers of one
    home take turns, so the last to move ``CURRENT`` read the champion last."""
    with exclusive_lock(publish_dir(settings) / "publish.lock"):
        yield


def publish_version(
    settings: Settings, version: int, *, workdir: Path, run: RunContext | None = None, move_current: bool = True
) -> dict:
    """Publish registered ``version`` as ``v<version>``: its bundle is downloaded from MLflow
    into ``workdir`` (emptied first), ``metadata.json`` gets the version, and
    :func:`serving.store.publish` uploads it to ``<store>/v<version>/`` and points ``CURRENT``
    at it. The registered bundle carries its own serving extras (:func:`register`); with
    ``run``, they are written again from that run (:func:`add_serving_extras`).

    Before the upload it stores the canary rankings serving checks (``canary.json``,
    :func:`_write_canary`). Returns version (``v<N>``), registered_version, previous (what
    ``CURRENT`` named before, None when nothing), store, current, serving_extras and
    canary. Idempotent; it takes no lock (:func:`follow_champion` does). ``move_current=False``
    publishes beside the served version (an experiment's challenger) without moving ``CURRENT``.
    """
    workdir = Path(workdir)
    if workdir.exists():
        shutil.rmtree(workdir)
    store = object_store(settings)
    previous = current_version(store)
    source = registry.bundle_dir_of(settings, version, workdir / "download")
    staged = shutil.copytree(source, workdir / "bundle")
    meta_path = staged / "metadata.json"
    metadata = json.loads(meta_path.read_text())
    metadata.update(
        {"version": f"v{version}", "registered_model": settings.mlflow.registered_model, "registered_version": version}
    )
    meta_path.write_text(json.dumps(metadata, indent=2, sort_keys=True))
    extras: dict = {"files": [], "from": "registered bundle"}
    if run is not None:
        try:
            extras = {"files": add_serving_extras(staged, run, settings.serving), "from": f"run {run.run_id}"}
        except Exception as exc:  # the registered bundle's own extras (if any) stay
            log.warning("no serving extras from run %s for v%s: %s", run.run_id, version, exc)
            extras["error"] = f"{type(exc).__name__}: {exc}"
    canary = _write_canary(staged, settings.serving)
    published = publish(staged, store, f"v{version}", move_current=move_current)
    return {
        "version": published,
        "registered_version": int(version),
        "previous": previous,
        "store": str(store),
        "current": current_version(store),
        "serving_extras": extras,
        "canary": canary,
    }


def _write_canary(bundle_dir: Path, serving: ServingSettings) -> str | None:
    """The bundle's canary rankings (:func:`serving.bundle_checks.write_canary`), checked by
    every serving worker before it serves the bundle; the file name, or None when there are
    no users (or it failed: the bundle is still published, and serving skips the check)."""
    from serving.bundle_checks import write_canary

    try:
        path = write_canary(bundle_dir, serving)
    except Exception as exc:
        log.warning("no canary rankings for %s: %s: %s", bundle_dir, type(exc).__name__, exc)
        return None
    return path.name if path is not None else None


def follow_champion(
    settings: Settings, *, workdir: Path, publisher: str, run: RunContext | None = None, force: bool = False
) -> dict:
    """Under :func:`publish_lock`, publish the registry's champion (:func:`publish_version`)
    unless ``CURRENT`` already names it (with ``force``, publish anyway). When ``CURRENT``
    moves, the decision is recorded (:func:`record_decision`) for ``publisher``.

    Returns version, current, changed, decision (the record, None when ``CURRENT`` stayed)
    and, when published, :func:`publish_version`'s result. Raises LookupError when the
    registry has no champion (what is served stays).
    """
    with publish_lock(settings):
        champion = registry.champion_version(settings)
        if champion is None:
            raise LookupError(f"the registry has no {registry.CHAMPION} to publish")
        current = current_version(object_store(settings))
        if current == f"v{champion}" and not force:
            return {"version": current, "current": current, "changed": False, "decision": None}
        result = publish_version(settings, champion, workdir=workdir, run=run)
        result["changed"] = result["previous"] != result["current"]
        result["decision"] = record_decision(settings, result, publisher) if result["changed"] else None
        return result


def publish_champion(settings: Settings, run: RunContext) -> dict:
    """The ``publish`` stage: :func:`follow_champion` with the run's serving extras,
    re-publishing the champion even when ``CURRENT`` already names it; writes ``publish.json``."""
    result = follow_champion(
        settings, workdir=run.path("publish"), publisher=f"recsys_training run {run.run_id}", run=run, force=True
    )
    run.write_json("publish.json", result)
    return result


def _version_or_none(value: str | None) -> int | None:
    return int(value) if value and value.isdigit() else None


def champion_change(settings: Settings, version: int) -> dict:
    """Who made ``version`` the champion and why, as far as the registry's tags tell.

    Returns source, user, reason, decided_at and previous_champion. ``source`` is ``gate`` or
    ``manual`` (the ``promotion.*`` tags :func:`training.registry.promote_version` and the
    gate write), ``rollback`` (the ``rollback.*`` tags of :func:`training.registry.rollback`;
    user and reason are on the replaced version), whichever is later, or ``outside`` when
    no hyperrec command explains the move: the champion history tag
    (:data:`training.registry.STACK_TAG`) does not end with ``version`` (unless the alias has
    moved on from ``version`` since it was read and the history holds it), or its latest
    event was published already (:data:`EVENT_TAG`). ``outside`` adds version_tags, the version's
    ``gate.*``/``promotion.*``/``rollback.*`` tags.
    """
    client, name = configure(settings), settings.mlflow.registered_model
    model = client.get_registered_model(name)
    raw = model.tags.get(registry.STACK_TAG)
    history = [int(v) for v in json.loads(raw)] if raw else []
    tags = client.get_model_version(name, str(version)).tags
    alias = _version_or_none(str((model.aliases or {}).get(registry.CHAMPION, "")))
    # A hyperrec command explains the move when it made ``version`` the latest champion, or
    # when it did and the champion has moved on since (``version`` is in the history but no
    # longer holds the alias, so no outside move can have put it there).
    explained = bool(history) and (history[-1] == int(version) or (alias != int(version) and int(version) in history))
    event: dict[str, Any] | None = None
    if explained:
        restored, promoted = tags.get("rollback.restored_at"), tags.get("promotion.at")
        if restored and (promoted is None or restored >= promoted):
            replaced = _version_or_none(tags.get("rollback.restored_from"))
            by = client.get_model_version(name, str(replaced)).tags if replaced is not None else {}
            event = {
                "source": "rollback",
                "user": by.get("rollback.user"),
                "reason": by.get("rollback.reason"),
                "decided_at": restored,
                "previous_champion": replaced,
            }
        elif promoted:
            event = {
                "source": tags.get("promotion.by", "gate"),
                "user": tags.get("promotion.user"),
                "reason": tags.get("promotion.reason"),
                "decided_at": promoted,
                "previous_champion": _version_or_none(tags.get("promotion.previous_champion")),
            }
    if event is not None and tags.get(EVENT_TAG) != _event_id(event):
        return event
    return {
        "source": "outside",
        "user": None,
        "reason": OUTSIDE,
        "decided_at": None,
        "previous_champion": history[-1] if history and history[-1] != int(version) else None,
        "version_tags": {k: v for k, v in sorted(tags.items()) if k.startswith(("gate.", "promotion.", "rollback."))},
    }


def _event_id(event: dict) -> str:
    return f"{event['source']}@{event['decided_at']}"


def record_decision(settings: Settings, published: dict, publisher: str) -> dict:
    """Append the record of a publication that moved ``CURRENT`` to ``<home>/publish/``
    :data:`DECISIONS` and tag the version ``hyperrec.published_at``/``_by``/``_previous`` and
    :data:`EVENT_TAG`. The record: at, version, registered_version, previous (the version
    served before), store, publisher and :func:`champion_change`'s fields (``outside`` only
    after :data:`SETTLE_S` seconds of re-reading; ``unknown`` when the registry cannot be
    read). Tagging errors are logged; the record stays."""
    version = published["registered_version"]
    try:
        change = champion_change(settings, version)
        settled = time.monotonic() + SETTLE_S
        while change["source"] == "outside" and time.monotonic() < settled:
            time.sleep(0.5)  # a hyperrec command may still be writing its tags after the alias
            change = champion_change(settings, version)
    except Exception as exc:  # the bundle is published: the record must not be lost with the registry
        log.warning("cannot read who moved the champion to v%s: %s", version, exc)
        change = {"source": "unknown", "user": None, "reason": f"registry unreadable: {exc}", "decided_at": None}
    record = {
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "version": published["version"],
        "registered_version": version,
        "previous": published["previous"],
        "store": published["store"],
        "publisher": publisher,
        **change,
    }
    path = publish_dir(settings) / DECISIONS
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as out:
        out.write(json.dumps(record, sort_keys=True, default=str) + "\n")
    tags = {"hyperrec.published_by": publisher, "hyperrec.published_previous": str(record["previous"])}
    if change["source"] not in ("outside", "unknown"):
        tags[EVENT_TAG] = _event_id(change)
    tags["hyperrec.published_at"] = record["at"]  # last: the other tags are this publication's once it is set
    try:
        client = configure(settings)
        for key, value in tags.items():
            client.set_model_version_tag(settings.mlflow.registered_model, str(version), key, value)
    except Exception as exc:
        log.warning("published v%s but could not tag it: %s", version, exc)
    log.info(
        "published %s (was %s): %s by %s: %s",
        record["version"],
        record["previous"],
        record["source"],
        record["user"],
        record["reason"],
    )
    return record


def add_serving_extras(bundle_dir: Path, run: RunContext, serving: ServingSettings | None = None) -> list[str]:
    """Write the serving-only files of ``bundle_dir``; returns them relative to ``bundle_dir``.

    - segment popularity and profiles (:func:`serving.segments.write_segment_profiles`) when
      ``run`` has a segmentation (without one serving falls back to global popularity);
    - with ``serving``, the ANN indexes serving would otherwise build at load
      (:func:`write_ann_indexes`).
    """
    bundle_dir = Path(bundle_dir)

    def snapshot() -> dict[Path, int]:
        return {p: p.stat().st_mtime_ns for p in bundle_dir.rglob("*") if p.is_file()}

    before = snapshot()
    _write_segment_extras(bundle_dir, run)
    if serving is not None:
        write_ann_indexes(bundle_dir, serving)
    return sorted(p.relative_to(bundle_dir).as_posix() for p, t in snapshot().items() if before.get(p) != t)


def _write_segment_extras(bundle_dir: Path, run: RunContext) -> None:
    from feature_store.stage import read_segment_labels
    from pipelines.split import load_split
    from serving.segments import write_segment_profiles

    segments = read_segment_labels(run)
    if not segments:
        log.info("run %s has no segmentation: the bundle gets no segment popularity", run.run_id)
        return
    items = pd.read_parquet(bundle_dir / "items.parquet", columns=["item_id"])
    train, _ = load_split(run.split_dir)
    users = pd.read_parquet(run.clean_dir / "users") if (run.clean_dir / "users").exists() else None
    events = None
    if (run.clean_dir / "interactions").exists():
        events = pd.read_parquet(run.clean_dir / "interactions", columns=["user_id", "device"])
    write_segment_profiles(bundle_dir, items["item_id"].to_numpy(dtype=object), train, segments, users, events)


def write_ann_indexes(bundle_dir: Path, serving: ServingSettings) -> list[Path]:
    """Build and store in ``bundle_dir`` the ANN index of the float model and of the INT8 one
    (when quantizing changes the item vectors), calibrated for ``serving.candidates``, so that
    loading the bundle with either setting reads the index instead of building it."""
    from serving.recommender import ServedModel
    from training.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    written: list[Path] = []
    for quantized in (False, True):
        served = ServedModel(bundle, bundle_dir, serving.model_copy(update={"quantized": quantized}))
        path = served.save_ann_index(bundle_dir) if served.ann_origin == "built" else None
        if path is not None and served.index is not None:
            written.append(path)
            log.info(
                "stored the %s ANN index (%s) in %s", "INT8" if quantized else "float", served.index.describe(), path
            )
    return written
