"""Online experiments without servers: assignment, team-draft interleaving, the descriptor,
the cache entry's impression splice, the always-valid test and the report's verdicts."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from core.settings import ExperimentSettings
from serving.arms import with_impression
from serving.experiment import (
    CHALLENGER_ARM,
    CHAMPION_ARM,
    INTERLEAVED,
    Experiment,
    assign,
    bucket,
    team_draft,
)
from serving.experiment_report import msprt, preference, report, two_proportions


def test_assignment_is_a_pure_function_of_experiment_and_user() -> None:
    # Golden values: a change of the hash would move every running experiment's users.
    assert bucket("exp-golden", "user-42") == pytest.approx(0.8146016346737699)
    assert [assign("exp-golden", f"u{n}", 0.5) for n in range(6)] == [
        CHAMPION_ARM,
        CHALLENGER_ARM,
        CHAMPION_ARM,
        CHAMPION_ARM,
        CHAMPION_ARM,
        CHALLENGER_ARM,
    ]
    # A larger share only adds users to the challenger: nobody moves the other way.
    small = {u for u in (f"u{n}" for n in range(5000)) if assign("exp-golden", u, 0.1) == CHALLENGER_ARM}
    large = {u for u in (f"u{n}" for n in range(5000)) if assign("exp-golden", u, 0.3) == CHALLENGER_ARM}
    assert small < large


@pytest.mark.parametrize("share", [0.1, 0.5])
def test_share_holds_within_one_percent_over_100k_users(share: float) -> None:
    users = [f"sim-user-{n}" for n in range(100_000)]
    on_challenger = sum(assign("exp-share", u, share) == CHALLENGER_ARM for u in users)
    assert abs(on_challenger / len(users) - share) < 0.01


def test_experiments_assign_independently() -> None:
    users = [f"u{n}" for n in range(20_000)]
    a = np.array([assign("exp-a", u, 0.5) == CHALLENGER_ARM for u in users])
    b = np.array([assign("exp-b", u, 0.5) == CHALLENGER_ARM for u in users])
    assert abs((a & b).mean() - 0.25) < 0.02  # not the same split again


def test_descriptor_round_trip_and_validation() -> None:
    experiment = Experiment("exp-1", "v7", 0.2, "interleaving", registered_version=7, champion="v6")
    again = Experiment.from_json(experiment.to_json())
    assert again == experiment
    assert again.arm("anyone") == INTERLEAVED
    assert Experiment("exp-2", "v7", 0.999).arm("u1") in (CHAMPION_ARM, CHALLENGER_ARM)
    for bad in ({"share": 0.0}, {"share": 1.0}, {"design": "bandit"}, {"id": "bad id"}):
        with pytest.raises(ValueError):
            Experiment(**{"id": "e", "challenger": "v1", "share": 0.5, **bad})  # type: ignore[arg-type]


def test_team_draft_alternates_and_takes_each_teams_best() -> None:
    a = ["a1", "a2", "a3", "s1", "a4"]
    b = ["s1", "b1", "b2", "b3", "a1"]
    items, teams = team_draft(a, b, 6, "seed")
    assert len(items) == len(set(items)) == 6 and len(teams) == 6
    for n in range(1, 7):
        assert abs(teams[:n].count("A") - teams[:n].count("B")) <= 1
    # Each team's picks appear in the order of its own ranking.
    for team, ranking in (("A", a), ("B", b)):
        picked = [item for item, t in zip(items, teams) if t == team]
        assert picked == [item for item in ranking if item in picked]
    # The same seed gives the same list (a cached list and a recomputed one agree).
    assert team_draft(a, b, 6, "seed") == (items, teams)
    # Over many seeds either team opens as often.
    openers = [team_draft(a, b, 2, f"s{n}")[1][0] for n in range(2000)]
    assert abs(openers.count("A") / 2000 - 0.5) < 0.05


def test_team_draft_fills_from_the_longer_ranking() -> None:
    items, teams = team_draft(["x"], ["y1", "y2", "y3"], 4, "s")
    assert sorted(items) == ["x", "y1", "y2", "y3"] and teams.count("A") == 1


def test_impression_id_is_spliced_into_valid_json() -> None:
    body = json.dumps({"user_id": "u1", "items": [{"item_id": "i}"}]}).encode()
    spliced = json.loads(with_impression(body, "ab" * 16))
    assert spliced["impression_id"] == "ab" * 16 and spliced["items"] == [{"item_id": "i}"}]


def test_msprt_is_calm_without_effect_and_decides_with_one() -> None:
    ratio, p = msprt(0.0, 1e-4, 0.05)
    assert ratio < 1 and p == 1.0
    ratio, p = msprt(0.1, 1e-4, 0.05)
    assert ratio > 1e6 and p < 1e-6
    assert msprt(0.1, 0.0, 0.05) == (1.0, 1.0)
    same = two_proportions(30, 100, 30, 100, 0.05)
    assert same.effect == 0 and same.ratio < 20
    better = two_proportions(100, 1000, 300, 1000, 0.05)
    assert better.effect == pytest.approx(0.2) and better.ratio > 20 and better.z > 0
    assert preference(80, 20, 0.05).effect == pytest.approx(0.3)
    assert preference(0, 0, 0.05).ratio == 1.0


def test_msprt_false_decision_rate_under_continuous_peeking() -> None:
    """Under no effect, peeking after every 50 impressions up to 5,000 per arm decides wrongly
    in at most alpha of the runs (a fixed-horizon z-test peeked as often would exceed it)."""
    rng = np.random.default_rng(0)
    runs, alpha, wrong, naive_wrong = 200, 0.05, 0, 0
    for _ in range(runs):
        a = rng.random(5000) < 0.2
        b = rng.random(5000) < 0.2
        decided = naive = False
        for n in range(50, 5001, 50):
            test = two_proportions(int(a[:n].sum()), n, int(b[:n].sum()), n, 0.05)
            decided |= test.ratio >= 1 / alpha
            naive |= test.z_p_value < alpha
        wrong += decided
        naive_wrong += naive
    assert wrong / runs <= alpha
    assert naive_wrong / runs > alpha  # what the correction is for


def _impressions(arm_of: dict[str, str], items: list[str], teams: str | None = None) -> pd.DataFrame:
    rows = []
    for n, (user, arm) in enumerate(arm_of.items()):
        rows.append(
            {
                "impression_id": f"{n:032x}",
                "experiment_id": "e",
                "user_id": user,
                "arm": arm,
                "items": json.dumps(items),
                "teams": teams or ("B" if arm == CHALLENGER_ARM else "A") * len(items),
                "latency_ms": str(1.0 + n % 10),
            }
        )
    return pd.DataFrame(rows)


def _clicks_on(impressions: pd.DataFrame, position_of: dict[str, int | None]) -> pd.DataFrame:
    rows = []
    for imp_id, user, items in zip(impressions["impression_id"], impressions["user_id"], impressions["items"]):
        pos = position_of.get(user)
        if pos is not None:
            rows.append(
                {
                    "impression_id": imp_id,
                    "event_id": f"e-{imp_id}",
                    "user_id": user,
                    "item_id": json.loads(items)[pos - 1],
                    "event_type": "click",
                    "rating": "",
                }
            )
    return pd.DataFrame(rows)


def test_ab_report_metrics_and_verdicts() -> None:
    cfg = ExperimentSettings(min_impressions=100)
    users = {f"u{n}": (CHALLENGER_ARM if n % 2 else CHAMPION_ARM) for n in range(1000)}
    imp = _impressions(users, [f"i{n}" for n in range(10)])
    # Challenger users click at position 1 in 60 %, champion users at position 2 in 20 %.
    rng = np.random.default_rng(1)
    positions = {
        u: (1 if rng.random() < 0.6 else None) if arm == CHALLENGER_ARM else (2 if rng.random() < 0.2 else None)
        for u, arm in users.items()
    }
    out = report(Experiment("e", "v2", 0.5, catalogue_size=100), imp, _clicks_on(imp, positions), cfg, 10)
    assert out["verdict"] == "better" and out["users"] == 1000
    champ, chall = out["arms"][CHAMPION_ARM], out["arms"][CHALLENGER_ARM]
    assert champ["impressions"] == chall["impressions"] == 500
    assert chall["ctr"] == pytest.approx(chall["mrr"])  # first click always at position 1
    assert champ["mrr"] == pytest.approx(champ["ctr"] / 2)  # always at position 2
    assert champ["coverage"] == pytest.approx(0.1) and champ["distinct_items"] == 10
    assert champ["p99_latency_ms"] == pytest.approx(9.0)  # latencies 1, 3, 5, 7, 9 ms
    # Swapped roles: the worse challenger is called worse, never better.
    swapped = {u: (CHAMPION_ARM if a == CHALLENGER_ARM else CHALLENGER_ARM) for u, a in users.items()}
    imp2 = _impressions(swapped, [f"i{n}" for n in range(10)])
    pos2 = {u: positions[u] for u in swapped}
    assert report(Experiment("e", "v2", 0.5), imp2, _clicks_on(imp2, pos2), cfg, 10)["verdict"] == "worse"
    # Too few impressions per arm: unknown whatever the numbers say.
    few = ExperimentSettings(min_impressions=600)
    assert report(Experiment("e", "v2", 0.5), imp, _clicks_on(imp, positions), few, 10)["verdict"] == "unknown"
    # A click beyond k does not count for CTR@k.
    late = report(Experiment("e", "v2", 0.5), imp, _clicks_on(imp, {u: 10 for u in users}), cfg, 5)
    assert late["arms"][CHALLENGER_ARM]["ctr"] == 0.0


def test_interleaving_credits_the_team_that_placed_the_clicked_item() -> None:
    cfg = ExperimentSettings(min_impressions=50)
    users = {f"u{n}": INTERLEAVED for n in range(300)}
    imp = _impressions(users, ["i1", "i2", "i3", "i4"], teams="ABAB")
    # 80 % of users click position 2 (team B), the rest position 1 (team A).
    positions = {u: (2 if n % 5 else 1) for n, u in enumerate(users)}
    out = report(Experiment("e", "v2", 0.5, "interleaving"), imp, _clicks_on(imp, positions), cfg, 4)
    assert out["interleaving"] == {"challenger_wins": 240, "champion_wins": 60, "ties": 0}
    assert out["verdict"] == "better"
    assert out["arms"][CHALLENGER_ARM]["ctr"] == pytest.approx(0.8)
    assert math.isclose(out["test"]["effect"], 0.3)
