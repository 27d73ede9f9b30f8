"""Online experiments in serving: which arm a user sees, team-draft interleaving, and the
durable record of impressions and their outcomes.

An experiment runs while the bundle store holds its descriptor ``EXPERIMENT`` (JSON,
:class:`Experiment`, written by ``hyperrec experiment start`` beside ``CURRENT``; the
challenger's bundle is published as its own version without moving ``CURRENT``). Every
serving worker reads it at start-up and at each hot-reload poll, so workers agree, and a
restart changes nothing: assignment (:func:`assign`) is a pure function of the experiment id
and the user id. Without a descriptor serving answers exactly as it does without experiments.

Designs:

- ``ab``: a user is on the challenger when the first 8 bytes of
  ``blake2b(experiment_id NUL user_id)``, read as a fraction of 2^64, fall below ``share``;
  each arm's lists are cached under their own fingerprint.
- ``interleaving``: every user sees one list merged from both rankings by team draft
  (:func:`team_draft`); each position remembers which arm (team) contributed it, and a click
  credits that arm.

Each served list gets an impression id; the impression (id, user, arm, items, teams,
latency) goes, in batches, to the Redis stream ``<ns>:exp:<id>:impressions`` and each event
posted with an impression id to ``<ns>:exp:<id>:outcomes`` (:class:`ExperimentLog`). Both streams carry
no TTL; :mod:`serving.experiment_report` drains them through a consumer group into Parquet.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import redis.asyncio as aioredis

from core.object_store import ObjectStore

log = logging.getLogger(__name__)

EXPERIMENT = "EXPERIMENT"
"""Key of the running experiment's descriptor in the bundle store (absent: no experiment)."""
CHAMPION_ARM, CHALLENGER_ARM, INTERLEAVED = "champion", "challenger", "interleaved"
TEAM_CODES = {CHAMPION_ARM: "A", CHALLENGER_ARM: "B"}
"""One letter per team in a list's ``teams`` string: A champion, B challenger."""
IMPRESSION_ID_PATTERN = r"^[0-9a-f]{32}$"
Design = Literal["ab", "interleaving"]


@dataclass(frozen=True)
class Experiment:
    """One experiment: champion (whatever ``CURRENT`` serves) against the challenger bundle
    ``challenger`` (a published version), ``share`` of users on the challenger (A/B)."""

    id: str
    challenger: str
    share: float
    design: Design = "ab"
    registered_version: int | None = None
    """The challenger's registry version (None for a bundle that is not registered)."""
    champion: str | None = None
    """The version ``CURRENT`` named at start (informational: serving follows ``CURRENT``)."""
    started_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    catalogue_size: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.share < 1.0:
            raise ValueError(f"experiment share must lie in (0, 1), got {self.share}")
        if self.design not in ("ab", "interleaving"):
            raise ValueError(f"experiment design must be 'ab' or 'interleaving', got {self.design!r}")
        if not self.id or any(c not in _ID_CHARS for c in self.id) or len(self.id) > 64:
            raise ValueError(f"experiment id {self.id!r}: use 1-64 characters of [A-Za-z0-9_.-]")

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> Experiment:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("the experiment descriptor is not a JSON object")
        known = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        return cls(**known)

    def arm(self, user_id: str) -> str:
        """The user's arm: :data:`INTERLEAVED` for interleaving, else :func:`assign`'s."""
        return INTERLEAVED if self.design == "interleaving" else assign(self.id, user_id, self.share)


_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")


def bucket(experiment_id: str, user_id: str) -> float:
    """The user's position in [0, 1): the first 8 bytes of ``blake2b(experiment_id NUL
    user_id)`` over 2^64. Stable across processes, restarts and Python versions (unlike
    ``hash()``), and independent between experiments."""
    digest = hashlib.blake2b(f"{experiment_id}\x00{user_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def assign(experiment_id: str, user_id: str, share: float) -> str:
    """:data:`CHALLENGER_ARM` when :func:`bucket` < ``share``, else :data:`CHAMPION_ARM`."""
    return CHALLENGER_ARM if bucket(experiment_id, user_id) < share else CHAMPION_ARM


def team_draft(champion: list[str], challenger: list[str], k: int, seed: str) -> tuple[list[str], str]:
    """Team-draft interleaving (Radlinski, Kurup and Joachims, 2008) of two rankings into at
    most ``k`` items. In each round the team with fewer picks picks next (a coin flip, seeded
    by ``seed``, when both have as many); a team picks its highest-ranked item not in the list
    yet. Returns the items and the teams string (one of :data:`TEAM_CODES`' letters per item).
    When one ranking runs out, the other fills the list."""
    rng = random.Random(seed)
    lists = {"A": champion, "B": challenger}
    cursor = {"A": 0, "B": 0}
    picks = {"A": 0, "B": 0}
    chosen: list[str] = []
    seen: set[str] = set()
    teams: list[str] = []

    def next_of(team: str) -> str | None:
        ranking = lists[team]
        while cursor[team] < len(ranking) and ranking[cursor[team]] in seen:
            cursor[team] += 1
        return ranking[cursor[team]] if cursor[team] < len(ranking) else None

    while len(chosen) < k:
        if picks["A"] < picks["B"]:
            order = ["A", "B"]
        elif picks["B"] < picks["A"]:
            order = ["B", "A"]
        else:
            order = ["A", "B"] if rng.random() < 0.5 else ["B", "A"]
        for team in order:
            item = next_of(team)
            if item is not None:
                break
        else:
            break  # both rankings exhausted
        chosen.append(item)
        seen.add(item)
        teams.append(team)
        picks[team] += 1
    return chosen, "".join(teams)


def new_impression_id() -> str:
    """32 hex digits (a uuid4)."""
    return uuid.uuid4().hex


def read_experiment(store: ObjectStore) -> Experiment | None:
    """The running experiment's descriptor, or None when the store holds none."""
    raw = store.get_bytes(EXPERIMENT)
    return None if raw is None else Experiment.from_json(raw)


def write_experiment(store: ObjectStore, experiment: Experiment) -> None:
    store.put_bytes(EXPERIMENT, experiment.to_json())


def clear_experiment(store: ObjectStore) -> None:
    if store.get_bytes(EXPERIMENT) is not None:
        store.delete(EXPERIMENT)


def impressions_key(namespace: str, experiment_id: str) -> str:
    return f"{namespace}:exp:{experiment_id}:impressions"


def outcomes_key(namespace: str, experiment_id: str) -> str:
    return f"{namespace}:exp:{experiment_id}:outcomes"


@dataclass(frozen=True)
class Impression:
    """What one served list of an experiment showed: the arm (or :data:`INTERLEAVED`), the
    items in order and, when interleaved, which team contributed each."""

    impression_id: str
    experiment_id: str
    user_id: str
    arm: str
    items: str
    """The item ids in list order, as a JSON array."""
    teams: str
    latency_ms: float

    def fields(self) -> dict[str, str]:
        return {
            "impression_id": self.impression_id,
            "experiment_id": self.experiment_id,
            "user_id": self.user_id,
            "arm": self.arm,
            "items": self.items,
            "teams": self.teams,
            "latency_ms": f"{self.latency_ms:.3f}",
            "at": f"{time.time():.3f}",
        }


class ExperimentLog:
    """Appends impressions and attributed outcomes to the experiment's streams (approximate
    ``MAXLEN`` ``maxlen``; no TTL, so a ``volatile-*`` eviction policy never drops them).

    Impressions are buffered in the worker and written in batches, one stream entry per batch
    (field ``impressions``: a JSON array of :meth:`Impression.fields`), by :meth:`flush`: when
    ``max_batch`` are waiting, every ``flush_s`` seconds (:meth:`run`, started by the app) and at
    shutdown. One command per batch instead of one per list served keeps the cost per request
    low; a worker killed outright loses at most the last ``flush_s`` seconds of impressions
    (their outcomes then find no impression and are not counted). Outcomes are written at once.
    """

    def __init__(
        self, client: aioredis.Redis, namespace: str, maxlen: int, *, flush_s: float = 0.05, max_batch: int = 256
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.maxlen = maxlen
        self.flush_s = flush_s
        self.max_batch = max_batch
        self._pending: list[Impression] = []

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def impression(self, impression: Impression) -> None:
        """Buffer ``impression``; flush when ``max_batch`` are waiting."""
        self._pending.append(impression)
        if len(self._pending) >= self.max_batch:
            await self.flush()

    async def flush(self) -> int:
        """Write the buffered impressions (one entry per experiment); returns how many. On a
        Redis error they are dropped (logged by the caller), so a Redis outage cannot grow the
        buffer without bound."""
        batch, self._pending = self._pending, []
        if not batch:
            return 0
        by_experiment: dict[str, list[dict[str, str]]] = {}
        for impression in batch:
            by_experiment.setdefault(impression.experiment_id, []).append(impression.fields())
        pipe = self.client.pipeline(transaction=False)
        for experiment_id, rows in by_experiment.items():
            pipe.xadd(
                impressions_key(self.namespace, experiment_id),
                {"impressions": json.dumps(rows, separators=(",", ":"))},
                maxlen=self.maxlen,
                approximate=True,
            )
        await pipe.execute()
        return len(batch)

    async def run(self) -> None:
        """Flush every ``flush_s`` seconds until cancelled (errors are logged, never raised)."""
        while True:
            await asyncio.sleep(self.flush_s)
            try:
                await self.flush()
            except Exception as exc:
                log.warning("experiment impressions not recorded: %s", exc)

    async def outcome(self, experiment_id: str, fields: dict[str, Any]) -> None:
        entry = {k: "" if v is None else str(v) for k, v in fields.items()}
        entry["at"] = f"{time.time():.3f}"
        await self.client.xadd(
            outcomes_key(self.namespace, experiment_id),
            entry,  # type: ignore[arg-type]
            maxlen=self.maxlen,
            approximate=True,
        )
