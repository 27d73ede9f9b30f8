"""A client of Airflow's REST API v2 (the API server ``hyperrec up`` runs): token login,
trigger a DAG run, follow its task instances, count runs by state."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from core.errors import UserError

FINISHED = {"success", "failed"}


class AirflowApiError(UserError, RuntimeError):
    """The API server refused a request or could not be reached."""


class AirflowClient:
    """Token-authenticated calls to ``base_url``/api/v2 as one SimpleAuthManager user."""

    def __init__(self, base_url: str, username: str, password: str, *, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._login = {"username": username, "password": password}
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout)
        self._token: str | None = None

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AirflowClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def token(self) -> str:
        if self._token is None:
            try:
                answer = self._http.post("/auth/token", json=self._login)
            except httpx.TransportError as exc:
                raise AirflowApiError(
                    f"Airflow API server at {self.base_url} is not reachable ({exc}); is `hyperrec up` running?"
                ) from exc
            if answer.status_code >= 400:
                raise AirflowApiError(
                    f"login as {self._login['username']!r} at {self.base_url} failed: "
                    f"HTTP {answer.status_code} {answer.text[:200]}"
                )
            self._token = answer.json()["access_token"]
        return self._token

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        headers = {"Authorization": f"Bearer {self.token()}"}
        try:
            answer = self._http.request(method, f"/api/v2{path}", headers=headers, **kwargs)
        except httpx.TransportError as exc:
            raise AirflowApiError(f"{method} {path}: {self.base_url} not reachable ({exc})") from exc
        if answer.status_code >= 400:
            raise AirflowApiError(f"{method} {path}: HTTP {answer.status_code} {answer.text[:500]}")
        return answer.json() if answer.content else None

    def dag(self, dag_id: str) -> dict:
        return self.request("GET", f"/dags/{dag_id}")

    def set_paused(self, dag_id: str, paused: bool) -> dict:
        return self.request("PATCH", f"/dags/{dag_id}", json={"is_paused": paused})

    def trigger(self, dag_id: str, conf: dict[str, Any], *, note: str | None = None) -> dict:
        """Start a run now (``logical_date`` null, as a manual run); return the DAG run."""
        body: dict[str, Any] = {"logical_date": None, "conf": conf}
        if note:
            body["note"] = note
        return self.request("POST", f"/dags/{dag_id}/dagRuns", json=body)

    def dag_run(self, dag_id: str, run_id: str) -> dict:
        return self.request("GET", f"/dags/{dag_id}/dagRuns/{run_id}")

    def dag_runs(self, dag_id: str, *, limit: int = 100, **filters: Any) -> list[dict]:
        params = {"limit": limit, "order_by": "-run_after", **filters}
        return self.request("GET", f"/dags/{dag_id}/dagRuns", params=params)["dag_runs"]

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        return self.request("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]

    def asset_event(self, name: str, extra: dict[str, Any]) -> dict:
        """Record an event of the asset called ``name`` (as a producer outside Airflow does),
        waking the DAGs scheduled on it."""
        found = self.request("GET", "/assets", params={"name_pattern": name, "limit": 100})["assets"]
        matches = [a for a in found if a["name"] == name]
        if not matches:
            raise AirflowApiError(f"no asset named {name!r}: are the DAGs parsed yet?")
        return self.request("POST", "/assets/events", json={"asset_id": matches[0]["id"], "extra": extra})

    def asset_events(self, name: str, *, limit: int = 100) -> list[dict]:
        """Events of the asset called ``name``, newest first."""
        found = self.request("GET", "/assets", params={"name_pattern": name, "limit": 100})["assets"]
        ids = [a["id"] for a in found if a["name"] == name]
        if not ids:
            return []
        params = {"asset_id": ids[0], "order_by": "-timestamp", "limit": limit}
        return self.request("GET", "/assets/events", params=params)["asset_events"]

    def dag_run_counts(self, dag_ids: tuple[str, ...], *, hours: float = 24) -> dict[tuple[str, str], int]:
        """(dag_id, state) → number of runs that started in the last ``hours``."""
        since = (datetime.now(UTC) - timedelta(hours=hours)).isoformat()
        counts: dict[tuple[str, str], int] = {}
        for dag_id in dag_ids:
            for state in ("queued", "running", "success", "failed"):
                runs = self.request(
                    "GET", f"/dags/{dag_id}/dagRuns", params={"limit": 1, "state": state, "run_after_gte": since}
                )
                counts[(dag_id, state)] = int(runs["total_entries"])
        return counts

    def wait(self, dag_id: str, run_id: str, *, timeout: float, poll_s: float = 2.0, on_tick=None) -> dict:
        """Poll until the run finishes; ``on_tick(run, task_instances)`` sees each poll."""
        deadline = time.time() + timeout
        while True:
            run = self.dag_run(dag_id, run_id)
            if on_tick is not None:
                on_tick(run, self.task_instances(dag_id, run_id))
            if run["state"] in FINISHED:
                return run
            if time.time() > deadline:
                raise TimeoutError(f"{dag_id} run {run_id} still {run['state']} after {timeout:.0f} s")
            time.sleep(poll_s)
