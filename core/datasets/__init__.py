"""Raw dataset layout shared by every loader.

A raw dataset is a directory holding::

    interactions/part-*.parquet   the INTERACTIONS schema
    users.parquet                 the USERS schema
    items.parquet                 the ITEMS schema
    ground_truth/                 optional: what a synthetic generator knows
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RawDataset:
    root: Path

    @property
    def interactions(self) -> Path:
        return self.root / "interactions"

    @property
    def users(self) -> Path:
        return self.root / "users.parquet"

    @property
    def items(self) -> Path:
        return self.root / "items.parquet"

    @property
    def ground_truth(self) -> Path:
        return self.root / "ground_truth"

    def check(self) -> RawDataset:
        missing = [p for p in (self.interactions, self.users, self.items) if not p.exists()]
        if missing:
            raise FileNotFoundError(f"raw dataset {self.root} lacks {', '.join(str(m) for m in missing)}")
        return self
