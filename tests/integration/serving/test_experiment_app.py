"""An online experiment in the serving app: the traffic split (fast path and route), per-arm
cache, headers, impression ids, attribution and the streams a report reads, on a real Valkey."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from fixtures_serving import tiny_bundle

from core.object_store import ObjectStore
from core.settings import Settings, load_settings
from serving.app import create_app
from serving.experiment import (
    CHALLENGER_ARM,
    CHAMPION_ARM,
    Experiment,
    assign,
    clear_experiment,
    impressions_key,
    outcomes_key,
    write_experiment,
)
from serving.store import current_version, publish


def _settings(tmp_path: Path, valkey_url: str, namespace: str) -> Settings:
    return load_settings(
        home=str(tmp_path / "home"),
        object_store={"uri": str(tmp_path / "store")},
        online_store={"url": valkey_url},
        serving={"namespace": namespace, "reload_interval_s": 0},
    )


@pytest.fixture
def store_with_arms(tmp_path: Path, valkey_url: str, namespace: str) -> tuple[Settings, ObjectStore]:
    settings = _settings(tmp_path, valkey_url, namespace)
    store = ObjectStore(settings.object_store_uri)
    publish(tiny_bundle(tmp_path / "b1", "v1", model_kind="ease"), store, "v1")
    publish(tiny_bundle(tmp_path / "b2", "v2", model_kind="popularity"), store, "v2", move_current=False)
    assert current_version(store) == "v1"
    return settings, store


def _users_by_arm(experiment: Experiment) -> dict[str, str]:
    users = [f"u{n}" for n in range(1, 6)] + [f"new{n}" for n in range(40)]
    return {u: assign(experiment.id, u, experiment.share) for u in users}


def test_no_experiment_has_no_experiment_headers(store_with_arms) -> None:
    settings, _store = store_with_arms
    with TestClient(create_app(settings)) as client:
        response = client.get("/v1/recommendations/u4?k=3")
        assert response.status_code == 200
        assert "x-experiment" not in response.headers and "x-arm" not in response.headers
        assert set(response.json()) == {
            "user_id",
            "model_version",
            "cold_start",
            "strategy",
            "strategy_detail",
            "segment",
            "retrieval",
            "diversity",
            "intra_list_diversity",
            "items",
        }


def test_ab_split_headers_cache_per_arm_and_attribution(store_with_arms, valkey_url: str, namespace: str) -> None:
    settings, store = store_with_arms
    experiment = Experiment("exp-ab", "v2", 0.5, "ab", registered_version=2, champion="v1")
    write_experiment(store, experiment)
    arms = _users_by_arm(experiment)
    assert set(arms.values()) == {CHAMPION_ARM, CHALLENGER_ARM}
    with TestClient(create_app(settings)) as client:
        seen_ids = set()
        for user, arm in arms.items():
            for attempt in ("miss", "hit"):
                response = client.get(f"/v1/recommendations/{user}?k=3")
                assert response.status_code == 200, response.text
                assert response.headers["x-experiment"] == "exp-ab"
                assert response.headers["x-arm"] == arm
                assert response.headers["x-cache"] == attempt
                body = response.json()
                assert body["experiment"] == "exp-ab" and body["arm"] == arm
                assert body["model_version"] == ("v2" if arm == CHALLENGER_ARM else "v1")
                assert len(body["impression_id"]) == 32 and body["impression_id"] not in seen_ids
                seen_ids.add(body["impression_id"])
        # The route (a query the fast path passes on: a repeated parameter is 422 there) still splits.
        user = next(u for u, a in arms.items() if a == CHALLENGER_ARM)
        routed = client.get(f"/v1/recommendations/{user}", params={"k": 3, "explain": "true"})
        assert routed.status_code == 200 and routed.headers["x-arm"] == CHALLENGER_ARM

        # Attribution: a click with the impression id lands in the outcome stream.
        served = client.get(f"/v1/recommendations/{user}?k=3").json()
        item = served["items"][1]["item_id"]
        posted = client.post(
            "/v1/events",
            json={"user_id": user, "item_id": item, "event_type": "click", "impression_id": served["impression_id"]},
        )
        assert posted.status_code == 202, posted.text
        bad = client.post(
            "/v1/events", json={"user_id": user, "item_id": item, "event_type": "click", "impression_id": "x"}
        )
        assert bad.status_code == 422
        redis = client.app.state.events.client
        outcomes = client.portal.call(redis.xrange, outcomes_key(namespace, "exp-ab"))
        assert len(outcomes) == 1
        fields = {k.decode(): v.decode() for k, v in outcomes[0][1].items()}
        assert fields["impression_id"] == served["impression_id"] and fields["item_id"] == item
        assert client.app.state.experiment_log.pending > 0  # buffered, written in batches
        client.portal.call(client.app.state.experiment_log.flush)
        entries = client.portal.call(redis.xrange, impressions_key(namespace, "exp-ab"))
        impressions = [row for _id, fields in entries for row in json.loads(fields[b"impressions"])]
        assert len(impressions) == 2 * len(arms) + 2
        assert len({row["impression_id"] for row in impressions}) == len(impressions)
        assert {row["arm"] for row in impressions} == {CHAMPION_ARM, CHALLENGER_ARM}
        metrics = client.get("/metrics").text
        assert 'hyperrec_experiment_impressions_total{arm="challenger",experiment="exp-ab"}' in metrics
        assert 'hyperrec_experiment_outcomes_total{arm="challenger",event_type="click",experiment="exp-ab"}' in metrics
        assert client.get("/readyz").json()["experiment"] == {
            "id": "exp-ab",
            "design": "ab",
            "share": 0.5,
            "challenger": "v2",
        }

        # Ending the experiment: the next poll serves the champion alone again.
        clear_experiment(store)
        client.app.state.serving.refresh_experiment()
        plain = client.get(f"/v1/recommendations/{user}?k=3")
        assert "x-arm" not in plain.headers and plain.json()["model_version"] == "v1"


def test_interleaving_merges_both_rankings(store_with_arms) -> None:
    settings, store = store_with_arms
    write_experiment(store, Experiment("exp-il", "v2", 0.5, "interleaving"))
    with TestClient(create_app(settings)) as client:
        for user in ("u1", "u4", "newcomer"):
            response = client.get(f"/v1/recommendations/{user}?k=3")
            assert response.status_code == 200
            body = response.json()
            assert response.headers["x-arm"] == "interleaved" and body["arm"] == "interleaved"
            assert len(body["teams"]) == len(body["items"]) == 3
            assert set(body["teams"]) <= {"A", "B"}
            assert [i["rank"] for i in body["items"]] == [1, 2, 3]
            assert len({i["item_id"] for i in body["items"]}) == 3
            # Team draft: the picks of the two teams differ by at most one at every prefix.
            for n in range(1, 4):
                prefix = body["teams"][:n]
                assert abs(prefix.count("A") - prefix.count("B")) <= 1


def test_unloadable_challenger_leaves_the_experiment_off(store_with_arms) -> None:
    settings, store = store_with_arms
    write_experiment(store, Experiment("exp-bad", "v9", 0.5))
    with TestClient(create_app(settings)) as client:
        response = client.get("/v1/recommendations/u4?k=3")
        assert response.status_code == 200 and "x-arm" not in response.headers
        assert "v9" in (client.app.state.serving.experiment_error or "")
        ready = client.get("/readyz").json()
        assert "experiment" not in ready and "v9" in ready["experiment_error"]


def _serve(config: Path, port: int):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    cmd = [
        sys.executable,
        "-m",
        "hyperrec.cli",
        "serve",
        "--port",
        str(port),
        "--workers",
        "2",
        "--config",
        str(config),
    ]
    return subprocess.Popen(cmd, env=env, start_new_session=True)


def _stop(server) -> None:
    import contextlib
    import os
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=30)
    except Exception:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)


def _arms_seen(url: str, users: list[str], rounds: int) -> dict[str, set[str]]:
    import time

    import httpx

    deadline = time.time() + 120
    while True:  # both workers answer once the server is up
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.time() < deadline, "serve did not become ready in 120 s"
        time.sleep(0.5)
    seen: dict[str, set[str]] = {u: set() for u in users}
    for _ in range(rounds):
        for user in users:  # a new connection each: the kernel spreads them over the workers
            response = httpx.get(f"{url}/v1/recommendations/{user}", params={"k": 2}, timeout=10)
            assert response.status_code == 200, response.text
            seen[user].add(response.headers["x-arm"])
    return seen


def test_assignment_is_sticky_across_two_workers_and_a_restart(tmp_path: Path) -> None:
    """``hyperrec serve --workers 2`` twice on the same store: every answer's arm is the one
    the pure assignment function gives, from either worker, before and after the restart."""
    import json

    from core.net import free_port

    store = ObjectStore(str(tmp_path / "store"))
    publish(tiny_bundle(tmp_path / "b1", "v1", model_kind="ease"), store, "v1")
    publish(tiny_bundle(tmp_path / "b2", "v2", model_kind="popularity"), store, "v2", move_current=False)
    experiment = Experiment("exp-sticky", "v2", 0.3)
    write_experiment(store, experiment)
    config = tmp_path / "serve.yaml"
    config.write_text(
        json.dumps(
            {"home": str(tmp_path / "home"), "object_store": {"uri": store.uri}, "serving": {"reload_interval_s": 0}}
        )
    )
    users = [f"u{n}" for n in range(1, 6)] + [f"visitor-{n}" for n in range(15)]
    expected = {u: assign(experiment.id, u, experiment.share) for u in users}
    assert set(expected.values()) == {CHAMPION_ARM, CHALLENGER_ARM}
    for _restart in range(2):
        port = free_port()
        server = _serve(config, port)
        try:
            seen = _arms_seen(f"http://127.0.0.1:{port}", users, rounds=4)
        finally:
            _stop(server)
        assert seen == {u: {arm} for u, arm in expected.items()}


def test_decided_experiment_promotes_through_the_registry(tmp_path: Path, valkey_url: str, namespace: str) -> None:
    """Registry (MLflow sqlite) → start (challenger alias published beside the champion) →
    live traffic whose users prefer the challenger's lists → the report, recomputable from
    its Parquet record → "better" promotes v2 with the evidence on the version → the champion
    is published and the running app serves it without a restart, the experiment ended."""
    import redis
    from mlflow import MlflowClient

    from serving.experiment_control import decide, evaluate, start
    from serving.experiment_report import GROUP, experiment_dir, load
    from serving.publish import DECISIONS, ServedPyfunc, follow_champion, publish_dir
    from training.registry import CHALLENGER, champion_version, log_and_register, promote_version

    settings = load_settings(
        home=str(tmp_path / "home"),
        object_store={"uri": str(tmp_path / "store")},
        online_store={"url": valkey_url},
        serving={"namespace": namespace, "reload_interval_s": 0},
        experiment={"share": 0.5, "min_impressions": 40},
    )
    versions = []
    for kind in ("ease", "popularity"):
        reg = log_and_register(
            settings,
            run_name=f"exp-{kind}",
            params={"model": kind},
            metrics={},
            bundle_dir=tiny_bundle(tmp_path / "bundles" / kind, "v0", model_kind=kind),
            artifact_dirs={},
            tags={"hyperrec.model": kind},
            python_model=ServedPyfunc(settings.serving),
        )
        versions.append(int(reg.version))
    v1, v2 = versions
    promote_version(settings, v1, "first model", user="alice")
    follow_champion(settings, workdir=tmp_path / "work", publisher="test")
    client = MlflowClient()
    assert int(client.get_model_version_by_alias(settings.mlflow.registered_model, CHALLENGER).version) == v2

    experiment = start(settings, experiment_id="exp-promote")
    assert experiment.challenger == f"v{v2}" and experiment.champion == f"v{v1}" and experiment.registered_version == v2
    assert experiment.catalogue_size == 6
    store = ObjectStore(settings.object_store_uri)
    assert current_version(store) == f"v{v1}"
    with TestClient(create_app(settings)) as app_client:
        arms: dict[str, int] = {}
        for n in range(400):
            user = f"visitor-{n}"
            body = app_client.get(f"/v1/recommendations/{user}?k=3").json()
            arms[body["arm"]] = arms.get(body["arm"], 0) + 1
            # The challenger's lists get a click in 2 of 3 visits, the champion's in 1 of 5.
            if (body["arm"] == CHALLENGER_ARM and n % 3) or (body["arm"] == CHAMPION_ARM and n % 5 == 0):
                event = {"user_id": user, "item_id": body["items"][0]["item_id"], "event_type": "click"}
                event["impression_id"] = body["impression_id"]
                assert app_client.post("/v1/events", json=event).status_code == 202
        assert min(arms.values()) > 150

        app_client.portal.call(app_client.app.state.experiment_log.flush)
        result = evaluate(settings, experiment)
        assert result["verdict"] == "better", result
        assert result["drained"]["impressions"] == 400
        assert (experiment_dir(settings, "exp-promote") / "impressions").glob("part-*.parquet")
        sync = redis.Redis.from_url(valkey_url)
        try:
            pending = sync.xpending(f"{namespace}:exp:exp-promote:impressions", GROUP)
            assert pending["pending"] == 0  # acknowledged once written
        finally:
            sync.close()
        # Recomputed from the Parquet record alone: the same numbers.
        again = evaluate(
            settings.model_copy(update={"online_store": settings.online_store.model_copy(update={"url": None})}),
            experiment,
        )
        assert again["arms"] == result["arms"] and again["verdict"] == "better"
        assert len(load(settings, "exp-promote")[0]) == 400

        decision = decide(settings, experiment, result)
        assert decision["action"] == "promoted" and decision["stopped"] is True
        assert champion_version(settings) == v2
        tags = client.get_model_version(settings.mlflow.registered_model, str(v2)).tags
        assert tags["gate.decision"] == "experiment" and tags["promotion.by"] == "experiment"
        assert tags["promotion.user"] == "experiment exp-promote" and tags["experiment.verdict"] == "better"
        assert json.loads(tags["experiment.evidence"])["test"]["p_value"] < 0.05

        published = follow_champion(settings, workdir=tmp_path / "work", publisher="test")
        assert published["changed"] and current_version(store) == f"v{v2}"
        record = [json.loads(line) for line in (publish_dir(settings) / DECISIONS).read_text().splitlines()][-1]
        assert record["source"] == "experiment" and record["user"] == "experiment exp-promote"
        state = app_client.app.state.serving
        state.refresh()
        state.refresh_experiment()
        after = app_client.get("/v1/recommendations/visitor-1?k=3")
        assert after.json()["model_version"] == f"v{v2}" and "x-arm" not in after.headers


def test_cli_status_stop_and_report_from_the_record(
    store_with_arms, valkey_url: str, namespace: str, tmp_path: Path, monkeypatch
) -> None:
    from typer.testing import CliRunner

    from hyperrec.cli import app

    settings, store = store_with_arms
    write_experiment(store, Experiment("exp-cli", "v2", 0.5))
    with TestClient(create_app(settings)) as client:
        for n in range(30):
            assert client.get(f"/v1/recommendations/v-{n}?k=3").status_code == 200
    for name, value in {
        "HYPERREC_HOME": str(settings.home),
        "HYPERREC_OBJECT_STORE__URI": settings.object_store_uri,
        "HYPERREC_ONLINE_STORE__URL": valkey_url,
        "HYPERREC_SERVING__NAMESPACE": namespace,
    }.items():
        monkeypatch.setenv(name, value)
    runner = CliRunner()
    status = runner.invoke(app, ["experiment", "status", "--json"])
    assert status.exit_code == 0, status.output
    body = json.loads(status.output.strip().splitlines()[-1])
    assert body["running"] is True and body["verdict"] == "unknown" and body["users"] == 30
    assert sum(arm["impressions"] for arm in body["arms"].values()) == 30
    stopped = runner.invoke(app, ["experiment", "stop"])
    assert stopped.exit_code == 0, stopped.output
    assert "experiment exp-cli" in stopped.output and "UNKNOWN" in stopped.output
    assert store.get_bytes("EXPERIMENT") is None
    assert runner.invoke(app, ["experiment", "stop"]).exit_code == 1  # nothing runs any more
    report = runner.invoke(app, ["experiment", "report", "--id", "exp-cli", "--json"])
    assert report.exit_code == 0, report.output
    assert json.loads(report.output.strip().splitlines()[-1])["users"] == 30


def test_a_new_champion_is_warmed_per_arm_before_the_swap(store_with_arms, tmp_path: Path) -> None:
    """Hot-swapping the champion during an experiment: the champion-arm lists hit lately are
    computed for the new version before it serves (a hit at once); challenger users keep theirs."""
    settings, store = store_with_arms
    experiment = Experiment("exp-warm", "v2", 0.5)
    write_experiment(store, experiment)
    arms = _users_by_arm(experiment)
    champion_user = next(u for u, a in arms.items() if a == CHAMPION_ARM and u.startswith("new"))
    challenger_user = next(u for u, a in arms.items() if a == CHALLENGER_ARM)
    with TestClient(create_app(settings)) as client:
        for user in (champion_user, challenger_user):
            for _ in range(2):  # miss, then a hit: the key is hot
                client.get(f"/v1/recommendations/{user}?k=3")
        publish(tiny_bundle(tmp_path / "b3", "v3", model_kind="ease"), store, "v3")
        assert client.app.state.serving.refresh().version == "v3"
        warmed = client.get(f"/v1/recommendations/{champion_user}?k=3")
        assert warmed.headers["x-cache"] == "hit" and warmed.json()["model_version"] == "v3"
        kept = client.get(f"/v1/recommendations/{challenger_user}?k=3")
        assert kept.headers["x-cache"] == "hit" and kept.json()["model_version"] == "v2"
