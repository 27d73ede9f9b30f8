"""A pipeline run's own directory and the fixed layout of what each stage writes there."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from core.files import write_json_atomic
from core.settings import Settings


def _safe(run_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", run_id).strip("_") or "run"


@dataclass(frozen=True)
class RunContext:
    """Where one run keeps its artifacts: ``<home>/runs/<run_id>/``."""

    run_id: str
    root: Path

    @classmethod
    def create(cls, settings: Settings, run_id: str | None = None) -> RunContext:
        run_id = _safe(run_id or datetime.now(UTC).strftime("run_%Y%m%dT%H%M%S_%f"))
        root = settings.runs_dir / run_id
        root.mkdir(parents=True, exist_ok=True)
        return cls(run_id=run_id, root=root)

    @classmethod
    def of_airflow_run(cls, settings: Settings, run_id: str) -> RunContext:
        """The run directory :meth:`create` made for an Airflow run id."""
        return cls.open(settings.runs_dir / _safe(run_id))

    @classmethod
    def open(cls, root: str | Path) -> RunContext:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"run directory not found: {root}")
        return cls(run_id=root.name, root=root)

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    # Stage outputs.
    @property
    def raw_dir(self) -> Path:
        return self.path("raw")

    @property
    def clean_dir(self) -> Path:
        return self.path("clean")

    @property
    def quarantine_dir(self) -> Path:
        return self.path("quarantine")

    @property
    def split_dir(self) -> Path:
        return self.path("split")

    @property
    def features_dir(self) -> Path:
        return self.path("features")

    @property
    def gx_dir(self) -> Path:
        return self.path("gx")

    @property
    def models_dir(self) -> Path:
        return self.path("models")

    @property
    def drift_dir(self) -> Path:
        return self.path("drift")

    def write_json(self, name: str, payload: Any) -> Path:
        """Write ``payload`` to ``<root>/<name>`` atomically (overwriting: tasks are
        idempotent; a reader never sees half a file)."""
        target = self.path(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        return write_json_atomic(target, payload)

    def read_json(self, name: str) -> Any:
        target = self.path(name)
        if not target.exists():
            raise FileNotFoundError(f"{target} missing: has the stage that writes it run?")
        return json.loads(target.read_text())
