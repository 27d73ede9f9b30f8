"""Starting, inspecting and ending an online experiment (``hyperrec experiment
start|status|stop|report``).

:func:`start` publishes the challenger (the registry's ``challenger`` alias, or a given
version) beside the champion (``CURRENT`` does not move) and writes the experiment
descriptor into the bundle store, where every serving worker picks it up at its next
hot-reload poll (``serving.reload_interval_s``). :func:`stop` removes the descriptor (serving
returns to the champion alone), drains the record and writes the final report.
:func:`evaluate` drains and reports at any time; :func:`decide` acts on the verdict:
``better`` promotes the challenger through the registry (:func:`serving.experiment_report.promote`),
``worse`` ends the experiment and keeps the champion.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from core.errors import UserError
from core.settings import Settings
from serving.experiment import Experiment, clear_experiment, read_experiment, write_experiment
from serving.experiment_report import drain, experiment_dir, load, promote, report
from serving.publish import object_store, publish_dir, publish_version
from serving.store import current_version

log = logging.getLogger(__name__)
DESCRIPTOR = "experiment.json"


def start(
    settings: Settings,
    *,
    experiment_id: str | None = None,
    version: int | None = None,
    share: float | None = None,
    design: str | None = None,
) -> Experiment:
    """Publish the challenger beside the champion and start the experiment (module docstring)."""
    from training.registry import challenger_version

    store = object_store(settings)
    running = read_experiment(store)
    if running is not None:
        raise UserError(f"experiment {running.id} is running: `hyperrec experiment stop` it first")
    champion = current_version(store)
    if champion is None:
        raise UserError("nothing is published: an experiment needs a served champion")
    version = version if version is not None else challenger_version(settings)
    if version is None:
        raise UserError(f"the registry has no challenger alias on {settings.mlflow.registered_model!r}: pass --version")
    if champion == f"v{version}":
        raise UserError(f"v{version} is the served champion: nothing to compare it against")
    published = publish_version(settings, version, workdir=publish_dir(settings) / "experiment", move_current=False)
    cfg = settings.experiment
    experiment = Experiment(
        experiment_id or f"exp-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}-v{version}",
        published["version"],
        cfg.share if share is None else share,
        (design or cfg.design),  # type: ignore[arg-type]
        registered_version=int(version),
        champion=champion,
        catalogue_size=_catalogue_size(store, champion),
    )
    out = experiment_dir(settings, experiment.id)
    out.mkdir(parents=True, exist_ok=True)
    (out / DESCRIPTOR).write_bytes(experiment.to_json())
    write_experiment(store, experiment)
    return experiment


def _catalogue_size(store: Any, version: str) -> int | None:
    raw = store.get_bytes(f"{version}/metadata.json")
    try:
        return int(json.loads(raw)["n_items"]) if raw else None
    except (KeyError, TypeError, ValueError):
        return None


def find(settings: Settings, experiment_id: str | None = None) -> tuple[Experiment, bool]:
    """The experiment ``experiment_id`` (default: the running one) and whether it runs."""
    running = read_experiment(object_store(settings))
    if experiment_id is None or (running is not None and running.id == experiment_id):
        if running is None:
            raise UserError("no experiment is running (name a stopped one with --id)")
        return running, True
    path = experiment_dir(settings, experiment_id) / DESCRIPTOR
    if not path.is_file():
        raise UserError(f"no experiment {experiment_id!r} under {experiment_dir(settings, experiment_id)}")
    return Experiment.from_json(path.read_bytes()), False


def _redis(settings: Settings) -> Any:
    import redis

    if settings.online_store.url is None:
        return None
    return redis.Redis.from_url(settings.online_store.url, socket_connect_timeout=2, socket_timeout=10)


def evaluate(settings: Settings, experiment: Experiment) -> dict:
    """Drain the experiment's streams (when the online store answers) and compute its report
    from the Parquet record; writes ``report.json`` and the descriptor beside it."""
    client = _redis(settings)
    drained: dict[str, Any] = {}
    if client is not None:
        try:
            drained = drain(settings, experiment.id, client)
        except Exception as exc:  # report what is recorded already
            log.warning("cannot drain experiment %s from %s: %s", experiment.id, settings.online_store.url, exc)
            drained = {"error": str(exc)}
        finally:
            client.close()
    result = report(experiment, *load(settings, experiment.id), settings.experiment, settings.serving.default_k)
    result["drained"] = drained
    out = experiment_dir(settings, experiment.id)
    out.mkdir(parents=True, exist_ok=True)
    (out / DESCRIPTOR).write_bytes(experiment.to_json())  # so a stopped experiment can be reported again
    (out / "report.json").write_text(json.dumps(result, indent=2, sort_keys=True, default=str))
    return result


def stop(settings: Settings, experiment_id: str | None = None) -> dict:
    """End the running experiment: remove its descriptor, then the final report."""
    experiment, running = find(settings, experiment_id)
    if running:
        clear_experiment(object_store(settings))
    return evaluate(settings, experiment)


def decide(settings: Settings, experiment: Experiment, result: dict) -> dict:
    """Act on a verdict: ``better`` promotes the challenger (and ends the experiment),
    ``worse`` ends it and keeps the champion, ``unknown`` changes nothing."""
    verdict = result["verdict"]
    action: dict[str, Any] = {"verdict": verdict, "action": "none"}
    if verdict == "better":
        action = {"verdict": verdict, "action": "promoted", "promotion": promote(settings, experiment, result)}
    elif verdict == "worse":
        action = {"verdict": verdict, "action": "kept the champion"}
    if verdict in ("better", "worse"):
        store = object_store(settings)
        running = read_experiment(store)
        if running is not None and running.id == experiment.id:
            clear_experiment(store)
            action["stopped"] = True
    return action
