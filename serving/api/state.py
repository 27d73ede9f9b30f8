"""The served model of one app: which bundle ``CURRENT`` names, loaded and swapped in.

:class:`ServingState` loads the version ``CURRENT`` points at (off the event loop) and swaps
it in by one reference assignment: a request holds the model it started with, so none is
dropped or sees a half-loaded model, and a failed load keeps the old one serving.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
from pathlib import Path

from fastapi import HTTPException

from core.object_store import ObjectStore
from core.settings import Settings
from serving.api.metrics import ServingMetrics
from serving.recommender import ServedModel
from serving.store import current_version, fetch
from training.bundle import load_bundle

log = logging.getLogger(__name__)

NO_BUNDLE = "no bundle published: run `make demo` or the recsys_training DAG"


class ServingState:
    """The served model and why there is none (or why the last reload failed)."""

    def __init__(self, store: ObjectStore, cache_dir: Path, settings: Settings, metrics: ServingMetrics) -> None:
        self.store = store
        self.cache_dir = cache_dir
        self.settings = settings
        self.metrics = metrics
        self.served: ServedModel | None = None
        self.error: str | None = NO_BUNDLE
        self._lock = threading.Lock()

    def refresh(self) -> ServedModel | None:
        """Load and swap in the version ``CURRENT`` points at if it is not the one served;
        return the served model. Errors are kept in :attr:`error`, and the old model stays."""
        with self._lock:
            try:
                version = current_version(self.store)
            except Exception as exc:  # a store outage must not take serving down
                self.error = f"cannot read CURRENT from {self.store.uri}: {exc}"
                log.warning(self.error)
                return self.served
            if version is None:
                self.error = None if self.served else NO_BUNDLE
                return self.served
            if self.served is not None and self.served.version == version:
                self.error = None
                return self.served
            try:
                folder = fetch(self.store, version, self.cache_dir / version)
                served = ServedModel(load_bundle(folder), folder, self.settings.serving)
            except Exception as exc:
                self.error = f"cannot load bundle {version!r} from {self.store.uri}: {exc}"
                self.metrics.reloads.labels("error").inc()
                log.error(self.error)
                return self.served
            self.served, self.error = served, None  # the atomic swap
            _freeze_heap()
            self.metrics.set_model(served)
            self.metrics.reloads.labels("ok").inc()
            log.info("serving bundle %s (%s) from %s", version, served.describe(), self.store.uri)
            return served

    async def require(self) -> ServedModel:
        """The served model (loading one if none is yet); 503 when there is none."""
        served = self.served or await asyncio.to_thread(self.refresh)
        if served is None:
            raise HTTPException(status_code=503, detail=self.error or NO_BUNDLE)
        return served

    async def poll(self, interval_s: float) -> None:
        """Re-read ``CURRENT`` every ``interval_s`` seconds (loading happens in a worker thread)."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await asyncio.to_thread(self.refresh)
            except Exception:  # refresh keeps its own errors; never let the poller die
                log.exception("hot-reload poll failed")


def _freeze_heap() -> None:
    """Collect garbage once, then move every live object to the permanent generation, so
    later full collections do not traverse the (large, long-lived) models: fewer, shorter
    GC pauses on the request path. Frozen objects are still freed by reference counting."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
