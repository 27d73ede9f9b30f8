"""Ingest: assemble the run's raw dataset from its base dataset and the landed batches."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from core.datasets import RawDataset
from core.datasets.movielens import ML100K_NAME as ML100K
from core.datasets.movielens import to_raw_dataset
from core.datasets.synthetic import generate
from core.errors import InputFileError
from core.run_context import RunContext
from core.schemas import ITEMS, USERS
from core.settings import Settings
from pipelines.landing import LandingZone


def _merge(sources: dict[str, RawDataset], target: RawDataset) -> None:
    """Merge raw datasets into ``target``: interaction parts are copied under a
    per-source name; users and items are concatenated, and a key that several sources
    carry keeps its row from the source merged last (a landed batch updates the base)."""
    if target.root.exists():
        shutil.rmtree(target.root)
    target.interactions.mkdir(parents=True)
    for name, source in sources.items():
        for part in sorted(source.interactions.glob("*.parquet")):
            shutil.copy2(part, target.interactions / f"{name}-{part.name}")
        if source.ground_truth.exists():
            shutil.copytree(source.ground_truth, target.ground_truth / name)
    for attr, schema in (("users", USERS), ("items", ITEMS)):
        tables = [pq.read_table(getattr(s, attr)) for s in sources.values()]
        merged = pa.concat_tables(tables, promote_options="default")
        pq.write_table(_keep_last(merged, schema.key[0]), getattr(target, attr))


def _keep_last(table: pa.Table, key: str) -> pa.Table:
    """``table`` with only the last row of each non-null ``key`` (rows without a key are
    kept for preprocessing to quarantine)."""
    frame = table.to_pandas()
    keep = frame[key].isna() | ~frame.duplicated(subset=[key], keep="last")
    return pa.Table.from_pandas(frame[keep], schema=table.schema, preserve_index=False)


def check_dataset(dataset: str | Path) -> RawDataset:
    """The raw dataset directory ``dataset`` (``interactions/`` of Parquet parts,
    ``users.parquet``, ``items.parquet``), checked before a run starts; raises
    :class:`InputFileError` naming the directory and what it lacks."""
    root = Path(dataset)
    if not root.is_dir():
        what = "not a directory" if root.exists() else "no such directory"
        raise InputFileError(f"dataset {root}: {what} (give 'ml-100k' or a raw dataset directory)")
    raw = RawDataset(root)
    missing = [p.name for p in (raw.interactions, raw.users, raw.items) if not p.exists()]
    if not missing and not any(raw.interactions.glob("*.parquet")):
        missing = ["interactions/*.parquet"]
    if missing:
        raise InputFileError(
            f"dataset {root}: missing {', '.join(missing)} (a raw dataset holds interactions/*.parquet, "
            f"users.parquet and items.parquet, as `hyperrec generate` writes)"
        )
    return raw


def ingest(
    settings: Settings,
    run: RunContext,
    dataset: str = ML100K,
    synthetic_events: int = 0,
    seed: int = 0,
    landed: bool = True,
) -> dict:
    """Write the run's raw dataset to ``run.raw_dir`` and what went into it to ``ingest.json``.

    ``dataset`` is ``"ml-100k"`` (the bundled, md5-checked copy), a raw dataset
    directory, or ``""`` for none; ``synthetic_events > 0`` adds a seeded synthetic
    sample with a little injected dirt (0.5 % malformed rows, 0.5 % duplicates) so
    the cleaning stages have work to show. With ``landed``, every batch of the landing
    zone landed within ``landing.window_days`` is added (oldest first), so a run learns
    from what users did since the last one.
    """
    with tempfile.TemporaryDirectory(dir=run.root) as tmp:
        sources: dict[str, RawDataset] = {}
        if dataset == ML100K:
            sources["ml100k"] = to_raw_dataset(settings.data_dir / ML100K, Path(tmp) / "ml100k")
        elif dataset:
            sources["dataset"] = check_dataset(dataset)
        if synthetic_events > 0:
            sources["synthetic"] = generate(
                Path(tmp) / "synthetic",
                events=synthetic_events,
                seed=seed,
                malformed_fraction=0.005,
                duplicate_fraction=0.005,
                progress=False,
            )
        zone = LandingZone.of(settings)
        batches = zone.batches(window_days=settings.landing.window_days) if landed else []
        for batch in batches:
            sources[f"landed-{batch.name}"] = zone.raw_dataset(batch, Path(tmp) / "landed")
        if not sources:
            raise ValueError("nothing to ingest: give a dataset, synthetic_events > 0 or land a batch")
        _merge(sources, RawDataset(run.raw_dir))
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in RawDataset(run.raw_dir).interactions.glob("*.parquet"))
    result = {
        "sources": sorted(s for s in sources if not s.startswith("landed-")),
        "rows": rows,
        "landed_batches": [b.name for b in batches],
        "landed_rows": sum(b.rows for b in batches),
        "landing": zone.uri if landed else None,
    }
    run.write_json("ingest.json", result)
    return result
