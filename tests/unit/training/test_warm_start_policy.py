"""The warm-start policy (:func:`training.warm_start.decide`): a run reuses the champion's
choices unless a search is due, and says which reason decided."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from training import warm_start
from training.hybrid import HybridChoice

NOW = datetime(2026, 3, 10, 2, 0, tzinfo=UTC)
PARAMS = {"reason": "scheduled", "dataset": "ml-100k", "synthetic_events": 50000, "seed": 0}
COMPONENTS = ["als", "content", "neural"]
SEGMENTATION = {"method": "kmeans", "k": 4, "sizes": [40, 30, 20, 10]}
CHOICE = HybridChoice(400.0, 600.0, 1.0, 0.15, {"ease": 1.0, "neural": 0.5}, {"hybrid": 0.31}, 2, 12.5)
TUNING = {"k": 10, "kept": ["1"], "results": [{"segment": "1", "kept": True, "params": {"lr": 0.001}}]}


def _record(settings, *, days_old: float = 1.0, **changes) -> dict:
    searched = warm_start.Decision(
        warm_start.SEARCHED, "no champion yet", None, (NOW - timedelta(days=days_old)).isoformat(), "searched"
    )
    out = warm_start.record(
        searched,
        settings,
        params=PARAMS,
        components=COMPONENTS,
        segmentation=SEGMENTATION,
        choice=CHOICE.to_dict(),
        tuning=TUNING,
    )
    return out | changes


def _decide(settings, champion=None, params=PARAMS, components=COMPONENTS, segmentation=SEGMENTATION):
    return warm_start.decide(
        settings, params=params, champion=champion, components=components, segmentation=segmentation, now=NOW
    )


def test_a_recent_champion_choice_is_reused_with_its_version_and_search_time(settings):
    record = _record(settings, days_old=2.5)
    decision = _decide(settings, (3, record))
    assert decision.warm and decision.segments_warm
    assert (decision.mode, decision.from_version, decision.searched_at) == ("warm", 3, record["searched_at"])
    assert "v3" in decision.reason and "2.5 days" in decision.reason
    # The reused choice is the champion's, with no search time charged to this run.
    assert warm_start.choice_of(record) == HybridChoice(**{**CHOICE.to_dict(), "seconds": 0.0})


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("no champion", "no champion yet"),
        ("champion without a record", "v3 has no recorded choices"),
        ("record without a choice", "v3 has no recorded choices"),
        ("choice this code cannot build", "v3 has no recorded choices"),
        ("old choice", "7.0 days old"),
        ("forced", "force_search"),
        ("drift", "'drift' is in training.search_on_reasons"),
        ("other grids", "search grids changed"),
        ("other data source", "data source changed (ml-100k + 50000 synthetic events (seed 0) → ml-100k)"),
        ("other components", "blend components changed"),
    ],
)
def test_each_reason_to_search_again(settings, case, expected):
    record, params, components = _record(settings), PARAMS, COMPONENTS
    champion = {
        "no champion": None,
        "champion without a record": (3, None),
        "record without a choice": (3, {k: v for k, v in record.items() if k != "choice"}),
        "choice this code cannot build": (3, record | {"choice": {**CHOICE.to_dict(), "unknown": 1}}),
        "old choice": (3, _record(settings, days_old=7.0)),
        "other grids": (3, record | {"fingerprint": "0" * 16}),
    }.get(case, (3, record))
    if case == "forced":
        params = PARAMS | {warm_start.FORCE_PARAM: True}
    if case == "drift":
        params = PARAMS | {"reason": "drift"}
    if case == "other data source":
        params = PARAMS | {"synthetic_events": 0}
    if case == "other components":
        components = ["als", "neural"]
    decision = _decide(settings, champion, params, components)
    assert decision.mode == warm_start.SEARCHED and decision.from_version is None
    assert expected in decision.reason
    assert decision.searched_at == NOW.isoformat(timespec="seconds") and not decision.segments_warm


def test_policy_always_searches_and_the_schedule_is_a_setting(settings):
    always = settings.model_copy(update={"training": settings.training.model_copy(update={"search": "always"})})
    assert _decide(always, (3, _record(always))).reason == "training.search is 'always'"
    monthly = settings.training.model_copy(update={"research_every_days": 30.0, "search_on_reasons": []})
    monthly = settings.model_copy(update={"training": monthly})
    record = _record(monthly, days_old=20.0)
    assert _decide(monthly, (3, record)).warm
    assert _decide(monthly, (3, record), params=PARAMS | {"reason": "drift"}).warm


def test_the_fingerprint_follows_the_search_grids_only(settings):
    base = warm_start.search_fingerprint(settings)
    wider = settings.training.model_copy(update={"blend_weight_grid": [0.0, 1.0]})
    assert warm_start.search_fingerprint(settings.model_copy(update={"training": wider})) != base
    tuning = settings.tuning.model_copy(update={"optuna_trials": 99})
    assert warm_start.search_fingerprint(settings.model_copy(update={"tuning": tuning})) != base
    # A component's own settings, where a run executes and the warm-start policy are not grids.
    neural = settings.neural.model_copy(update={"epochs": 99, "threads": 4, "nproc": 2})
    policy = settings.training.model_copy(update={"dataset": "/data/x", "research_every_days": 1.0, "als_rank": 8})
    assert warm_start.search_fingerprint(settings.model_copy(update={"neural": neural, "training": policy})) == base


def test_segment_parameters_are_reused_only_for_the_same_segmentation(settings):
    record = _record(settings)
    regrouped = _decide(settings, (3, record), segmentation={"method": "gmm", "k": 4})
    assert regrouped.warm and not regrouped.segments_warm
    assert regrouped.segment_tuning.startswith("searched: segmentation")
    untuned = _decide(settings, (3, {k: v for k, v in record.items() if k != "tuning"}))
    assert untuned.warm and not untuned.segments_warm
