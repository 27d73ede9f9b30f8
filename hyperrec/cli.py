"""The ``hyperrec`` command line.

Every command runs under :class:`_Cli`: an error ends as one ``error: ...`` line on stderr
and exit status 1 (a known :class:`core.errors.UserError` names the file, key or record;
anything else adds a second line pointing at ``--debug``), with the traceback only under
``hyperrec --debug …`` or ``HYPERREC_DEBUG=1``.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import typer
from typer.core import TyperGroup

DEBUG_ENV = "HYPERREC_DEBUG"
ERROR_LIMIT = 500  # characters of an error message printed


def describe_error(exc: BaseException) -> tuple[str, bool]:
    """(the first line of ``exc``'s message, at most :data:`ERROR_LIMIT` characters;
    whether ``exc`` is a known kind whose message alone says what to fix)."""
    from core.errors import UserError

    known = isinstance(exc, (UserError, OSError))
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if len(text) > ERROR_LIMIT:
        text = text[: ERROR_LIMIT - 3] + "..."
    if not known or not text:
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text, known


class _Cli(TyperGroup):
    """The root command group: turns an exception from any command into one line."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, typer.Exit, typer.Abort):
            raise
        except Exception as exc:
            if ctx.meta.get("hyperrec.debug"):
                raise
            text, known = describe_error(exc)
            typer.echo(f"error: {text}", err=True)
            if not known:
                typer.echo(f"(unexpected: run again with --debug or {DEBUG_ENV}=1 for the traceback)", err=True)
            ctx.exit(1)


app = typer.Typer(
    cls=_Cli,
    help="hyperrec: hyper-personalized recommendations as an MLOps workflow.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def _main(
    ctx: typer.Context,
    debug: bool = typer.Option(
        False, "--debug", envvar=DEBUG_ENV, help="show the full traceback of an error (also HYPERREC_DEBUG=1)"
    ),
) -> None:
    """hyperrec: hyper-personalized recommendations as an MLOps workflow."""
    ctx.meta["hyperrec.debug"] = debug


ConfigOpt = typer.Option(None, "--config", help="overlay YAML on config/default.yaml (e.g. config/stack.yaml)")


@app.command()
def generate(
    out: Path = typer.Option(..., "--out", help="directory to write the raw dataset to"),
    events: int = typer.Option(100_000, "--events", min=1, help="number of interaction events"),
    users: int | None = typer.Option(None, "--users", min=1, help="number of users (default: events/50)"),
    items: int | None = typer.Option(None, "--items", min=1, help="number of items (default: events/100)"),
    groups: int = typer.Option(4, "--groups", min=1, help="latent user groups"),
    seed: int = typer.Option(0, "--seed"),
    drift: float = typer.Option(0.0, "--drift", min=0.0, max=1.0, help="strength of injected distribution drift"),
    malformed: float = typer.Option(0.0, "--malformed", min=0.0, max=1.0, help="share of malformed records"),
    duplicates: float = typer.Option(0.0, "--duplicates", min=0.0, max=1.0, help="share of exact duplicate events"),
    benchmark_csv: bool = typer.Option(
        False,
        "--benchmark-csv",
        help="also write interactions.csv/items.csv/users.csv for `hyperrec benchmark --dataset OUT`",
    ),
) -> None:
    """Generate a seeded synthetic content platform (streamed to Parquet)."""
    from core.datasets.synthetic import generate as run_generate

    dataset = run_generate(
        out,
        events=events,
        users=users,
        items=items,
        groups=groups,
        seed=seed,
        drift=drift,
        malformed_fraction=malformed,
        duplicate_fraction=duplicates,
    )
    typer.echo(f"wrote {dataset.root}")
    if benchmark_csv:
        from training.benchmark import export_raw_dataset

        typer.echo(f"wrote the benchmark format to {export_raw_dataset(dataset, out)}")


@app.command()
def land(
    path: Path = typer.Argument(
        ...,
        exists=True,
        help="a raw dataset directory (e.g. from `hyperrec generate`), a Parquet file of events, "
        "or a directory of them",
    ),
    config: Path | None = ConfigOpt,
) -> None:
    """Put new events into the landing zone as one immutable batch (atomically) and print its
    name. While `hyperrec up` runs, the drift monitor is woken to check it."""
    from hyperrec.assets import LANDING_NAME
    from pipelines.landing import LandingError, LandingZone

    settings = _client_settings(config)
    try:
        batch = LandingZone.of(settings).land(path)
    except LandingError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(batch.name)
    typer.echo(f"landed {batch.rows} events in {LandingZone.of(settings).uri}", err=True)
    _notify_airflow(settings, LANDING_NAME, {"batch": batch.name, "rows": batch.rows, "source": batch.source})


def _notify_airflow(settings, asset_name: str, extra: dict) -> None:
    """Record an asset event through the REST API of `hyperrec up` when it runs (the DAGs
    scheduled on the asset wake up); otherwise say that the next scheduled run will see it."""
    from hyperrec.airflow_api import AirflowApiError
    from hyperrec.up import airflow_client, read_state

    if read_state(settings) is None:
        typer.echo("hyperrec up is not running: the next drift check will see this batch", err=True)
        return
    try:
        with airflow_client(settings) as client:
            client.asset_event(asset_name, extra)
        typer.echo(f"asset {asset_name} updated: the drift monitor will check the batch", err=True)
    except AirflowApiError as exc:
        typer.echo(f"warning: could not wake the drift monitor ({exc}); its hourly run will see the batch", err=True)


@app.command()
def preprocess(
    interactions: str = typer.Option(
        ..., "--interactions", help="CSV, JSON lines or Parquet file/directory, local or s3://"
    ),
    out: Path = typer.Option(..., "--out", help="output directory: clean/, quarantine/, split/, report.json"),
    users: str | None = typer.Option(None, "--users", help="users table (enables the unknown_user check)"),
    items: str | None = typer.Option(None, "--items", help="items table (enables the unknown_item check)"),
    config: Path | None = ConfigOpt,
) -> None:
    """Clean, quarantine, deduplicate, impute and split raw interactions with Spark."""

    from core.settings import load_settings
    from pipelines.preprocess import check_inputs
    from pipelines.preprocess import preprocess as run_preprocess
    from pipelines.spark import get_spark

    settings = load_settings(config)
    check_inputs(settings.preprocess, interactions, users=users, items=items)  # before Spark starts
    out.mkdir(parents=True, exist_ok=True)
    report = run_preprocess(
        get_spark(settings),
        interactions,
        out,
        settings.preprocess,
        users=users,
        items=items,
        half_life_days=settings.features.half_life_days,
        s3_endpoint_url=settings.object_store.s3_endpoint_url,
    )
    typer.echo(json.dumps(report.to_json(), indent=2, sort_keys=True))


@app.command()
def benchmark(
    dataset: str = typer.Option("ml-100k", "--dataset", help="'ml-100k' or a directory with interactions.csv"),
    protocol: str = typer.Option("u75", "--protocol", help="split protocol (pipelines/split.py, docs/models.md): u75"),
    k: int = typer.Option(10, "--k", min=1, help="list length"),
    out: Path = typer.Option(..., "--out", help="output directory"),
    models: str = typer.Option(
        "popularity,item_knn,ease,als,content,neural,hybrid",
        "--models",
        help="comma-separated models to run (the hybrid blends the components it can fit)",
    ),
    config: Path | None = ConfigOpt,
) -> None:
    """Offline benchmark: metrics.json, train/test CSVs and one recommendations CSV per model."""
    from core.settings import load_settings
    from training.benchmark import run_benchmark

    metrics = run_benchmark(
        load_settings(config),
        dataset=dataset,
        protocol=protocol,
        k=k,
        out=out,
        models=tuple(m.strip() for m in models.split(",") if m.strip()),
    )
    for name, res in metrics["models"].items():
        typer.echo(
            f"{name:>12}  P@{k} {res['precision']:.4f}  R@{k} {res['recall']:.4f}  NDCG@{k} {res['ndcg']:.4f}  "
            f"MAP@{k} {res['map']:.4f}  HR@{k} {res['hit']:.4f}"
        )
    typer.echo(f"best: {metrics['best']}  split {metrics['split_fingerprint']}  -> {out}")


@app.command()
def demo(
    config: Path | None = ConfigOpt,
    synthetic_events: int | None = typer.Option(None, "--synthetic-events", help="size of the synthetic sample"),
    serve_users: str = typer.Option("1,2", "--users", help="comma-separated users to show recommendations for"),
) -> None:
    """Run recsys_training through Airflow on ml-100k plus a synthetic sample, then serve."""
    from core.settings import load_settings
    from hyperrec.demo import run_demo

    settings = load_settings(config)
    run_demo(settings, synthetic_events=synthetic_events, show_users=[u for u in serve_users.split(",") if u])


@app.command()
def train(
    config: Path | None = ConfigOpt,
    dataset: str = typer.Option("ml-100k", "--dataset", help="'ml-100k' or a raw dataset directory"),
    synthetic_events: int = typer.Option(0, "--synthetic-events", help="add a synthetic sample of this size"),
) -> None:
    """Run the recsys_training DAG once, in-process."""
    from core.datasets.movielens import ML100K_NAME
    from hyperrec.orchestration import run_dag
    from pipelines.ingest import check_dataset

    settings = _client_settings(config)
    if dataset and dataset != ML100K_NAME:
        dataset = str(check_dataset(dataset).root.resolve())  # before a run directory or Airflow
    state, _run_id = run_dag(settings, "recsys_training", {"dataset": dataset, "synthetic_events": synthetic_events})
    typer.echo(f"recsys_training: {state}")
    raise typer.Exit(0 if state == "success" else 1)


@app.command("drift")
def drift_check(
    current: str | None = typer.Option(
        None,
        "--current",
        help="a landed batch name or a raw dataset directory (default: the batches landed since the last check)",
    ),
    force: bool = typer.Option(False, "--force", help="retrain on drift even within the cool-down"),
    config: Path | None = ConfigOpt,
) -> None:
    """Run the recsys_drift_monitor DAG once in this process and print its decision."""
    from core.run_context import RunContext
    from hyperrec.orchestration import run_dag

    settings = _client_settings(config)
    if current and Path(current).is_dir():
        current = str(Path(current).resolve())
    state, run_id = run_dag(settings, "recsys_drift_monitor", {"current": current, "force": force})
    typer.echo(f"recsys_drift_monitor: {state}")
    summary = RunContext.of_airflow_run(settings, run_id).path("drift.json")
    if summary.exists():
        report = json.loads(summary.read_text())
        typer.echo(f"decision: {report['decision']} ({report['reason']})")
        if report.get("html_path"):
            typer.echo(f"report: {report['html_path']}")
    raise typer.Exit(0 if state == "success" else 1)


@app.command()
def serve(
    host: str | None = typer.Option(None, "--host"),
    port: int | None = typer.Option(None, "--port"),
    workers: int | None = typer.Option(None, "--workers", help="uvicorn worker processes (default: serving.workers)"),
    config: Path | None = ConfigOpt,
) -> None:
    """Serve the champion that was published last (hot-reloads newly published versions)."""
    from serving.app import run_server

    run_server(config, host=host, port=port, workers=workers)


@app.command()
def consume(config: Path | None = ConfigOpt) -> None:
    """Consume the serving tier's event stream until SIGTERM/Ctrl-C: land events as batches
    (exactly once) and keep the online profiles of active users fresh."""
    import logging

    from feature_store.consumer import run_consumer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = _client_settings(config)
    if settings.online_store.url is None:
        typer.echo("error: no Redis to consume from: set online_store.url or start `hyperrec up`", err=True)
        raise typer.Exit(1)
    stats = run_consumer(settings)
    typer.echo(f"consumer stopped: {stats}")


@app.command()
def publisher(config: Path | None = ConfigOpt) -> None:
    """Publish the registry's champion to the serving tier whenever the alias moves (gate,
    `hyperrec model promote/rollback`, MLflow UI), until SIGTERM; decisions go to
    <home>/publish/decisions.jsonl."""
    from serving.champion_watch import run_publisher

    run_publisher(_client_settings(config))


@app.command()
def up(
    config: Path | None = ConfigOpt,
    foreground: bool = typer.Option(False, "--foreground", help="supervise in this process until Ctrl-C/SIGTERM"),
    owner_pid: int | None = typer.Option(
        None, "--owner-pid", hidden=True, help="stop everything when this process exits (tests)"
    ),
) -> None:
    """Start Airflow (API server/UI, scheduler, DAG processor, triggerer), the MLflow server,
    the serving API and the online store as supervised processes; wait until all are healthy."""
    from rich.console import Console

    from core.settings import load_settings
    from hyperrec import up as services

    settings = load_settings(config)
    if foreground:
        raise typer.Exit(services.Supervisor(settings, owner_pid=owner_pid).run())
    console = Console()
    state = services.read_state(settings)
    pid = state.get("supervisor_pid") if state else None
    if not services._alive(pid):
        pid = services.spawn_supervisor(settings, config, owner_pid=owner_pid)
        console.print(f"supervisor started (pid {pid}); logs under {services.logs_dir(settings)}")
    else:
        console.print(f"already running (supervisor pid {pid}); checking health")
    try:
        with console.status("starting services") as spinner:

            def tick(report: dict) -> None:
                waiting = [n for n, s in report["services"].items() if not s["healthy"]]
                spinner.update(f"waiting for: {', '.join(waiting) or 'nothing'}")

            report = services.wait_healthy(settings, pid, settings.services.start_timeout_s, tick)
    except (RuntimeError, TimeoutError) as exc:
        typer.echo(f"error: {exc}", err=True)
        log = services.logs_dir(settings) / "supervisor.log"
        if log.exists():
            typer.echo("".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:]), err=True)
        raise typer.Exit(1) from exc
    _print_status(report)


def _print_status(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"hyperrec services ({report['mode']}, home {report['home']})")
    for column in ("service", "url", "pid", "healthy", "restarts"):
        table.add_column(column)
    for name, service in report["services"].items():
        healthy = "[green]yes[/green]" if service["healthy"] else "[red]no[/red]"
        table.add_row(name, service["url"] or "-", str(service["pid"] or "-"), healthy, str(service["restarts"]))
    console = Console(width=120)
    console.print(table)
    console.print(
        f"Airflow login: [bold]{report['airflow_user']}[/bold] / [bold]{report['airflow_password']}[/bold]"
        f"   logs: {report['logs']}   platform metrics: {report['metrics']}   landing: {report['landing']}",
        soft_wrap=True,
    )


@app.command()
def down(config: Path | None = ConfigOpt) -> None:
    """Stop everything `hyperrec up` started for this home."""
    from core.settings import load_settings
    from hyperrec import up as services

    stopped = services.down(load_settings(config))
    typer.echo(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


@app.command()
def status(
    config: Path | None = ConfigOpt,
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Each service of `hyperrec up`: URL, pid, health, restarts; the Airflow login.
    Exit status 1 when a service is not healthy."""

    from core.settings import load_settings
    from hyperrec import up as services

    report = services.status(load_settings(config))
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        if not report["running"]:
            typer.echo("hyperrec up is not running (start it with `hyperrec up`)")
        _print_status(report)
    raise typer.Exit(0 if report["running"] and all(s["healthy"] for s in report["services"].values()) else 1)


@app.command()
def trigger(
    dag_id: str = typer.Argument(..., help="recsys_training or recsys_drift_monitor"),
    conf: str = typer.Option("{}", "--conf", help="JSON object of DAG params, e.g. '{\"synthetic_events\": 50000}'"),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="follow the run until it finishes"),
    timeout: float = typer.Option(7200.0, "--timeout", help="seconds to wait"),
    config: Path | None = ConfigOpt,
) -> None:
    """Trigger a DAG run through the Airflow REST API of `hyperrec up` and follow it."""

    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from core.settings import load_settings
    from hyperrec.airflow_api import AirflowApiError
    from hyperrec.up import airflow_client

    try:
        params = json.loads(conf)
    except json.JSONDecodeError as exc:
        typer.echo(f"error: --conf is not JSON: {exc}", err=True)
        raise typer.Exit(2) from exc
    if not isinstance(params, dict):
        typer.echo("error: --conf must be a JSON object", err=True)
        raise typer.Exit(2)
    if dag_id == "recsys_training":
        params.setdefault("reason", "manual")
    settings = load_settings(config)
    console = Console()
    try:
        with airflow_client(settings) as client:
            run = client.trigger(dag_id, params)
            run_id = run["dag_run_id"]
            console.print(f"triggered {dag_id} run {run_id} ({client.base_url}/dags/{dag_id}/runs/{run_id})")
            if not wait:
                return
            with Progress(
                SpinnerColumn(),
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total} tasks"),
                TimeElapsedColumn(),
                console=console,
            ) as progress:
                bar = progress.add_task(f"{dag_id}: queued", total=None)

                def tick(current: dict, tis: list[dict]) -> None:
                    done = sum(ti["state"] in ("success", "skipped") for ti in tis)
                    running = [ti["task_id"] for ti in tis if ti["state"] in ("running", "queued", "up_for_retry")]
                    progress.update(
                        bar,
                        total=len(tis) or None,
                        completed=done,
                        description=f"{dag_id}: {', '.join(running) or current['state']}",
                    )

                final = client.wait(dag_id, run_id, timeout=timeout, on_tick=tick)
            failed = [ti["task_id"] for ti in client.task_instances(dag_id, run_id) if ti["state"] == "failed"]
    except (AirflowApiError, TimeoutError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    console.print(
        f"{dag_id} run {run_id}: {final['state']}"
        + (f" (failed: {', '.join(failed)}; task logs under {settings.airflow_home / 'logs'})" if failed else "")
    )
    raise typer.Exit(0 if final["state"] == "success" else 1)


features_app = typer.Typer(
    help="User features: build the offline snapshot and online store, inspect profiles.", no_args_is_help=True
)
app.add_typer(features_app, name="features")


def _client_settings(config: Path | None):
    """Settings for a client command: through the servers of `hyperrec up` when it runs."""
    from core.settings import load_settings
    from hyperrec.up import client_settings

    return client_settings(load_settings(config))


def latest_run_dir(runs_dir: Path) -> Path:
    """The run directory under ``runs_dir`` whose ``split/train`` was written last."""
    candidates = [d for d in runs_dir.iterdir() if (d / "split" / "train").exists()] if runs_dir.is_dir() else []
    if not candidates:
        raise FileNotFoundError(
            f"no run directory with split/train under {runs_dir}; run `hyperrec train` or pass --run-dir"
        )
    return max(candidates, key=lambda d: ((d / "split" / "train").stat().st_mtime, d.name))


@features_app.command("build")
def features_build(
    run_dir: Path | None = typer.Option(
        None,
        "--run-dir",
        help="run directory holding split/ and clean/ (default: the newest under <home>/runs with split/train)",
    ),
    config: Path | None = ConfigOpt,
) -> None:
    """Build user profiles (offline snapshot + online store) and segments for one run."""
    from core.run_context import RunContext
    from core.settings import load_settings

    settings = load_settings(config)
    try:
        run = RunContext.open(run_dir) if run_dir is not None else RunContext.open(latest_run_dir(settings.runs_dir))
        if not (run.split_dir / "train").exists():
            raise FileNotFoundError(f"{run.split_dir / 'train'} not found: preprocess the run first")
    except FileNotFoundError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    from feature_store.stage import build_features, segment

    built = build_features(settings, run)
    seg = segment(settings, run)
    typer.echo(f"run {run.run_id}: {built['users']} users x {built['features']} features as of {built['as_of']}")
    typer.echo(f"offline snapshot: {built['snapshot']}")
    typer.echo(f"online store: {built['online_written']} users written")
    typer.echo(
        f"segments: {seg.get('method')} k={seg.get('k')} silhouette={seg.get('silhouette')} sizes={seg.get('sizes')}"
    )


def _format_value(value: float | str) -> str:
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 2**53 else f"{value:.6g}"
    return str(value)


@features_app.command("get")
def features_get(
    user_id: str = typer.Argument(..., help="the user whose online profile to show"),
    config: Path | None = ConfigOpt,
) -> None:
    """Print a user's profile from the online store."""
    from rich.console import Console
    from rich.table import Table

    from feature_store.stage import online_store

    settings = _client_settings(config)
    store = online_store(settings)
    try:
        profile = store.get_user(user_id)
        where = store.url
    finally:
        store.close()
    if profile is None:
        typer.echo(f"error: user {user_id!r} not found in the online store ({where})", err=True)
        raise typer.Exit(1)
    version = profile.pop("_version", "?")
    table = Table(title=f"user {user_id} (version {version})")
    table.add_column("feature")
    table.add_column("value", justify="right")
    for name in sorted(profile):
        table.add_row(name, _format_value(profile[name]))
    Console(width=100).print(table)


model_app = typer.Typer(
    help="The MLflow model registry: list versions, promote by hand, roll back the champion.", no_args_is_help=True
)
app.add_typer(model_app, name="model")


def _registry_call(fn, *args, **kwargs):
    """Run a registry operation; a RegistryError becomes ``error: ...`` and exit status 1."""
    from training.registry import RegistryError

    try:
        return fn(*args, **kwargs)
    except RegistryError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc


@model_app.command("list")
def model_list(config: Path | None = ConfigOpt) -> None:
    """Table of registered versions: aliases, gate decision, NDCG@k of the run, creation time."""
    from rich.console import Console
    from rich.table import Table

    from training.registry import list_versions

    settings = _client_settings(config)
    rows = list_versions(settings)
    name = settings.mlflow.registered_model
    if not rows:
        typer.echo(f"no versions of {name!r} registered yet")
        return
    table = Table(title=f"{name} ({settings.mlflow_tracking_uri})")
    for column, justify in (
        ("version", "right"),
        ("aliases", "left"),
        ("gate", "left"),
        (f"ndcg@{settings.training.k}", "right"),
        ("created (UTC)", "left"),
    ):
        table.add_column(column, justify=justify)
    for row in rows:
        ndcg = "-" if row["ndcg"] is None else f"{row['ndcg']:.4f}"
        table.add_row(
            str(row["version"]), ", ".join(row["aliases"]) or "-", row["gate_decision"] or "-", ndcg, row["created"]
        )
    Console(width=120).print(table)


def _serving_follows(settings) -> str:
    """When the serving tier will answer with the new champion (the publisher's heartbeat says)."""
    from serving.champion_watch import publisher_status

    poll = f"~{settings.serving.champion_poll_s:g} s"
    status = publisher_status(settings)
    if status is not None and status["fresh"]:
        return f"serving follows within {poll}: the publisher (pid {status['pid']}) publishes the new champion"
    return (
        f"serving follows within {poll} while `hyperrec up` runs (its publisher service); no publisher runs "
        "for this home now: start `hyperrec up` or `hyperrec publisher`"
    )


@model_app.command("promote")
def model_promote(
    version: int = typer.Argument(..., min=1, help="registered version to make champion"),
    reason: str = typer.Option("", "--reason", help="why (recorded on the version's tags)"),
    by: str | None = typer.Option(None, "--by", help="who promotes (default: the OS user)"),
    config: Path | None = ConfigOpt,
) -> None:
    """Move the champion alias to VERSION by hand, recording who, why and the previous champion."""
    from training.registry import promote_version

    settings = _client_settings(config)
    record = _registry_call(promote_version, settings, version, reason, user=by)
    previous = "none" if record["previous_champion"] is None else f"v{record['previous_champion']}"
    typer.echo(f"champion: v{record['version']} (was {previous}), by {record['user']}: {record['reason']}")
    typer.echo(_serving_follows(settings))


@model_app.command("rollback")
def model_rollback(
    to: int | None = typer.Option(None, "--to", min=1, help="an earlier champion (default: the previous one)"),
    reason: str = typer.Option("", "--reason", help="why (recorded on the version's tags)"),
    by: str | None = typer.Option(None, "--by", help="who rolls back (default: the OS user)"),
    config: Path | None = ConfigOpt,
) -> None:
    """Move the champion alias back to the previous champion (or to an earlier one with --to)."""
    from training.registry import rollback

    settings = _client_settings(config)
    record = _registry_call(rollback, settings, to, reason=reason, user=by)
    typer.echo(
        f"champion: v{record['version']} (rolled back from v{record['rolled_back_from']}), "
        f"by {record['user']}: {record['reason']}"
    )
    typer.echo(_serving_follows(settings))


export_app = typer.Typer(help="Export the served model for runtimes outside the server.", no_args_is_help=True)
app.add_typer(export_app, name="export")


@export_app.command("onnx")
def export_onnx(
    out: Path | None = typer.Option(None, "--out", help="edge bundle directory (default: <home>/edge/<version>)"),
    bundle: Path | None = typer.Option(
        None, "--bundle", help="a serving bundle directory (default: the published bundle CURRENT names)"
    ),
    version: str | None = typer.Option(
        None, "--version", help="a published version in the object store (default: the one CURRENT names)"
    ),
    max_weights_mb: float = typer.Option(
        256.0, "--max-weights-mb", min=0.0, help="leave the anchor's item-item weights out above this size"
    ),
    config: Path | None = ConfigOpt,
) -> None:
    """Write the served hybrid as an edge bundle: an ONNX model that onnxruntime runs on a
    user's on-device history (item ids), the item ids and titles, and manifest.json.
    examples/edge_score.py scores with it."""
    import tempfile

    from core.errors import InputFileError
    from core.settings import load_settings
    from serving.publish import object_store
    from serving.store import current_version, fetch
    from training.edge import export_edge

    settings = load_settings(config)
    if bundle is not None and version is not None:
        raise InputFileError("give --bundle or --version, not both")
    with tempfile.TemporaryDirectory(prefix="hyperrec-export-") as tmp:
        if bundle is None:
            store = object_store(settings)
            version = version or current_version(store)
            if version is None:
                raise InputFileError(f"nothing published in {store.uri} (no CURRENT): pass --bundle DIR")
            bundle = fetch(store, version, Path(tmp) / version)
        elif not (bundle / "metadata.json").is_file():
            raise InputFileError(f"{bundle} is not a serving bundle (no metadata.json)")
        target = out or settings.home / "edge" / json.loads((bundle / "metadata.json").read_text())["version"]
        manifest = export_edge(bundle, target, max_weights_mb=max_weights_mb)
    score = manifest["score"]
    parts = ", ".join(f"{name} ({c.get('form', c['kind'])})" for name, c in score["components"].items())
    typer.echo(
        f"wrote {target} ({manifest['size_bytes'] / 2**20:.2f} MiB) from bundle {manifest['source_bundle']['version']}"
    )
    typer.echo(f"edge score: {parts}")
    for name, reason in score["excluded_components"].items():
        typer.echo(f"left out: {name}: {reason}")
    typer.echo(f"try: python examples/edge_score.py {target} ITEM_ID [ITEM_ID ...]")


experiment_app = typer.Typer(
    help="Online experiments: the challenger against the champion on live traffic, decided by evidence.",
    no_args_is_help=True,
)
app.add_typer(experiment_app, name="experiment")


def _echo_report(result: dict, as_json: bool) -> None:
    from serving.experiment_report import format_report

    typer.echo(json.dumps(result, sort_keys=True, default=str) if as_json else format_report(result))


@experiment_app.command("start")
def experiment_start(
    version: int | None = typer.Option(None, "--version", min=1, help="challenger version (default: alias challenger)"),
    share: float | None = typer.Option(None, "--share", min=0.0, max=1.0, help="A/B challenger share"),
    design: str | None = typer.Option(None, "--design", help="ab | interleaving (default: experiment.design)"),
    experiment_id: str | None = typer.Option(None, "--id", help="experiment id (default: exp-<UTC time>-v<N>)"),
    config: Path | None = ConfigOpt,
) -> None:
    """Publish the challenger beside the champion and split serving's traffic between them."""
    from serving.experiment_control import start

    settings = _client_settings(config)
    experiment = start(settings, experiment_id=experiment_id, version=version, share=share, design=design)
    typer.echo(
        f"experiment {experiment.id}: {experiment.challenger} against {experiment.champion} "
        f"({experiment.design}, share {experiment.share:g}); serving follows within "
        f"~{settings.serving.reload_interval_s:g} s"
    )


@experiment_app.command("status")
def experiment_status(
    experiment_id: str | None = typer.Option(None, "--id", help="a stopped experiment (default: the running one)"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object"),
    config: Path | None = ConfigOpt,
) -> None:
    """The running experiment and its report so far."""
    from serving.experiment_control import evaluate, find

    settings = _client_settings(config)
    experiment, running = find(settings, experiment_id)
    result = {**evaluate(settings, experiment), "running": running}
    _echo_report(result, as_json)


@experiment_app.command("stop")
def experiment_stop(
    as_json: bool = typer.Option(False, "--json", help="one JSON object"), config: Path | None = ConfigOpt
) -> None:
    """End the running experiment (serving returns to the champion alone) and print its final report."""
    from serving.experiment_control import stop

    _echo_report(stop(_client_settings(config)), as_json)


@experiment_app.command("report")
def experiment_report(
    experiment_id: str | None = typer.Option(None, "--id", help="a stopped experiment (default: the running one)"),
    decide: bool = typer.Option(
        False, "--decide", help="act on the verdict: better promotes the challenger, worse ends the experiment"
    ),
    as_json: bool = typer.Option(False, "--json", help="one JSON object"),
    config: Path | None = ConfigOpt,
) -> None:
    """The experiment's report: per-arm online metrics, the always-valid test and the verdict."""
    from serving.experiment_control import decide as act
    from serving.experiment_control import evaluate, find

    settings = _client_settings(config)
    experiment, _running = find(settings, experiment_id)
    result = evaluate(settings, experiment)
    if decide:
        result["decision"] = _registry_call(act, settings, experiment, result)
    _echo_report(result, as_json)
    if decide and result["decision"]["action"] == "promoted":
        typer.echo(_serving_follows(settings), err=as_json)


def _simulate(
    challenger: str,
    champion: str | None,
    design: str,
    seed: int,
    dataset: Path | None,
    share: float | None,
    max_users: int | None,
    step: int,
    as_json: bool,
    config: Path | None,
    run_dir: Path | None = None,
) -> None:
    from hyperrec.simulate import simulate as run_simulation
    from serving.experiment_report import format_report

    def progress(result: dict) -> None:
        if not as_json:
            typer.echo(f"{result['users']} users: {result['verdict']}")

    result = run_simulation(
        _client_settings(config),
        challenger=challenger,
        champion=champion or "popularity",
        design=design,
        seed=seed,
        dataset=dataset,
        run_dir=run_dir,
        share=share if share is not None else 0.5,
        max_users=max_users,
        step=step,
        progress=progress,
    )
    typer.echo(json.dumps(result, sort_keys=True, default=str) if as_json else format_report(result))


@experiment_app.command("simulate")
def experiment_simulate(
    challenger: str = typer.Option(
        ..., "--challenger", help="popularity | ease | item_knn; with --run-dir a run candidate (hybrid, ...), vN"
    ),
    champion: str | None = typer.Option(
        None, "--champion", help="default popularity; with --run-dir: current (the served champion), a candidate, vN"
    ),
    design: str = typer.Option("ab", "--design", help="ab | interleaving"),
    seed: int = typer.Option(0, "--seed"),
    dataset: Path | None = typer.Option(None, "--dataset", help="a `hyperrec generate` directory (default: made)"),
    run_dir: Path | None = typer.Option(
        None, "--run-dir", help="a training run on data with a generated sample (the demo's): its users and models"
    ),
    share: float | None = typer.Option(None, "--share", min=0.0, max=1.0, help="A/B challenger share (default 0.5)"),
    max_users: int | None = typer.Option(None, "--max-users", min=1),
    step: int = typer.Option(100, "--step", min=1, help="read the report after every STEP users"),
    as_json: bool = typer.Option(False, "--json", help="last line: one JSON object (verdict, users, arms, test)"),
    config: Path | None = ConfigOpt,
) -> None:
    """One simulated experiment on synthetic users with known tastes, ending with the report."""
    if design not in ("ab", "interleaving"):
        raise typer.BadParameter("use ab or interleaving", param_hint="--design")
    if run_dir is not None and champion is None:
        champion = "current"
    _simulate(challenger, champion, design, seed, dataset, share, max_users, step, as_json, config, run_dir)


@app.command()
def simulate(
    challenger: str = typer.Option("ease", "--challenger", help="popularity | ease | item_knn"),
    champion: str | None = typer.Option(None, "--champion", help="the champion model (default: popularity)"),
    design: str = typer.Option("ab", "--design", help="ab | interleaving"),
    seed: int = typer.Option(0, "--seed"),
    dataset: Path | None = typer.Option(None, "--dataset", help="a `hyperrec generate` directory (default: made)"),
    max_users: int | None = typer.Option(None, "--max-users", min=1),
    as_json: bool = typer.Option(False, "--json"),
    config: Path | None = ConfigOpt,
) -> None:
    """Drive the serving API with synthetic users who click by their true tastes (see `experiment simulate`)."""
    if design not in ("ab", "interleaving"):
        raise typer.BadParameter("use ab or interleaving", param_hint="--design")
    _simulate(challenger, champion, design, seed, dataset, None, max_users, 100, as_json, config)


if __name__ == "__main__":  # pragma: no cover
    app()
