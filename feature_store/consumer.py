"""The event-stream consumer (``hyperrec consume``): the serving tier's events to the landing
zone, each exactly once, and to fresh online profiles within seconds.

It reads the stream ``<ns>:events`` (:func:`core.events.stream_key`, ``ns`` =
``serving.namespace``) in the consumer group ``landing.consumer_group`` (created at the
stream's start, ``MKSTREAM``) as the consumer ``<hostname>-<pid>``. Every read
(``XREADGROUP``) first updates the online profiles of the users it touches, then joins a
buffer; when the buffer holds ``landing.batch_max_events`` events or its oldest was read
``landing.batch_max_wait_s`` ago, the buffer is landed as ONE batch
(:meth:`pipelines.landing.LandingZone.land_events`, every row with its ``event_id``) and only
then acknowledged (``XACK``). SIGTERM/SIGINT stop it after a last flush.

Keys under ``<ns>:consumer:<group>``: ``:heartbeat`` (ISO time, refreshed every
:data:`HEARTBEAT_S` by any consumer of the group; :func:`consumer_healthy`),
``:alive:<consumer>`` (``{"host", "pid"}``, expiring :data:`ALIVE_TTL_S` after its last
refresh) and ``:inflight`` (hash: flush token → ``{"consumer", "ids"}``).

Exactly once to the landing zone
--------------------------------
A stream entry is *landed* when a committed batch holds its event (a batch commits
atomically: pipelines/landing.py), *acked* when it left the group's pending list. A flush

1. writes the record ``inflight[token] = {consumer, stream ids}`` (``token`` fresh),
2. refreshes its own alive key (``SET XX``); if that key had expired, this consumer may have
   been presumed dead and its entries claimed, so it lands nothing, drops its buffer and goes
   on under a new name (fencing);
3. lands the buffer as one batch whose manifest ``origin`` names the token;
4. acks the ids and deletes the record in one MULTI.

Hence an entry delivered to a consumer is always in one of three states: (a) pending, not
landed (no record, or a record whose batch never committed); (b) pending and landed, its
record present (a crash between 3 and 4); (c) acked and landed, its record gone. Recovery
of a consumer that will not finish its flushes — a dead one (on start and every
:data:`RECLAIM_EVERY_S`), or a previous process of this consumer's own name (on start) —
first resolves each of its records: when a batch with the record's origin exists (b) the ids
are acked and the record deleted in one MULTI, otherwise (a) the record is deleted. Only
then are its pending entries claimed (a Lua script that claims exactly the entries still
pending for that consumer, atomically) or, for its own name, re-read (``XREADGROUP`` id
``0``), and processed like new ones. So the entries landed again are exactly those in (a):
nothing lands twice, and nothing is lost, as nothing is acked before its batch committed
(the one loss, logged, is an entry trimmed from the stream by serving's ``MAXLEN`` before
anyone landed it).

A consumer is *dead* when its alive key is gone, or when the key names this host and a
process id that no longer runs (so a ``kill -9``-ed consumer restarted on the same host is
recovered at once). A peer claims a consumer's entries only once it is dead, and a consumer
lands only right after refreshing its key with ``SET XX`` (step 2), which leaves the key
:data:`ALIVE_TTL_S` more seconds: two consumers never land the same entry as long as a
landing finishes within that time. The serving tier appends one stream entry per
``event_id`` (within its ``event_id_ttl_s``, serving/events.py), so every event id lands
once.

Fresh online profiles
---------------------
For each read, the events are added to their users' histories in the online store
(:meth:`feature_store.online.OnlineStore.add_history`: the newest
:data:`~feature_store.online.HISTORY_MAX_EVENTS` per user, keyed by ``event_id``, so a
redelivered event changes nothing; ``build_features`` seeds them with the train events),
and each touched user's profile is recomputed by
:func:`feature_store.profiles.build_user_profiles` — the offline definitions, unchanged —
from the user's whole history and the items and users tables ``build_features`` stored
(:class:`ProfileInputs`), **as of** ``max(consumer clock, newest event time in those
histories)`` (UTC), stored as the hash's ``_as_of``. The update is optimistic (``WATCH``
on the histories): a profile is never written from a history another consumer changed
meanwhile. Events carry no ``confidence`` from the serving tier, so the builder weighs them
1. A profile failure is logged and counted; it never holds up landing.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pandas as pd
import redis

from core.events import Event, interactions_table, stream_key
from core.processes import pid_alive
from core.schemas import ITEMS, USERS
from core.settings import Settings
from feature_store.definitions import USER_FEATURES
from feature_store.online import DEFAULT_TTL_S, OnlineStore
from feature_store.profiles import build_user_profiles
from pipelines.landing import LandingZone

log = logging.getLogger(__name__)

HEARTBEAT_S = 2.0
ALIVE_TTL_S = 15
# consumer_healthy: the group's heartbeat is at most this old.
HEALTHY_WITHIN_S = 10.0
RECLAIM_EVERY_S = 5.0
READ_COUNT = 500
MAX_BLOCK_MS = 1000
WATCH_ATTEMPTS = 5

# KEYS: the stream. ARGV: group, dead consumer, claiming consumer, count. Claims the entries
# still pending for the dead consumer (deleted entries leave the pending list unreturned).
_CLAIM = """
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', ARGV[4], ARGV[2])
if #pending == 0 then return {0, {}} end
local ids = {}
for i, entry in ipairs(pending) do ids[i] = entry[1] end
return {#ids, redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, unpack(ids))}
"""


@dataclass(frozen=True)
class Entry:
    """One stream entry read by the consumer."""

    stream_id: str
    event: Event


def group_prefix(namespace: str, group: str) -> str:
    return f"{namespace}:consumer:{group}"


def heartbeat_key(namespace: str, group: str) -> str:
    """The group's heartbeat key (an ISO 8601 UTC time)."""
    return f"{group_prefix(namespace, group)}:heartbeat"


def consumer_healthy(settings: Settings, *, now: datetime | None = None) -> bool:
    """True when a consumer of ``landing.consumer_group`` refreshed the group's heartbeat at
    most :data:`HEALTHY_WITHIN_S` seconds before ``now``; False without one, without an
    ``online_store.url`` or when Redis does not answer."""
    if settings.online_store.url is None:
        return False
    client = redis.Redis.from_url(settings.online_store.url, decode_responses=True, socket_timeout=2.0)
    try:
        raw = client.get(heartbeat_key(settings.serving.namespace, settings.landing.consumer_group))
    except redis.RedisError:
        return False
    finally:
        client.close()
    if raw is None:
        return False
    age = ((now or datetime.now(UTC)) - datetime.fromisoformat(raw)).total_seconds()
    return age <= HEALTHY_WITHIN_S


BEHAVIOUR_DEFS = tuple(d for d in USER_FEATURES if d.source != "users")
DEMOGRAPHIC_DEFS = tuple(d for d in USER_FEATURES if d.source == "users")
_ABSENT_USER = "\x00absent"  # a user id no users table holds
_NO_USERS = pd.DataFrame({"user_id": pd.Series([], dtype=object)})


@dataclass(frozen=True)
class ProfileInputs:
    """What a fresh profile needs besides the user's events: the items table, and the
    demographic features (the definitions with source ``users``) of every user of the users
    table plus those of a user absent from it, computed by the builder once per build.

    A profile is :func:`~feature_store.profiles.build_user_profiles` over all
    :data:`~feature_store.definitions.USER_FEATURES`; the builder computes each definition
    independently, the behavioural ones from the user's own events (and the items), the
    demographic ones from the users table alone, so the two halves are computed apart: per
    read for the touched users only, and per build for everyone.
    """

    version: str | None
    items: pd.DataFrame
    demographics: pd.DataFrame  # indexed by user_id
    absent: pd.Series

    @classmethod
    def build(
        cls, items: pd.DataFrame, users: pd.DataFrame, version: str | None, *, half_life_days: float
    ) -> ProfileInputs:
        if (users["user_id"].astype(str) == _ABSENT_USER).any():
            raise ValueError(f"users: user_id {_ABSENT_USER!r} is reserved")
        epoch = pd.Timestamp(0, tz="UTC")
        probe = pd.DataFrame({"user_id": [_ABSENT_USER], "timestamp": [epoch]})
        table = build_user_profiles(
            probe, items, users, as_of=epoch, half_life_days=half_life_days, defs=DEMOGRAPHIC_DEFS
        ).set_index("user_id")
        return cls(version, items, table.drop(index=_ABSENT_USER), table.loc[_ABSENT_USER])

    def profiles(self, events: pd.DataFrame, as_of: pd.Timestamp, half_life_days: float) -> pd.DataFrame:
        """The profiles (indexed by user_id) of the users with ``events``, as of ``as_of``."""
        behaviour = build_user_profiles(
            events, self.items, _NO_USERS, as_of=as_of, half_life_days=half_life_days, defs=BEHAVIOUR_DEFS
        ).set_index("user_id")
        known = behaviour.index.isin(self.demographics.index)
        demographics = self.demographics.reindex(behaviour.index)
        demographics.loc[~known] = self.absent.to_numpy()
        return pd.concat([behaviour, demographics.astype(self.demographics.dtypes)], axis=1)


class EventConsumer:
    """One consumer of the event stream (see the module docstring); :meth:`run` until stopped,
    or :meth:`start`, :meth:`poll` and :meth:`close` step by step."""

    def __init__(self, settings: Settings, *, name: str | None = None) -> None:
        if settings.online_store.url is None:
            raise ValueError("the consumer needs online_store.url (or `hyperrec up` running): the serving tier's Redis")
        self.settings = settings
        self.namespace = settings.serving.namespace
        self.group = settings.landing.consumer_group
        self.max_events = settings.landing.batch_max_events
        self.max_wait_s = settings.landing.batch_max_wait_s
        self.half_life_days = settings.features.half_life_days
        self.host = socket.gethostname()
        self.name = name or f"{self.host}-{os.getpid()}"
        self.store = OnlineStore(settings.online_store.url, namespace=self.namespace)
        self.client = self.store.client
        self.zone = LandingZone.of(settings)
        self.stream = stream_key(self.namespace)
        self._prefix = group_prefix(self.namespace, self.group)
        self._claim = self.client.register_script(_CLAIM)
        self._buffer: list[Entry] = []
        self._buffered_ids: set[str] = set()
        self._buffered_at: float | None = None
        self._inputs: ProfileInputs | None = None
        self._beat_at = self._reclaim_at = 0.0
        self._renames = 0
        counts = ("read", "landed", "batches", "profiles", "profile_errors", "recovered_acked", "dropped")
        self.stats = dict.fromkeys(counts, 0)

    # ------------------------------------------------------------------ keys

    @property
    def inflight_key(self) -> str:
        return f"{self._prefix}:inflight"

    def alive_key(self, consumer: str) -> str:
        return f"{self._prefix}:alive:{consumer}"

    def origin(self, token: str) -> str:
        """The landed batch's ``origin`` for flush ``token``."""
        return f"redis stream {self.stream} group {self.group} flush {token}"

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Join the group (creating it and the stream when absent), announce this consumer,
        re-read its own pending entries, then recover dead consumers' entries."""
        try:
            self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._announce()
        self._beat(force=True)
        self._resolve_inflight({self.name})  # a previous process of the same name crashed mid-flush
        self._read_own_pending()
        self.reclaim_dead()
        log.info("consumer %s reads %s in group %s", self.name, self.stream, self.group)

    def poll(self, block_ms: int | None = None) -> int:
        """One step: heartbeat and recovery when due, one read (blocking up to ``block_ms``,
        default until the buffer is due), fresh profiles, and a flush when due. Returns how
        many entries were read."""
        self._beat()
        if time.monotonic() >= self._reclaim_at:
            self.reclaim_dead()
        if block_ms is None:
            due = (
                self.max_wait_s if self._buffered_at is None else self._buffered_at + self.max_wait_s - time.monotonic()
            )
            block_ms = int(min(max(due, 0.001), MAX_BLOCK_MS / 1000) * 1000)
        count = max(1, min(READ_COUNT, self.max_events - len(self._buffer)))
        reply = self.client.xreadgroup(self.group, self.name, {self.stream: ">"}, count=count, block=block_ms)
        entries = [(sid, fields) for _stream, rows in reply or [] for sid, fields in rows]
        self.accept(entries)
        if self._due():
            self.flush()
        return len(entries)

    def run(self, stop: threading.Event) -> None:
        """:meth:`start`, then :meth:`poll` until ``stop`` is set, then :meth:`close`."""
        self.start()
        try:
            while not stop.is_set():
                self.poll()
        finally:
            self.close()

    def close(self) -> None:
        """Flush the buffer, leave the group when nothing is pending for this consumer, close."""
        try:
            self.flush()
            pending = self.client.xpending_range(self.stream, self.group, "-", "+", 1, consumername=self.name)
            if not pending:
                self.client.xgroup_delconsumer(self.stream, self.group, self.name)
            self.client.delete(self.alive_key(self.name))
            log.info("consumer %s stopped: %s", self.name, self.stats)
        except redis.ConnectionError as exc:  # stopping with the server gone: do not wait for it
            log.warning("consumer %s stopped without Redis (%s): unlanded events stay pending", self.name, exc)
        finally:
            self.store.close()

    # ------------------------------------------------------------------ reading

    def accept(self, entries: Sequence[tuple[str, dict[str, str]]]) -> None:
        """Decode stream entries, bring their users' profiles up to date and buffer them. An
        entry trimmed from the stream (no fields) or that does not decode is acked and logged."""
        good: list[Entry] = []
        bad: list[str] = []
        for stream_id, fields in entries:
            if stream_id in self._buffered_ids:  # delivered to this consumer again
                continue
            try:
                good.append(Entry(stream_id, Event.from_fields(fields)))
            except (ValueError, KeyError) as exc:
                log.error("stream entry %s dropped (%s): %s", stream_id, "trimmed" if not fields else exc, fields)
                bad.append(stream_id)
        if bad:
            self.client.xack(self.stream, self.group, *bad)
            self.stats["dropped"] += len(bad)
        if not good:
            return
        self.stats["read"] += len(good)
        try:
            self.update_profiles([e.event for e in good])
        except Exception:  # profiles are best effort: a failure must not hold up landing
            log.exception("profiles of %d events not refreshed", len(good))
            self.stats["profile_errors"] += 1
        while good:
            room = self.max_events - len(self._buffer)
            chunk, good = good[:room], good[room:]
            if self._buffered_at is None:
                self._buffered_at = time.monotonic()
            self._buffer.extend(chunk)
            self._buffered_ids.update(e.stream_id for e in chunk)
            if len(self._buffer) >= self.max_events:
                self.flush()

    def _read_own_pending(self) -> None:
        """Re-read (id ``0``) and process what is pending for this consumer's name."""
        last = "0"
        while True:
            reply = self.client.xreadgroup(self.group, self.name, {self.stream: last}, count=READ_COUNT)
            rows = [row for _stream, rs in reply or [] for row in rs]
            if not rows:
                return
            self.accept([(sid, fields) for sid, fields in rows])
            last = rows[-1][0]
            self._beat()

    # ------------------------------------------------------------------ landing

    def _due(self) -> bool:
        if not self._buffer:
            return False
        waited = time.monotonic() - (self._buffered_at or 0.0)
        return len(self._buffer) >= self.max_events or waited >= self.max_wait_s

    def flush(self) -> None:
        """Land the buffer as one batch, then ack it (steps 1-4 of the module docstring)."""
        if not self._buffer:
            return
        entries, token = self._buffer, uuid.uuid4().hex
        ids = [e.stream_id for e in entries]
        self.client.hset(self.inflight_key, token, json.dumps({"consumer": self.name, "ids": ids}))
        if not self.client.set(self.alive_key(self.name), self._alive_value(), xx=True, ex=ALIVE_TTL_S):
            self._fenced(token)
            return
        batch = self.zone.land_events(interactions_table([e.event for e in entries]), origin=self.origin(token))
        self._ack(token, ids)
        self._clear()
        self.stats["landed"] += len(entries)
        self.stats["batches"] += 1
        log.info(
            "landed %d events as batch %s and acked them (read %d, profiles %d, batches %d so far)",
            len(entries),
            batch.name,
            self.stats["read"],
            self.stats["profiles"],
            self.stats["batches"],
        )

    def _clear(self) -> None:
        self._buffer, self._buffered_ids, self._buffered_at = [], set(), None

    def _ack(self, token: str, ids: Sequence[str]) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.xack(self.stream, self.group, *ids)
        pipe.hdel(self.inflight_key, token)
        pipe.execute()

    def _fenced(self, token: str) -> None:
        """This consumer's alive key expired: peers may have claimed its entries. Land nothing,
        drop the buffer and continue under a new name; its old name's pending entries are
        recovered like any dead consumer's."""
        n = len(self._buffer)
        log.error(
            "consumer %s was presumed dead (alive key expired): %d buffered events left to recovery", self.name, n
        )
        self.client.hdel(self.inflight_key, token)
        self._clear()
        self._renames += 1
        self.name = f"{self.host}-{os.getpid()}-{self._renames}"
        self._announce()
        self._reclaim_at = 0.0

    # ------------------------------------------------------------------ liveness and recovery

    def _alive_value(self) -> str:
        return json.dumps({"host": self.host, "pid": os.getpid()})

    def _announce(self) -> None:
        self.client.set(self.alive_key(self.name), self._alive_value(), ex=ALIVE_TTL_S)

    def _beat(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._beat_at < HEARTBEAT_S:
            return
        self._beat_at = now
        pipe = self.client.pipeline(transaction=False)
        pipe.set(heartbeat_key(self.namespace, self.group), datetime.now(UTC).isoformat())
        pipe.set(self.alive_key(self.name), self._alive_value(), xx=True, ex=ALIVE_TTL_S)
        if pipe.execute()[1] is None and self._buffer:
            log.warning("consumer %s: alive key had expired; the next flush is fenced", self.name)

    def is_alive(self, consumer: str) -> bool:
        """Whether ``consumer`` lives: its alive key exists and, when it names this host, its
        process runs."""
        if consumer == self.name:
            return True
        raw = self.client.get(self.alive_key(consumer))
        if raw is None:
            return False
        info = json.loads(raw)
        return info.get("host") != self.host or pid_alive(int(info.get("pid", -1)))

    def _resolve_inflight(self, owners: set[str]) -> None:
        """Resolve the in-flight flushes of ``owners`` (consumers that will not finish them):
        ack the ids of those whose batch committed, forget the others."""
        landed_origins: set[str] | None = None
        for token, raw in self.client.hgetall(self.inflight_key).items():
            record = json.loads(raw)
            if record["consumer"] not in owners:
                continue
            if landed_origins is None:
                landed_origins = {b.origin for b in self.zone.batches()}
            if self.origin(token) in landed_origins:
                self._ack(token, record["ids"])
                self.stats["recovered_acked"] += len(record["ids"])
                n = len(record["ids"])
                log.warning("%s had landed %d events but not acked them: acked now", record["consumer"], n)
            else:
                self.client.hdel(self.inflight_key, token)

    def reclaim_dead(self) -> int:
        """Resolve dead consumers' in-flight flushes, claim and process their pending entries,
        and remove them from the group. Returns how many entries were claimed."""
        self._reclaim_at = time.monotonic() + RECLAIM_EVERY_S
        consumers = {c["name"] for c in self.client.xinfo_consumers(self.stream, self.group)}
        owners = {json.loads(raw)["consumer"] for raw in self.client.hvals(self.inflight_key)}
        dead = {c for c in consumers | owners if not self.is_alive(c)}
        if not dead:
            return 0
        self._resolve_inflight(dead)
        claimed = 0
        for consumer in sorted(dead & consumers):
            taken = 0
            while True:
                listed, rows = self._claim(keys=[self.stream], args=[self.group, consumer, self.name, READ_COUNT])
                if not int(listed):
                    break
                entries = [(sid, dict(zip(flat[::2], flat[1::2]))) for sid, flat in rows if flat is not None]
                if int(listed) > len(entries):
                    lost = int(listed) - len(entries)
                    log.error("%d entries of %s were trimmed from the stream before landing", lost, consumer)
                    self.stats["dropped"] += lost
                taken += len(entries)
                self.accept(entries)
                self._beat()
            self.client.xgroup_delconsumer(self.stream, self.group, consumer)
            self.client.delete(self.alive_key(consumer))
            log.info("recovered dead consumer %s: %d pending entries claimed", consumer, taken)
            claimed += taken
        return claimed

    # ------------------------------------------------------------------ fresh profiles

    def profile_inputs(self) -> ProfileInputs:
        """The :class:`ProfileInputs` of the last ``build_features`` (of empty tables without
        one), rebuilt when a newer build stored others."""
        version = self.store.profile_inputs_version()
        if self._inputs is None or self._inputs.version != version:
            stored = self.store.read_profile_inputs()
            if stored is None:
                log.warning("no profile inputs in the online store (run build_features): no categories or demographics")
                items = ITEMS.arrow().empty_table().to_pandas()[["item_id", "categories"]]
                stored = (items, USERS.arrow().empty_table().to_pandas(), version)
            self._inputs = ProfileInputs.build(*stored, half_life_days=self.half_life_days)
        return self._inputs

    def update_profiles(self, events: Sequence[Event]) -> int:
        """Add ``events`` to their users' histories and recompute those users' profiles (see
        the module docstring). Returns how many profiles were written."""
        self.store.add_history(pd.DataFrame([e.row() for e in events]), ttl_s=DEFAULT_TTL_S)
        users = sorted({e.user_id for e in events})
        inputs = self.profile_inputs()
        keys = [self.store.history_key(u) for u in users]
        for _attempt in range(WATCH_ATTEMPTS):
            with self.client.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(*keys)
                    frame = self.store.history(users)
                    newest = frame["timestamp"].max() if len(frame) else pd.NaT
                    now = pd.Timestamp.now(tz="UTC")
                    as_of = now if pd.isna(newest) else max(now, newest)
                    profiles = inputs.profiles(frame, as_of, self.half_life_days)
                    columns = list(profiles.columns)
                    pipe.multi()
                    for user_id, values in zip(profiles.index, profiles.to_numpy(dtype=object)):
                        features = dict(zip(columns, values))
                        self.store.queue_profile(pipe, user_id, features, as_of=as_of, ttl_s=DEFAULT_TTL_S)
                    pipe.execute()
                except redis.WatchError:
                    continue
            self.stats["profiles"] += len(profiles)
            return len(profiles)
        log.warning("profiles of %d users not refreshed: their histories kept changing", len(users))
        return 0


def run_consumer(settings: Settings) -> dict[str, Any]:
    """Consume until SIGTERM or SIGINT (then flush and stop); returns the consumer's counts."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        consumer = EventConsumer(settings)
        consumer.run(stop)
        return consumer.stats
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
