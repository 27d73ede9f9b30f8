"""Warm-started training runs. A run's *choices* are the outcome of its validation search:
the hybrid's :class:`training.hybrid.HybridChoice` (EASE λ, β, α, blend weights) and the
per-segment fine-tuning parameters validation kept (``segment_tuning.json``). With
``training.search: warm`` a run reuses the champion's choices instead of searching, unless
:func:`decide` finds a search due.

The train stage writes every run's choices and how it got them to ``search.json``
(:data:`RECORD_FILE`); ``register`` logs it as the artifact :data:`RECORD_ARTIFACT` of the
version's source run, so the choices travel with the model and :func:`champion_record` reads
the champion's back. A warm run's record keeps the ``searched_at`` of the search it reuses,
so the age that triggers the next search counts from that search, not from the last refit.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from core.settings import Settings
from training import registry
from training.hybrid import HybridChoice

RECORD_FILE = "search.json"
ARTIFACT_DIR = "warm_start"
RECORD_ARTIFACT = f"{ARTIFACT_DIR}/{RECORD_FILE}"
WARM, SEARCHED = "warm", "searched"
FORCE_PARAM = "force_search"
"""The ``recsys_training`` param (conf key) that makes a run search whatever the policy."""
SEARCH_SETTINGS = {
    "training": {
        "k",
        "validation_folds",
        "validation_seed",
        "ease_lambdas",
        "temporal_window",
        "temporal_betas",
        "input_alphas",
        "blend_components",
        "blend_weight_grid",
    },
    "tuning": None,
}
"""The settings that define the searches (section → fields; None: all): the hybrid's grids
and validation folds (:func:`training.hybrid.tune_hybrid`) and the segment search
(:mod:`training.segment_tuning`). A component's own settings (``neural.epochs``,
``training.als_rank``, ...) are not among them: the choices still apply, and the next due
search takes the change into account (``force_search`` at once)."""


def search_fingerprint(settings: Settings) -> str:
    """SHA-256 (16 hex digits) of the :data:`SEARCH_SETTINGS` values."""
    parts = {
        section: getattr(settings, section).model_dump(mode="json", include=fields)
        for section, fields in SEARCH_SETTINGS.items()
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def data_source(params: Mapping[str, Any]) -> str:
    """What a run trains on, from its ``params.json``: the dataset plus the synthetic sample.
    Landed batches are left out: they are the same source growing."""
    dataset = str(params.get("dataset") or "none")
    events = int(params.get("synthetic_events") or 0)
    return dataset + (f" + {events} synthetic events (seed {int(params.get('seed') or 0)})" if events else "")


@dataclass(frozen=True)
class Decision:
    """How a run gets its choices. ``mode`` is :data:`WARM` (the champion's, version
    ``from_version``) or :data:`SEARCHED` (this run's search); ``searched_at`` is when the
    choices in use were searched (UTC ISO); ``segment_tuning`` is ``reused`` or why the
    segment search runs."""

    mode: str
    reason: str
    from_version: int | None
    searched_at: str
    segment_tuning: str

    @property
    def warm(self) -> bool:
        return self.mode == WARM

    @property
    def segments_warm(self) -> bool:
        return self.warm and self.segment_tuning == "reused"

    def to_dict(self) -> dict:
        return asdict(self)


def _searched(reason: str, now: datetime) -> Decision:
    return Decision(SEARCHED, reason, None, now.isoformat(timespec="seconds"), "searched")


def _usable(record: Any) -> bool:
    """Whether ``record`` holds a search time, a fingerprint and a choice this code can build."""
    try:
        datetime.fromisoformat(record["searched_at"])
        choice_of(record)
        return bool(record["fingerprint"])
    except (KeyError, TypeError, ValueError):
        return False


def choice_of(record: Mapping[str, Any]) -> HybridChoice:
    """The :class:`HybridChoice` of a ``search.json``, with no search time of this run."""
    return HybridChoice(**{**record["choice"], "seconds": 0.0})


def decide(
    settings: Settings,
    *,
    params: Mapping[str, Any],
    champion: tuple[int, Any] | None,
    components: Sequence[str],
    segmentation: Mapping[str, Any],
    now: datetime,
) -> Decision:
    """Whether this run reuses the champion's choices or searches, and why.

    ``params`` is the run's ``params.json``; ``champion`` the champion's version and its
    record (:func:`champion_record`); ``components`` the blend components this run's side
    data allows (:func:`training.candidates.available`); ``segmentation`` this run's
    ``segments.json`` method and k; ``now`` an aware UTC time. A run searches when the policy
    is ``always``, its ``force_search`` param is set, its reason is in
    ``training.search_on_reasons``, there is no champion or its record holds no choices, or
    the champion's choices were searched under other grids (:func:`search_fingerprint`), on
    another data source (:func:`data_source`), with other
    blend components, or ``training.research_every_days`` or more ago. Otherwise it reuses
    them; a new item catalogue alone does not search again (λ, β, α and blend weights are
    not per item). The segment fine-tuning parameters are reused only on a warm run whose
    segmentation (method and k; labels are numbered by size) is the champion's.
    """
    cfg = settings.training
    reason = str(params.get("reason") or "")
    if cfg.search == "always":
        return _searched("training.search is 'always'", now)
    if params.get(FORCE_PARAM):
        return _searched(f"forced by the run's {FORCE_PARAM} param", now)
    if reason in cfg.search_on_reasons:
        return _searched(f"run reason {reason!r} is in training.search_on_reasons", now)
    if champion is None:
        return _searched("no champion yet", now)
    version, record = champion
    if not _usable(record):
        return _searched(f"champion v{version} has no recorded choices", now)
    if record["fingerprint"] != search_fingerprint(settings):
        return _searched(f"the search grids changed since champion v{version}'s search", now)
    source = data_source(params)
    if record.get("data_source") != source:
        return _searched(f"the data source changed ({record.get('data_source')} → {source})", now)
    if sorted(record.get("components", [])) != sorted(components):
        return _searched(
            f"the blend components changed ({sorted(record.get('components', []))} → {sorted(components)})", now
        )
    searched_at = datetime.fromisoformat(record["searched_at"])
    age = (now - searched_at).total_seconds() / 86400
    if age >= cfg.research_every_days:
        return _searched(
            f"champion v{version}'s choices are {age:.1f} days old (training.research_every_days "
            f"{cfg.research_every_days:g})",
            now,
        )
    theirs = {k: record.get("segmentation", {}).get(k) for k in ("method", "k")}
    ours = {k: segmentation.get(k) for k in ("method", "k")}
    segments = "reused" if theirs == ours and "tuning" in record else f"searched: segmentation {theirs} → {ours}"
    return Decision(
        WARM,
        f"reusing champion v{version}'s choices, searched {age:.1f} days ago "
        f"(< training.research_every_days {cfg.research_every_days:g})",
        int(version),
        record["searched_at"],
        segments,
    )


def record(
    decision: Decision,
    settings: Settings,
    *,
    params: Mapping[str, Any],
    components: Sequence[str],
    segmentation: Mapping[str, Any],
    choice: Mapping[str, Any],
    tuning: Mapping[str, Any],
) -> dict:
    """The ``search.json`` of a run: its :class:`Decision`, the choices it used and what
    :func:`decide` compares a later run with."""
    return {
        **decision.to_dict(),
        "fingerprint": search_fingerprint(settings),
        "data_source": data_source(params),
        "components": sorted(components),
        "segmentation": {k: segmentation.get(k) for k in ("method", "k")},
        "choice": dict(choice),
        "tuning": dict(tuning),
    }


def champion_record(settings: Settings) -> tuple[int, Any] | None:
    """The champion's version and its ``search.json`` (None when its source run has none);
    None when there is no champion."""
    return registry.champion_artifact_json(settings, RECORD_ARTIFACT)
