"""Landed batches on S3 (moto's server) and on disk reach a run's raw dataset: ingest adds
every batch inside the window to the base dataset; a landed user row updates the base's."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pandas as pd
import pyarrow.parquet as pq

from core.datasets import RawDataset
from core.datasets.synthetic import generate
from core.run_context import RunContext
from pipelines.ingest import ingest
from pipelines.landing import LandingZone


def test_batches_on_s3_land_and_read_back(s3_endpoint, tmp_path):
    source = generate(tmp_path / "gen", events=2000, seed=5, progress=False)
    zone = LandingZone("s3://raw/landing", s3_endpoint)
    batch = zone.land(source.root)
    zone.store.put_file("incoming/late/part-0.parquet", next(source.interactions.glob("*.parquet")))
    (claimed,) = zone.claim_dropped()
    assert [b.name for b in zone.batches()] == sorted([batch.name, claimed.name])
    assert zone.store.list("incoming") == []
    copy = zone.raw_dataset(batch, tmp_path / "stage")
    original = pd.read_parquet(source.interactions)
    assert len(pd.read_parquet(copy.interactions)) == len(original) == batch.rows
    assert pq.read_table(copy.users).num_rows == pq.read_table(source.users).num_rows


def test_ingest_adds_the_batches_inside_the_window(settings, tmp_path):
    landing = tmp_path / "landing"
    local = settings.model_copy(update={"landing": settings.landing.model_copy(update={"uri": str(landing)})})
    base = generate(tmp_path / "base", events=3000, seed=1, progress=False)
    batch_source = generate(tmp_path / "batch", events=1500, seed=2, drift=0.9, progress=False)
    users = pd.read_parquet(batch_source.users)
    users.loc[users.index[0], "age"] = 99  # a landed row updates the base's row for that user
    users.to_parquet(batch_source.users, index=False)
    zone = LandingZone(str(landing))
    now = datetime.now(UTC)
    stale = zone.land(batch_source.root, now=now - timedelta(days=local.landing.window_days + 1))
    fresh = zone.land(batch_source.root)

    run = RunContext.create(local, "landing-ingest")
    result = ingest(local, run, dataset=str(base.root))
    assert result["landed_batches"] == [fresh.name] and stale.name not in result["landed_batches"]
    raw = RawDataset(run.raw_dir)
    merged = pd.read_parquet(raw.interactions)
    assert len(merged) == result["rows"] == pq.read_table(base.interactions).num_rows + fresh.rows
    merged_users = pd.read_parquet(raw.users)
    assert merged_users["user_id"].is_unique
    assert merged_users.set_index("user_id").loc[users.iloc[0]["user_id"], "age"] == 99

    without = ingest(local, RunContext.create(local, "landing-off"), dataset=str(base.root), landed=False)
    assert without["landed_batches"] == [] and without["rows"] == pq.read_table(base.interactions).num_rows


def test_hyperrec_land_prints_the_batch_and_refuses_bad_input_naming_it(tmp_path):
    import yaml
    from typer.testing import CliRunner

    from hyperrec.cli import app

    config = tmp_path / "settings.yaml"
    config.write_text(yaml.safe_dump({"home": str(tmp_path / "home"), "landing": {"uri": str(tmp_path / "lz")}}))
    source = generate(tmp_path / "gen", events=1000, seed=3, drift=0.9, progress=False)
    runner = CliRunner()
    done = runner.invoke(app, ["land", str(source.root), "--config", str(config)])
    assert done.exit_code == 0, done.output
    name = done.stdout.strip().splitlines()[0]
    (batch,) = LandingZone(str(tmp_path / "lz")).batches()
    assert batch.name == name and batch.rows == 1000 and batch.source == "land"
    assert "the next drift check will see this batch" in done.output  # hyperrec up is not running

    bad = tmp_path / "bad.parquet"
    pd.DataFrame({"user_id": ["u1"]}).to_parquet(bad)
    refused = runner.invoke(app, ["land", str(bad), "--config", str(config)])
    assert refused.exit_code == 1
    assert f"error: {bad}: missing required interaction columns" in refused.output
    assert len(LandingZone(str(tmp_path / "lz")).batches()) == 1  # nothing more landed
