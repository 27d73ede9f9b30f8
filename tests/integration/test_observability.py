"""The Prometheus config, alert rules and Grafana dashboard in ``docker/`` are valid (promtool),
the rules behave as their unit tests say, and every metric they use is exported by a real
``/metrics``: the serving app on a published bundle (single-process and multiprocess mode) and
the platform metrics of ``hyperrec up``.

Run as a script (``python test_observability.py OUT CREATED_AT``), this module scrapes the
serving app once and writes ``OUT`` (used for the multiprocess-mode scrape, which needs
``PROMETHEUS_MULTIPROC_DIR`` set before ``prometheus_client`` is imported).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "docker" / "prometheus"
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "hyperrec.json"
CREATED_AT = datetime(2025, 1, 2, 3, 4, 5, 500000, tzinfo=UTC)
BUILTIN = {"up"}
"""Series Prometheus adds to every scrape itself (not in any /metrics text)."""
SCRAPE_LABELS = {"job", "instance"}
"""Target labels Prometheus attaches to every scraped sample."""
RECS = "/v1/recommendations/{user_id}"


# ------------------------------------------------------------------------------- promtool


def promtool(*args: str, cwd: Path = PROMETHEUS_DIR) -> str:
    """Run promtool; fail (never skip) when it is not installed."""
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail("promtool is not installed: `apt-get install prometheus`")
    done = subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"promtool {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def test_promtool_checks_config_rules_and_rule_unit_tests() -> None:
    out = promtool("check", "config", "prometheus.yml")
    assert "SUCCESS: 1 rule files found" in out  # rule_files resolved next to prometheus.yml
    promtool("check", "rules", "alerts.yml")
    assert "SUCCESS" in promtool("test", "rules", "alerts_test.yml")


def test_every_alert_has_a_promtool_unit_test() -> None:
    tested = {
        case["alertname"]
        for test in yaml.safe_load((PROMETHEUS_DIR / "alerts_test.yml").read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert set(alert_names()) == tested


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """Every dashboard query, with Grafana's interval variables filled in, is valid PromQL."""
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{n}", "expr": grafana_to_promql(expr)}
                    for n, expr in enumerate(dashboard_exprs())
                ],
            }
        ]
    }
    (tmp_path / "dashboard_rules.yml").write_text(yaml.safe_dump(rules))
    promtool("check", "rules", "dashboard_rules.yml", cwd=tmp_path)


# ------------------------------------------------------------------------------- expressions


def alert_names() -> list[str]:
    groups = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
    return [rule["alert"] for group in groups for rule in group["rules"]]


def rule_exprs() -> list[str]:
    groups = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    def walk(panels: list[dict]):
        for panel in panels:
            yield from (t["expr"] for t in panel.get("targets", []) if t.get("expr"))
            yield from walk(panel.get("panels", []))

    return list(walk(json.loads(DASHBOARD.read_text())["panels"]))


def grafana_to_promql(expr: str) -> str:
    """Replace Grafana's ``$__rate_interval``-style variables by a fixed range."""
    return re.sub(r"\$__\w+|\$\{__\w+\}", "5m", expr)


_TOKEN = re.compile(
    r"""
    (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<number>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?(?:ms|[smhdwy])*)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=(){}\[\],])
  | (?P<space>\s+)
""",
    re.VERBOSE,
)
_LABEL_LIST_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_KEYWORDS = _LABEL_LIST_KEYWORDS | {
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "group",
}


def selectors(expr: str) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """The metric selectors of a PromQL expression: ``(metric name, [(label, op, value)])``.

    A small lexer: identifiers that are not keywords, aggregations or functions (followed by
    ``(``) and not inside a ``by``/``without``/``on``/``ignoring``/``group_*`` label list are
    metric names; a following ``{...}`` holds their label matchers.
    """
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if m is None:
            raise ValueError(f"cannot lex {expr[pos : pos + 20]!r} in {expr!r}")
        pos = m.end()
        if m.lastgroup != "space":
            tokens.append((m.lastgroup, m.group()))
    found: list[tuple[str, list[tuple[str, str, str]]]] = []
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1][1] if i + 1 < len(tokens) else None
        if kind == "ident" and text in _LABEL_LIST_KEYWORDS and following == "(":
            i = next(j for j in range(i, len(tokens)) if tokens[j][1] == ")") + 1
            continue
        if kind == "ident" and text not in _KEYWORDS and following != "(":
            matchers: list[tuple[str, str, str]] = []
            i += 1
            if following == "{":
                close = next(j for j in range(i, len(tokens)) if tokens[j][1] == "}")
                inner = [t for t in tokens[i + 1 : close] if t[1] != ","]
                for n in range(0, len(inner), 3):
                    label, op, value = (t[1] for t in inner[n : n + 3])
                    matchers.append((label, op, json.loads(value) if value.startswith('"') else value[1:-1]))
                i = close + 1
            found.append((text, matchers))
            continue
        i += 1
    return found


@pytest.mark.parametrize(
    "expr, expected",
    [
        (
            'histogram_quantile(0.99, sum by (le, route) (rate(a_bucket{route=~"/v1/{x}", m!="b"}[5m]))) > 0.05',
            [("a_bucket", [("route", "=~", "/v1/{x}"), ("m", "!=", "b")])],
        ),
        (
            "(sum(rate(x_total[$__rate_interval])) or vector(0)) / ignoring(status) group_left sum without (pid) (y)",
            [("x_total", []), ("y", [])],
        ),
        ("max by (job) (time() - (g > 0)) > 2 * 86400 and on(job) up == 0", [("g", []), ("up", [])]),
    ],
)
def test_selector_extraction(expr: str, expected: list) -> None:
    assert selectors(grafana_to_promql(expr)) == expected


# ------------------------------------------------------------------------------- real /metrics


def scrape_serving(work: Path, created_at: str) -> dict:
    """Publish a bundle created at ``created_at`` and drive the real serving app: one request
    before it is published (503), then a miss, a cache hit and an event; return the statuses
    and the text of ``GET /metrics``."""
    from fastapi.testclient import TestClient

    if str(ROOT / "tests") not in sys.path:  # run as a script (multiprocess mode): not through pytest
        sys.path.insert(0, str(ROOT / "tests"))
    from fixtures_serving import tiny_bundle

    from core.object_store import ObjectStore
    from core.settings import load_settings
    from serving.app import create_app
    from serving.store import publish

    settings = load_settings(
        home=str(work / "home"),
        object_store={"uri": str(work / "store")},
        online_store={"url": None},
        serving={"reload_interval_s": 0},
    )
    bundle = tiny_bundle(work / "build", "v1")
    meta_path = bundle / "metadata.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "created_at": created_at}))
    statuses = {}
    with TestClient(create_app(settings)) as client:
        statuses["before_publish"] = client.get("/v1/recommendations/u1").status_code
        publish(bundle, ObjectStore(settings.object_store_uri), "v1")
        client.app.state.serving.refresh()  # what the poller does (/readyz only reports)
        statuses["ready"] = client.get("/readyz").status_code
        miss = client.get("/v1/recommendations/u1", params={"k": 3})
        hit = client.get("/v1/recommendations/u1", params={"k": 3})
        statuses["cache"] = [miss.headers.get("x-cache"), hit.headers.get("x-cache")]
        statuses["event"] = client.post(
            "/v1/events", json={"user_id": "u1", "item_id": "i4", "event_type": "click"}
        ).status_code
        metrics = client.get("/metrics")
        statuses["metrics"] = metrics.status_code
        return {"statuses": statuses, "text": metrics.text}


def platform_text() -> str:
    from hyperrec.platform_metrics import PlatformMetrics

    platform = PlatformMetrics()
    platform.set_service("serving", up=True, restarts=1, pid=4242)
    platform.set_service("airflow-scheduler", up=False, restarts=3, pid=None)
    platform.set_dag_runs(
        {("recsys_training", "failed"): 1, ("recsys_training", "success"): 2, ("recsys_drift_monitor", "success"): 24}
    )
    body, content_type = platform.render()
    assert content_type.startswith("text/plain")
    return body.decode()


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    from prometheus_client.parser import text_string_to_metric_families

    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples]


def _matches(labels: dict[str, str], label: str, op: str, value: str) -> bool:
    actual = labels.get(label, "")
    return {
        "=": actual == value,
        "!=": actual != value,
        "=~": re.fullmatch(value, actual) is not None,
        "!~": re.fullmatch(value, actual) is None,
    }[op]


@pytest.fixture(scope="module")
def serving_scrape(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Single-process mode (the default ``hyperrec serve``), in this process."""
    return scrape_serving(tmp_path_factory.mktemp("single"), CREATED_AT.isoformat())


@pytest.fixture(scope="module")
def multiprocess_scrape(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Multiprocess mode (``hyperrec serve --workers N``), in a subprocess with
    ``PROMETHEUS_MULTIPROC_DIR`` set; ``created_at`` is given naive (meaning UTC)."""
    work = tmp_path_factory.mktemp("multi")
    (work / "prom").mkdir()
    env = {
        **os.environ,
        "PROMETHEUS_MULTIPROC_DIR": str(work / "prom"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    naive = CREATED_AT.replace(tzinfo=None).isoformat()
    done = subprocess.run(
        [sys.executable, __file__, str(work), naive], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((work / "scrape.json").read_text())


@pytest.mark.parametrize("mode", ["serving_scrape", "multiprocess_scrape"])
def test_every_metric_in_rules_and_dashboard_is_exported(mode: str, request: pytest.FixtureRequest) -> None:
    """Each selector of the alert rules and the dashboard names a sample of a real /metrics
    (serving or platform), and its label matchers select at least one of those samples."""
    scrape = request.getfixturevalue(mode)
    assert scrape["statuses"] == {
        "before_publish": 503,
        "ready": 200,
        "cache": ["miss", "hit"],
        "event": 202,
        "metrics": 200,
    }
    exported = samples(scrape["text"]) + samples(platform_text())
    names = {name for name, _, _ in exported}
    used = [
        (source, expr, name, matchers)
        for source, exprs in (("alerts.yml", rule_exprs()), ("hyperrec.json", dashboard_exprs()))
        for expr in exprs
        for name, matchers in selectors(grafana_to_promql(expr))
    ]
    used_names = {name for _, _, name, _ in used}
    assert {
        "hyperrec_request_latency_seconds_bucket",
        "hyperrec_requests_total",
        "hyperrec_cache_requests_total",
        "hyperrec_model_created_timestamp_seconds",
        "hyperrec_dag_runs",
        "hyperrec_service_up",
        "hyperrec_service_restarts_total",
    } <= used_names
    missing = sorted({f"{name} ({source})" for source, _, name, _ in used if name not in names | BUILTIN})
    assert not missing, f"used but not exported: {missing}"
    unmatched = []
    for source, expr, name, matchers in used:
        if name in BUILTIN:
            continue
        checked = [m for m in matchers if m[0] not in SCRAPE_LABELS]
        if not any(n == name and all(_matches(labels, *m) for m in checked) for n, labels, _ in exported):
            unmatched.append(f"{source}: {name}{checked} in {expr!r}")
    assert not unmatched, "selectors matching no exported sample:\n" + "\n".join(unmatched)


@pytest.mark.parametrize("mode", ["serving_scrape", "multiprocess_scrape"])
def test_model_age_gauge_is_the_bundle_created_at(mode: str, request: pytest.FixtureRequest) -> None:
    values = [
        (labels, value)
        for name, labels, value in samples(request.getfixturevalue(mode)["text"])
        if name == "hyperrec_model_created_timestamp_seconds"
    ]
    assert len(values) == 1, values
    labels, value = values[0]
    assert value == pytest.approx(CREATED_AT.timestamp(), abs=1e-3)
    if mode == "multiprocess_scrape":  # one series per live worker
        assert set(labels) == {"pid"}
    else:
        assert labels == {}


def test_platform_metrics_values() -> None:
    exported = {(name, tuple(sorted(labels.items()))): value for name, labels, value in samples(platform_text())}
    assert exported[("hyperrec_service_up", (("service", "serving"),))] == 1.0
    assert exported[("hyperrec_service_up", (("service", "airflow-scheduler"),))] == 0.0
    assert exported[("hyperrec_service_restarts_total", (("service", "airflow-scheduler"),))] == 3.0
    assert exported[("hyperrec_service_pid", (("service", "serving"),))] == 4242.0
    assert exported[("hyperrec_service_pid", (("service", "airflow-scheduler"),))] == 0.0
    assert exported[("hyperrec_dag_runs", (("dag_id", "recsys_training"), ("state", "failed")))] == 1.0
    # every DAG gets the standard states, 0 when none
    assert exported[("hyperrec_dag_runs", (("dag_id", "recsys_drift_monitor"), ("state", "failed")))] == 0.0
    assert exported[("hyperrec_dag_runs", (("dag_id", "recsys_drift_monitor"), ("state", "success")))] == 24.0


def test_platform_dag_runs_are_replaced_not_merged() -> None:
    from hyperrec.platform_metrics import PlatformMetrics

    platform = PlatformMetrics()
    platform.set_dag_runs({("old_dag", "failed"): 2})
    platform.set_dag_runs({("recsys_training", "success"): 1})
    text = platform.render()[0].decode()
    assert "old_dag" not in text and 'hyperrec_dag_runs{dag_id="recsys_training",state="success"} 1.0' in text
    with pytest.raises(ValueError):
        platform.set_service("serving", up=True, restarts=-1, pid=None)


if __name__ == "__main__":
    out_dir, created = Path(sys.argv[1]), sys.argv[2]
    result = scrape_serving(out_dir, created)
    (out_dir / "scrape.json").write_text(json.dumps(result))
