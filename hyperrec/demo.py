"""``hyperrec demo``: the loop on one machine. The nightly pipeline end to end on ml-100k
plus a synthetic sample; a drifted batch lands; the drift monitor checks it and requests a
retrain; the retrain learns from base + landed data and meets the promotion gate; then a
real server answers requests."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from core.net import free_port
from core.processes import die_with_parent
from core.run_context import RunContext
from core.settings import Settings
from hyperrec.orchestration import execute_dag, get_dag, task_order

console = Console()


def _newest_run(settings: Settings, since: float) -> Path | None:
    runs = [p for p in settings.runs_dir.glob("*") if p.is_dir() and p.stat().st_mtime >= since]
    return max(runs, key=lambda p: p.stat().st_mtime) if runs else None


def _run_with_progress(settings: Settings, dag_id: str, conf: dict) -> tuple[RunContext, list[str]]:
    """Run a DAG in-process (Airflow needs the main thread) while a watcher thread moves a
    progress bar along its tasks as the run directory's ``timings.json`` records them
    finished; return the run and the DAG's task ids in order."""
    dag = get_dag(settings, dag_id)
    stages = task_order(dag)
    started = time.time()
    finished = threading.Event()
    with Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        bar = progress.add_task(f"{dag_id}: starting", total=len(stages))

        def watch() -> None:
            while not finished.wait(0.5):
                run_dir = _newest_run(settings, started)
                timings = run_dir / "timings.json" if run_dir else None
                try:
                    done = json.loads(timings.read_text()) if timings and timings.exists() else {}
                except json.JSONDecodeError:  # caught mid-write; next tick reads it whole
                    continue
                pending = [s for s in stages if s not in done]
                progress.update(
                    bar,
                    completed=len(stages) - len(pending),
                    description=f"{dag_id}: {pending[0] if pending else 'finishing'}",
                )

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            state, run_id = execute_dag(dag, conf)
        finally:
            finished.set()
            watcher.join()
        progress.update(bar, completed=len(stages), description=f"{dag_id}: {state}")
    run = RunContext.of_airflow_run(settings, run_id)
    if state != "success":
        console.print(f"[red]{dag_id} ended {state}[/red]: see the task logs above; run directory {run.root}")
        raise SystemExit(1)
    return run, stages


def _stage_table(run: RunContext, stages: list[str]) -> tuple[Table, Table]:
    timings, report = run.read_json("timings.json"), run.read_json("report.json")
    table = Table(title="recsys_training stages")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    for stage in stages:
        table.add_row(stage, f"{timings.get(stage, float('nan')):.1f}")
    table.add_row("[bold]total", f"[bold]{sum(timings.values()):.1f}")
    rows = Table(title="rows")
    for col in ("in", "quarantined", "deduplicated", "clean", "train", "test", "imputed"):
        rows.add_column(col, justify="right")
    rows.add_row(
        str(report["in"]),
        str(report["quarantined_total"]),
        str(report["duplicates"]),
        str(report["clean"]),
        str(report["train"]),
        str(report["test"]),
        str(sum(report["imputed"].values())),
    )
    return table, rows


def _model_table(run: RunContext) -> Table:
    evaluation = run.read_json("evaluation.json")
    k = evaluation["k"]
    table = Table(title=f"models on the temporal holdout ({evaluation['models']['popularity']['users']} users, k={k})")
    table.add_column("model")
    metrics = {"precision": "P", "recall": "R", "ndcg": "NDCG", "map": "MAP", "hit": "HR", "coverage": "Cov"}
    for short in metrics.values():
        table.add_column(f"{short}@{k}", justify="right")
    table.add_column("NDCG vs pop", justify="right")
    for name, res in evaluation["models"].items():
        lift = evaluation["lift_over_popularity"][name]
        style = "bold green" if name == evaluation["best"] else ""
        table.add_row(name, *[f"{res[f'{m}@{k}']:.4f}" for m in metrics], f"{lift:+.1%}", style=style)
    return table


def _serve_and_show(settings: Settings, users: list[str], k: int) -> None:
    """Start ``hyperrec serve`` as a real server process and print its answers."""
    from hyperrec.orchestration import settings_file

    port = free_port()
    cmd = [sys.executable, "-m", "hyperrec.cli", "serve", "--port", str(port), "--config", str(settings_file(settings))]
    # Stops with this process, kill -9 included; it stops its own Valkey and workers.
    server = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=die_with_parent()
    )
    base = f"http://127.0.0.1:{port}"
    try:
        with console.status(f"starting hyperrec serve on {base}"):
            deadline = time.time() + 60
            while True:
                if server.poll() is not None:
                    raise RuntimeError(f"hyperrec serve exited: {server.stderr.read()[-2000:]}")
                try:
                    if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.time() > deadline:
                    raise TimeoutError("hyperrec serve did not become ready within 60 s")
                time.sleep(0.3)
        for user in users:
            answer = httpx.get(f"{base}/v1/recommendations/{user}", params={"k": k}, timeout=10).json()
            model, cold = answer["model_version"], answer["cold_start"]
            table = Table(title=f"GET /v1/recommendations/{user}?k={k}  (model {model}, cold start: {cold})")
            table.add_column("rank", justify="right")
            table.add_column("item")
            table.add_column("title")
            table.add_column("score", justify="right")
            for item in answer["items"]:
                table.add_row(str(item["rank"]), item["item_id"], item["title"], f"{item['score']:.3f}")
            console.print(table)
    finally:
        server.terminate()  # a clean stop: the workers, then its Valkey
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()  # its children get SIGTERM from the kernel (core.processes.die_with_parent)
            server.wait()


def _land_drifted_batch(settings: Settings, sample_events: int) -> str:
    """Land a batch in which the users of the demo's synthetic sample (same seed, users and
    items) have drifted strongly (``hyperrec generate --drift 0.9``), a month later."""
    import tempfile
    from datetime import UTC, datetime

    from core.datasets.synthetic import generate
    from pipelines.landing import LandingZone

    same_platform = {"users": max(50, sample_events // 50), "items": max(50, sample_events // 100), "seed": 0}
    with tempfile.TemporaryDirectory(prefix="demo-batch-") as tmp, console.status("landing a drifted batch"):
        source = generate(
            Path(tmp) / "batch",
            events=max(sample_events // 5, 2000),
            start=datetime(2026, 2, 15, tzinfo=UTC),
            drift=0.9,
            progress=False,
            **same_platform,
        )
        batch = LandingZone.of(settings).land(source.root)
    console.print(f"landed batch [bold]{batch.name}[/bold]: {batch.rows} events in {settings.landing_uri}")
    return batch.name


def _drift_table(drift: dict) -> Table:
    table = Table(title=f"drift check of {', '.join(drift['batches'])}")
    for column in ("feature", "test", "p-value / PSI", "drifted"):
        table.add_column(column, justify="right" if column == "p-value / PSI" else "left")
    for name, result in drift.get("columns", {}).items():
        table.add_row(name, result["method"], f"{result['score']:.3g}", "[red]yes[/red]" if result["drifted"] else "no")
    return table


def run_demo(settings: Settings, synthetic_events: int | None = None, show_users: list[str] | None = None) -> None:
    from training.registry import champion_version

    events = synthetic_events if synthetic_events is not None else settings.synthetic.demo_events
    console.rule("[bold]hyperrec demo")
    console.print(f"state under {settings.home} (mode: {settings.mode}); Airflow metadata DB: {settings.airflow_conn}")
    base_conf = {"dataset": "ml-100k", "synthetic_events": events}
    run, training_stages = _run_with_progress(settings, "recsys_training", {**base_conf, "reason": "demo"})
    stages, rows = _stage_table(run, training_stages)
    console.print(stages)
    console.print(rows)
    console.print(_model_table(run))

    console.rule("the loop: new data lands, drift is checked, the model retrains")
    _land_drifted_batch(settings, events)
    drift_run, _ = _run_with_progress(settings, "recsys_drift_monitor", {})
    drift = drift_run.read_json("drift.json")
    if drift.get("columns"):
        console.print(_drift_table(drift))
    console.print(f"[bold]drift verdict:[/bold] {drift['decision']} ({drift['reason']})", soft_wrap=True)
    retrain = None
    if drift["retrain"]:
        console.print(
            "the drift monitor requested a retrain (asset hyperrec_retrain_request); under `hyperrec up` the "
            "scheduler starts recsys_training on it, here the demo runs it in this process",
            soft_wrap=True,
        )
        retrain, _ = _run_with_progress(
            settings, "recsys_training", {**base_conf, "reason": "drift", "drift_report": drift["json_path"]}
        )
    registration, promotion = run.read_json("registration.json"), run.read_json("promotion.json")
    published = (retrain or run).read_json("publish.json")
    outcome = "promoted" if promotion["promoted"] else "kept as challenger"
    lines = {
        "registered model": f"{settings.mlflow.registered_model} v{registration['version']} ({registration['model']})",
        "promotion gate": f"{outcome}: {promotion['reason']}",
        "drift check": f"{drift['decision']}; Evidently report {drift.get('html_path', '-')}",
    }
    if retrain is not None:
        ingested = retrain.read_json("ingest.json")
        gate = retrain.read_json("promotion.json")
        lines["triggered run"] = (
            f"{retrain.run_id}: reason drift, {retrain.read_json('report.json')['clean']} clean events "
            f"incl. landed batches {', '.join(ingested['landed_batches'])}"
        )
        lines["its gate decision"] = (
            f"v{retrain.read_json('registration.json')['version']} "
            f"{'promoted' if gate['promoted'] else 'kept as challenger'}: {gate['reason']}"
        )
    lines.update(
        {
            "champion": f"v{champion_version(settings)}",
            "MLflow store": f"{settings.mlflow_tracking_uri}  "
            "(browse it and the Airflow UI: `hyperrec up --config config/demo.yaml`)",
            "GX Data Docs": str(run.gx_dir / "index.html"),
            "serving bundle": f"{published['store']} @ {published['current']}",
            "run directory": str((retrain or run).root),
        }
    )
    console.rule("what was made, and where")
    for label, text in lines.items():
        console.print(f"[bold]{label}:[/bold] {text}", soft_wrap=True)
    _serve_and_show(settings, show_users or ["1", "2"], settings.serving.default_k)
    _simulated_experiment(settings)


def _simulated_experiment(settings: Settings) -> None:
    """A short simulated online experiment (``hyperrec experiment simulate``): EASE against a
    popularity champion, team-draft interleaving, on a small synthetic platform's users."""
    from hyperrec.simulate import simulate
    from serving.experiment_report import format_report

    console.rule("an online experiment, simulated: EASE challenges a popularity champion")
    with console.status("simulated users request lists and click by their true tastes"):
        result = simulate(settings, challenger="ease", champion="popularity", design="interleaving", step=50)
    console.print(format_report(result), soft_wrap=True, highlight=False)
