"""The ``hyperrec`` command line."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(help="hyperrec: hyper-personalized recommendations as an MLOps workflow.", no_args_is_help=True)

ConfigOpt = typer.Option(None, "--config", help="overlay YAML on config/default.yaml (e.g. config/stack.yaml)")


@app.command()
def generate(
    out: Path = typer.Option(..., "--out", help="directory to write the raw dataset to"),
    events: int = typer.Option(100_000, "--events", min=1, help="number of interaction events"),
    users: Optional[int] = typer.Option(None, "--users", min=1, help="number of users (default: events/50)"),
    items: Optional[int] = typer.Option(None, "--items", min=1, help="number of items (default: events/100)"),
    groups: int = typer.Option(4, "--groups", min=1, help="latent user groups"),
    seed: int = typer.Option(0, "--seed"),
    drift: float = typer.Option(0.0, "--drift", min=0.0, max=1.0, help="strength of injected distribution drift"),
    malformed: float = typer.Option(0.0, "--malformed", min=0.0, max=1.0, help="share of malformed records"),
    duplicates: float = typer.Option(0.0, "--duplicates", min=0.0, max=1.0, help="share of exact duplicate events"),
) -> None:
    """Generate a seeded synthetic content platform (streamed to Parquet)."""
    from hyperrec.datasets.synthetic import generate as run_generate

    dataset = run_generate(
        out, events=events, users=users, items=items, groups=groups, seed=seed,
        drift=drift, malformed_fraction=malformed, duplicate_fraction=duplicates,
    )
    typer.echo(f"wrote {dataset.root}")


@app.command()
def preprocess(
    interactions: str = typer.Option(..., "--interactions", help="CSV, JSON lines or Parquet file/directory, local or s3://"),
    out: Path = typer.Option(..., "--out", help="output directory: clean/, quarantine/, split/, report.json"),
    users: Optional[str] = typer.Option(None, "--users", help="users table (enables the unknown_user check)"),
    items: Optional[str] = typer.Option(None, "--items", help="items table (enables the unknown_item check)"),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Clean, quarantine, deduplicate, impute and split raw interactions with Spark."""
    import json

    from hyperrec.settings import load_settings
    from pipelines.preprocess import preprocess as run_preprocess
    from pipelines.spark import get_spark

    settings = load_settings(config)
    out.mkdir(parents=True, exist_ok=True)
    report = run_preprocess(
        get_spark(settings), interactions, out, settings.preprocess, users=users, items=items,
        half_life_days=settings.features.half_life_days, s3_endpoint_url=settings.object_store.s3_endpoint_url,
    )
    typer.echo(json.dumps(report.to_json(), indent=2, sort_keys=True))


@app.command()
def demo(
    config: Optional[Path] = ConfigOpt,
    synthetic_events: Optional[int] = typer.Option(None, "--synthetic-events", help="size of the synthetic sample"),
    serve_users: str = typer.Option("1,2", "--users", help="comma-separated users to show recommendations for"),
) -> None:
    """Run recsys_training through Airflow on ml-100k plus a synthetic sample, then serve."""
    from hyperrec.demo import run_demo
    from hyperrec.settings import load_settings

    settings = load_settings(config)
    run_demo(settings, synthetic_events=synthetic_events, show_users=[u for u in serve_users.split(",") if u])


@app.command()
def train(
    config: Optional[Path] = ConfigOpt,
    dataset: str = typer.Option("ml-100k", "--dataset", help="'ml-100k' or a raw dataset directory"),
    synthetic_events: int = typer.Option(0, "--synthetic-events", help="add a synthetic sample of this size"),
) -> None:
    """Run the recsys_training DAG once, in-process."""
    from hyperrec.orchestration import run_dag
    from hyperrec.settings import load_settings

    settings = load_settings(config)
    state, _run_id = run_dag(settings, "recsys_training", {"dataset": dataset, "synthetic_events": synthetic_events})
    typer.echo(f"recsys_training: {state}")
    raise typer.Exit(0 if state == "success" else 1)


@app.command("drift")
def drift_check(
    current: Path = typer.Option(..., "--current", help="raw dataset directory with the recent events"),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Run the recsys_drift_monitor DAG once on a recent batch."""
    from hyperrec.orchestration import run_dag
    from hyperrec.settings import load_settings

    settings = load_settings(config)
    state, _run_id = run_dag(settings, "recsys_drift_monitor", {"current": str(current.resolve())})
    typer.echo(f"recsys_drift_monitor: {state}")
    raise typer.Exit(0 if state == "success" else 1)


@app.command()
def serve(
    host: Optional[str] = typer.Option(None, "--host"),
    port: Optional[int] = typer.Option(None, "--port"),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Serve the champion that was published last."""
    import uvicorn

    from hyperrec.settings import load_settings
    from serving.app import create_app

    settings = load_settings(config)
    uvicorn.run(create_app(settings), host=host or settings.serving.host, port=port or settings.serving.port)


if __name__ == "__main__":  # pragma: no cover
    app()
