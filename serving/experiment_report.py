"""An experiment's evidence and decision: its streams drained into Parquet, the online metrics
per arm, an always-valid test and the verdict, and a "better" verdict's promotion.

Recording (:func:`drain`): the impression and outcome streams of :mod:`serving.experiment`
are read through the consumer group :data:`GROUP` and written, one Parquet file per batch,
under ``<home>/experiments/<id>/impressions/`` and ``.../outcomes/``; entries are acknowledged
only once their file is written (a crash in between re-reads the pending entries, and the
report drops repeated impression and event ids). So a report can be recomputed from the
files alone (:func:`load`).

Metrics per arm (:func:`arm_metrics`), from impressions joined to their outcomes by
impression id; a *click* is an attributed event of any type but ``view`` on an item of the
list, credited to the arm that served the list (A/B) or to the team that placed the clicked
item (interleaving):

- ``impressions``: lists served; ``users``: distinct users served;
- ``ctr``: share of impressions with at least one click within the top ``k`` (CTR@k);
- ``mrr``: mean over impressions of 1 / (position of the first click), 0 without a click;
- ``mean_rating``: mean rating of the ``rate`` events (None without one);
- ``coverage``: distinct items served / catalogue size (None when the size is unknown),
  and ``distinct_items``;
- ``p99_latency_ms``: the 99th percentile of the time each list took to answer.

The test (:func:`msprt`) is the mixture sequential probability ratio test of Johari, Pekelis
and Walsh ("Always valid inference", 2017) on a normal approximation: with effect estimate
``d``, its variance ``V`` and a normal mixture N(0, ``tau``²) over the effect, the likelihood
ratio is ``sqrt(V / (V + tau²)) · exp(d² tau² / (2 V (V + tau²)))``. Rejecting "no effect"
once it reaches ``1/alpha`` keeps the false-decision rate at most ``alpha`` however often
the report is read (continuous peeking), unlike a fixed-horizon z-test; the p-value it
reports, ``min(1, 1/ratio)``, is always valid in the same sense.

- A/B: ``d`` = challenger CTR − champion CTR, ``V = p₁(1−p₁)/n₁ + p₀(1−p₀)/n₀`` (two
  proportions; never below the pooled variance, so a run of zeros is not certainty). The
  fixed-horizon two-proportion z and its p-value are reported alongside, for reference only.
- Interleaving: among the impressions where one team got more clicks than the other, ``d`` =
  the challenger's share of wins − 0.5 and ``V = max(p(1−p), 0.25/n)/n``.

Verdict: ``better`` / ``worse`` when the ratio reaches ``1/alpha`` (and each arm has
``experiment.min_impressions`` impressions, or decisive impressions for interleaving) with
``d`` above / below 0; else ``unknown``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import redis

from core.files import write_atomic
from core.settings import ExperimentSettings, Settings
from serving.experiment import CHALLENGER_ARM, CHAMPION_ARM, INTERLEAVED, Experiment, impressions_key, outcomes_key

GROUP = "experiment-report"
"""Consumer group of :func:`drain` on both streams."""
NOT_A_CLICK = frozenset({"view"})
BATCH = 10_000


def experiment_dir(settings: Settings, experiment_id: str) -> Path:
    """``<home>/experiments/<id>``: the descriptor copy, the Parquet record and the reports."""
    return settings.home / "experiments" / experiment_id


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _ensure_group(client: redis.Redis, key: str) -> None:
    try:
        client.xgroup_create(key, GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def _write_part(directory: Path, first_id: str, rows: list[dict[str, str]]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"part-{first_id.replace('-', '_')}.parquet"
    frame = pd.DataFrame(rows)
    write_atomic(path, lambda tmp: frame.to_parquet(tmp, index=False))
    return path


def _rows(stream_id: str, fields: dict) -> list[dict[str, str]]:
    """The records of one stream entry: a batch of impressions (field ``impressions``, a JSON
    array, :class:`serving.experiment.ExperimentLog`) or one outcome."""
    entry = {_text(k): _text(v) for k, v in fields.items()}
    if "impressions" in entry:
        return [{"stream_id": stream_id, **row} for row in json.loads(entry["impressions"])]
    return [{"stream_id": stream_id, **entry}]


def drain_stream(client: redis.Redis, key: str, directory: Path, consumer: str = "report") -> int:
    """Move every entry of stream ``key`` not yet acknowledged by :data:`GROUP` into Parquet
    files under ``directory`` (pending entries of an earlier, interrupted drain first), each
    acknowledged once its file is written. Returns how many records (impressions, outcomes)
    were written."""
    _ensure_group(client, key)
    written = 0
    for start in ("0", ">"):  # "0": this consumer's pending entries; ">": new ones
        while True:
            reply: Any = client.xreadgroup(GROUP, consumer, {key: start}, count=BATCH)
            entries: list[Any] = reply[0][1] if reply else []
            entries = [(eid, fields) for eid, fields in entries if fields]
            if not entries:
                break
            rows = [row for eid, fields in entries for row in _rows(_text(eid), fields)]
            if rows:
                _write_part(directory, _text(entries[0][0]), rows)
            client.xack(key, GROUP, *[eid for eid, _ in entries])
            written += len(rows)
    return written


def drain(settings: Settings, experiment_id: str, client: redis.Redis) -> dict[str, int]:
    """:func:`drain_stream` of both streams of ``experiment_id`` into :func:`experiment_dir`."""
    ns, out = settings.serving.namespace, experiment_dir(settings, experiment_id)
    return {
        "impressions": drain_stream(client, impressions_key(ns, experiment_id), out / "impressions"),
        "outcomes": drain_stream(client, outcomes_key(ns, experiment_id), out / "outcomes"),
    }


def _read(directory: Path) -> pd.DataFrame:
    files = sorted(directory.glob("part-*.parquet"))
    if not files:
        return pd.DataFrame()
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def load(settings: Settings, experiment_id: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The recorded impressions and outcomes (each id once)."""
    out = experiment_dir(settings, experiment_id)
    impressions, outcomes = _read(out / "impressions"), _read(out / "outcomes")
    if not impressions.empty:
        impressions = impressions.drop_duplicates("impression_id")
    if not outcomes.empty:
        outcomes = outcomes.drop_duplicates("event_id")
    return impressions, outcomes


@dataclass(frozen=True)
class Test:
    """One always-valid test: the effect estimate, its standard error, the mSPRT ratio and
    p-value, and (A/B) the fixed-horizon z and two-sided p."""

    effect: float
    se: float
    ratio: float
    p_value: float
    z: float
    z_p_value: float


def msprt(effect: float, variance: float, tau: float) -> tuple[float, float]:
    """(likelihood ratio, always-valid p-value) of the normal-mixture SPRT for an estimate
    ``effect`` with ``variance`` and mixture standard deviation ``tau`` (module docstring).
    Zero variance (no data, or no variation) gives ratio 1, p 1."""
    if variance <= 0 or not math.isfinite(variance):
        return 1.0, 1.0
    t2 = tau * tau
    log_ratio = 0.5 * math.log(variance / (variance + t2)) + effect * effect * t2 / (2 * variance * (variance + t2))
    ratio = math.exp(min(log_ratio, 700.0))
    return ratio, min(1.0, 1.0 / ratio)


def _normal_p(z: float) -> float:
    return math.erfc(abs(z) / math.sqrt(2))


def two_proportions(clicks_a: int, n_a: int, clicks_b: int, n_b: int, tau: float) -> Test:
    """B (challenger) against A (champion): ``d = p_B - p_A`` (module docstring)."""
    if n_a == 0 or n_b == 0:
        return Test(0.0, math.inf, 1.0, 1.0, 0.0, 1.0)
    pa, pb = clicks_a / n_a, clicks_b / n_b
    var = pa * (1 - pa) / n_a + pb * (1 - pb) / n_b
    pooled = (clicks_a + clicks_b) / (n_a + n_b)
    pooled_var = pooled * (1 - pooled) * (1 / n_a + 1 / n_b)
    var = max(var, pooled_var, 0.25 / (n_a + n_b) ** 2)  # never certain from a run of zeros
    z = (pb - pa) / math.sqrt(pooled_var) if pooled_var > 0 else 0.0
    ratio, p = msprt(pb - pa, var, tau)
    return Test(pb - pa, math.sqrt(var), ratio, p, z, _normal_p(z))


def preference(wins_b: int, wins_a: int, tau: float) -> Test:
    """Interleaving: the challenger's share of decisive impressions against 0.5."""
    n = wins_a + wins_b
    if n == 0:
        return Test(0.0, math.inf, 1.0, 1.0, 0.0, 1.0)
    share = wins_b / n
    var = max(share * (1 - share), 0.25 / n) / n  # floored: a unanimous start is not certainty
    z = (share - 0.5) / math.sqrt(0.25 / n)
    ratio, p = msprt(share - 0.5, var, tau)
    return Test(share - 0.5, math.sqrt(var), ratio, p, z, _normal_p(z))


def _clicks(impressions: pd.DataFrame, outcomes: pd.DataFrame, k: int) -> pd.DataFrame:
    """Impressions with, per impression: the list, teams, first click position (0: none),
    clicks per team within ``k``."""
    imp = impressions.copy()
    imp["item_list"] = imp["items"].map(json.loads)
    imp["first_click"] = 0
    imp["clicks_a"] = 0
    imp["clicks_b"] = 0
    imp["clicks"] = 0
    if outcomes.empty:
        return imp
    clicks = outcomes[~outcomes["event_type"].isin(NOT_A_CLICK)]
    by_impression = clicks.groupby("impression_id")["item_id"].apply(list).to_dict()
    first, team_a, team_b, total = [], [], [], []
    for imp_id, items, teams in zip(imp["impression_id"], imp["item_list"], imp["teams"]):
        clicked = set(by_impression.get(imp_id, ()))
        positions = [pos for pos, item in enumerate(items[:k], 1) if item in clicked]
        first.append(positions[0] if positions else 0)
        team_a.append(sum(1 for pos in positions if teams[pos - 1] == "A"))
        team_b.append(sum(1 for pos in positions if teams[pos - 1] == "B"))
        total.append(len(positions))
    imp["first_click"], imp["clicks_a"], imp["clicks_b"], imp["clicks"] = first, team_a, team_b, total
    return imp


def arm_metrics(
    imp: pd.DataFrame, outcomes: pd.DataFrame, catalogue_size: int | None, team: str | None = None
) -> dict[str, Any]:
    """The online metrics (module docstring) of the impressions ``imp`` (from :func:`_clicks`);
    with ``team`` (interleaving), clicks and coverage count only that team's positions."""
    n = len(imp)
    if team is None:
        clicked, first = imp["clicks"] > 0, imp["first_click"]
        served = {item for items in imp["item_list"] for item in items}
    else:
        column = "clicks_a" if team == "A" else "clicks_b"
        clicked, first = imp[column] > 0, imp["first_click"].where(imp[column] > 0, 0)
        served = {it for items, ts in zip(imp["item_list"], imp["teams"]) for it, t in zip(items, ts) if t == team}
    ids = set(imp["impression_id"])
    ratings = pd.Series(dtype=float)
    if not outcomes.empty:
        rated = outcomes[(outcomes["event_type"] == "rate") & outcomes["impression_id"].isin(ids)]
        ratings = pd.to_numeric(rated["rating"], errors="coerce").dropna()
    latency = pd.to_numeric(imp["latency_ms"], errors="coerce").dropna() if n else pd.Series(dtype=float)
    return {
        "impressions": int(n),
        "users": int(imp["user_id"].nunique()) if n else 0,
        "clicked_impressions": int(clicked.sum()) if n else 0,
        "clicks": int(imp["clicks"].sum() if team is None else imp["clicks_a" if team == "A" else "clicks_b"].sum())
        if n
        else 0,
        "ctr": float(clicked.mean()) if n else None,
        "mrr": float(np.where(first > 0, 1.0 / first.clip(lower=1), 0.0).mean()) if n else None,
        "mean_rating": float(ratings.mean()) if len(ratings) else None,
        "distinct_items": len(served),
        "coverage": len(served) / catalogue_size if catalogue_size else None,
        "p99_latency_ms": float(np.percentile(latency, 99)) if len(latency) else None,
    }


def _verdict(test: Test, enough: bool, alpha: float) -> str:
    if not enough or test.ratio < 1.0 / alpha:
        return "unknown"
    return "better" if test.effect > 0 else "worse"


def report(
    experiment: Experiment, impressions: pd.DataFrame, outcomes: pd.DataFrame, cfg: ExperimentSettings, k: int
) -> dict[str, Any]:
    """The report of ``experiment`` over its records: design, per-arm metrics, the test and
    the verdict for the challenger (``better`` / ``worse`` / ``unknown``)."""
    out: dict[str, Any] = {
        "experiment": experiment.id,
        "design": experiment.design,
        "challenger": experiment.challenger,
        "registered_version": experiment.registered_version,
        "share": experiment.share,
        "k": k,
        "alpha": cfg.alpha,
        "mixture_sd": cfg.mixture_sd,
        "min_impressions": cfg.min_impressions,
    }
    if impressions.empty:
        return {**out, "arms": {}, "test": None, "verdict": "unknown", "users": 0}
    imp = _clicks(impressions, outcomes, k)
    out["users"] = int(imp["user_id"].nunique())
    if experiment.design == "interleaving":
        imp = imp[imp["arm"] == INTERLEAVED]
        out["arms"] = {
            CHAMPION_ARM: arm_metrics(imp, outcomes, experiment.catalogue_size, "A"),
            CHALLENGER_ARM: arm_metrics(imp, outcomes, experiment.catalogue_size, "B"),
        }
        wins_b = int((imp["clicks_b"] > imp["clicks_a"]).sum())
        wins_a = int((imp["clicks_a"] > imp["clicks_b"]).sum())
        test = preference(wins_b, wins_a, cfg.mixture_sd)
        out["interleaving"] = {
            "challenger_wins": wins_b,
            "champion_wins": wins_a,
            "ties": int(len(imp) - wins_a - wins_b),
        }
        enough = wins_a + wins_b >= cfg.min_impressions
    else:
        arms = {arm: imp[imp["arm"] == arm] for arm in (CHAMPION_ARM, CHALLENGER_ARM)}
        out["arms"] = {arm: arm_metrics(rows, outcomes, experiment.catalogue_size) for arm, rows in arms.items()}
        a, b = out["arms"][CHAMPION_ARM], out["arms"][CHALLENGER_ARM]
        test = two_proportions(
            a["clicked_impressions"], a["impressions"], b["clicked_impressions"], b["impressions"], cfg.mixture_sd
        )
        enough = min(a["impressions"], b["impressions"]) >= cfg.min_impressions
    out["test"] = {
        "method": "mSPRT (normal mixture), always valid",
        "effect": test.effect,
        "se": test.se,
        "likelihood_ratio": test.ratio,
        "threshold": 1.0 / cfg.alpha,
        "p_value": test.p_value,
        "z": test.z,
        "fixed_horizon_p_value": test.z_p_value,
    }
    out["verdict"] = _verdict(test, enough, cfg.alpha)
    return out


def format_report(result: dict[str, Any]) -> str:
    """The report as a few lines of text (the CLI prints it)."""
    lines = [
        f"experiment {result['experiment']} ({result['design']}, challenger {result['challenger']}): "
        f"verdict {result['verdict'].upper()} after {result.get('users', 0)} users"
    ]
    for arm, m in result.get("arms", {}).items():

        def f(v: Any, spec: str = ".4f") -> str:
            return "-" if v is None else format(v, spec)

        lines.append(
            f"  {arm:<10} impressions {m['impressions']:>7}  CTR@{result['k']} {f(m['ctr'])}  MRR {f(m['mrr'])}  "
            f"rating {f(m['mean_rating'], '.2f')}  items {m['distinct_items']} (coverage {f(m['coverage'], '.3f')})  "
            f"p99 {f(m['p99_latency_ms'], '.2f')} ms"
        )
    test = result.get("test")
    if test:
        lines.append(
            f"  test: effect {test['effect']:+.4f} (se {test['se']:.4f}), likelihood ratio "
            f"{test['likelihood_ratio']:.3g} vs {test['threshold']:.3g}, always-valid p {test['p_value']:.4f} "
            f"(fixed-horizon p {test['fixed_horizon_p_value']:.4f})"
        )
    return "\n".join(lines)


def promote(settings: Settings, experiment: Experiment, result: dict[str, Any]) -> dict:
    """Make a challenger judged ``better`` the champion through the registry's promotion
    path (:func:`training.registry.promote_version`, who: ``experiment <id>``), with the
    evidence (verdict, test, per-arm metrics) on the version's tags and description. The
    publisher then publishes it and serving follows without a restart."""
    from core.tracking import configure
    from training.registry import RegistryError, promote_version

    if result["verdict"] != "better":
        raise RegistryError(f"experiment {experiment.id}: verdict {result['verdict']}, nothing to promote")
    if experiment.registered_version is None:
        raise RegistryError(f"experiment {experiment.id}: challenger {experiment.challenger} is not a registry version")
    test = result["test"]
    reason = (
        f"online experiment {experiment.id} ({experiment.design}): challenger better, effect {test['effect']:+.4f}, "
        f"always-valid p {test['p_value']:.4g} < alpha {result['alpha']} after {result['users']} users"
    )
    record = promote_version(
        settings, experiment.registered_version, reason, user=f"experiment {experiment.id}", by="experiment"
    )
    client, name = configure(settings), settings.mlflow.registered_model
    tags = {
        "experiment.id": experiment.id,
        "experiment.design": experiment.design,
        "experiment.verdict": result["verdict"],
        "experiment.users": str(result["users"]),
        "experiment.p_value": f"{test['p_value']:.6g}",
        "experiment.effect": f"{test['effect']:.6g}",
        "experiment.evidence": json.dumps({"arms": result["arms"], "test": test}, sort_keys=True, default=str)[:4900],
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, str(experiment.registered_version), key, value)
    return record
