"""Ingest: assemble the run's raw dataset from the configured sources."""

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
from core.run_context import RunContext
from core.settings import Settings


def _merge(sources: dict[str, RawDataset], target: RawDataset) -> None:
    """Merge raw datasets into ``target``: interaction parts are copied under a
    per-source name, users and items are concatenated."""
    if target.root.exists():
        shutil.rmtree(target.root)
    target.interactions.mkdir(parents=True)
    for name, source in sources.items():
        for part in sorted(source.interactions.glob("*.parquet")):
            shutil.copy2(part, target.interactions / f"{name}-{part.name}")
        if source.ground_truth.exists():
            shutil.copytree(source.ground_truth, target.ground_truth / name)
    for attr in ("users", "items"):
        tables = [pq.read_table(getattr(s, attr)) for s in sources.values()]
        pq.write_table(pa.concat_tables(tables, promote_options="default"), getattr(target, attr))


def ingest(
    settings: Settings, run: RunContext, dataset: str = ML100K, synthetic_events: int = 0, seed: int = 0
) -> dict:
    """Write the run's raw dataset to ``run.raw_dir``.

    ``dataset`` is ``"ml-100k"`` (the bundled, md5-checked copy), a raw dataset
    directory, or ``""`` for none; ``synthetic_events > 0`` adds a seeded synthetic
    sample with a little injected dirt (0.5 % malformed rows, 0.5 % duplicates) so
    the cleaning stages have work to show.
    """
    with tempfile.TemporaryDirectory(dir=run.root) as tmp:
        sources: dict[str, RawDataset] = {}
        if dataset == ML100K:
            sources["ml100k"] = to_raw_dataset(settings.data_dir / ML100K, Path(tmp) / "ml100k")
        elif dataset:
            sources["dataset"] = RawDataset(Path(dataset)).check()
        if synthetic_events > 0:
            sources["synthetic"] = generate(
                Path(tmp) / "synthetic",
                events=synthetic_events,
                seed=seed,
                malformed_fraction=0.005,
                duplicate_fraction=0.005,
                progress=False,
            )
        if not sources:
            raise ValueError("nothing to ingest: give a dataset or synthetic_events > 0")
        _merge(sources, RawDataset(run.raw_dir))
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in RawDataset(run.raw_dir).interactions.glob("*.parquet"))
    return {"sources": sorted(sources), "rows": rows}
