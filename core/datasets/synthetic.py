"""Seeded synthetic content platform: users with latent taste groups, topical items,
and a stream of interaction events written to Parquet in bounded memory (:func:`generate`,
``hyperrec generate``), with optional drift, malformed rows and duplicates for the
cleaning, validation and drift stages to find.

Good events come in fixed blocks of :data:`BLOCK` rows, each from its own generator
``default_rng([seed, 1, block])``, so the same arguments give byte-identical files whatever
``chunk_size`` is. The generative story (world, users, items, events, drift) is in
docs/models.md ("Synthetic data").
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from core.datasets import RawDataset
from core.schemas import DEVICES, EVENT_TYPES, INTERACTIONS, ITEMS, USERS

BLOCK = 16_384
"""Good events per generator block; fixed so that output is independent of ``chunk_size``."""
ROWS_PER_PART = 5_000_000
"""A new ``part-NNNNN.parquet`` file is started once a part holds this many rows."""
WORLD_SEED = 20260101
"""Seed of the world parameters (group profiles); deliberately not the user's ``seed``."""
DEFAULT_START = datetime(2026, 1, 1, tzinfo=UTC)
FUTURE_EPOCH = datetime(2100, 1, 1, tzinfo=UTC)
UNKNOWN_IDS = 100
"""Number of out-of-range ids used by the ``unknown_user`` / ``unknown_item`` kinds."""

TOPIC_WORDS: dict[str, tuple[str, ...]] = {
    "news": (
        "election",
        "government",
        "policy",
        "report",
        "minister",
        "crisis",
        "vote",
        "parliament",
        "breaking",
        "summit",
    ),
    "sports": (
        "match",
        "goal",
        "league",
        "coach",
        "tournament",
        "striker",
        "season",
        "victory",
        "stadium",
        "championship",
    ),
    "music": ("album", "concert", "guitar", "melody", "band", "singer", "tour", "lyrics", "festival", "playlist"),
    "tech": (
        "software",
        "startup",
        "chip",
        "cloud",
        "smartphone",
        "algorithm",
        "robot",
        "developer",
        "network",
        "gadget",
    ),
    "movies": (
        "film",
        "director",
        "premiere",
        "actor",
        "sequel",
        "trailer",
        "cinema",
        "screenplay",
        "oscar",
        "blockbuster",
    ),
    "gaming": (
        "console",
        "quest",
        "multiplayer",
        "level",
        "esports",
        "controller",
        "boss",
        "speedrun",
        "arcade",
        "guild",
    ),
    "food": ("recipe", "chef", "kitchen", "flavor", "baking", "restaurant", "spice", "dessert", "vegan", "dinner"),
    "travel": (
        "destination",
        "flight",
        "beach",
        "hotel",
        "itinerary",
        "passport",
        "island",
        "backpacking",
        "museum",
        "journey",
    ),
    "fashion": (
        "runway",
        "designer",
        "outfit",
        "trend",
        "fabric",
        "collection",
        "style",
        "sneakers",
        "couture",
        "wardrobe",
    ),
    "science": (
        "research",
        "galaxy",
        "molecule",
        "experiment",
        "climate",
        "genome",
        "physics",
        "telescope",
        "fossil",
        "laboratory",
    ),
    "finance": (
        "market",
        "stocks",
        "investor",
        "inflation",
        "bank",
        "portfolio",
        "earnings",
        "crypto",
        "budget",
        "interest",
    ),
    "health": (
        "fitness",
        "nutrition",
        "sleep",
        "workout",
        "doctor",
        "wellness",
        "vaccine",
        "therapy",
        "running",
        "meditation",
    ),
}
TOPICS: tuple[str, ...] = tuple(TOPIC_WORDS)
FILLER_WORDS = (
    "the",
    "a",
    "new",
    "how",
    "why",
    "today",
    "inside",
    "best",
    "with",
    "about",
    "after",
    "guide",
    "week",
    "story",
)
OCCUPATIONS = (
    "student",
    "engineer",
    "artist",
    "healthcare",
    "educator",
    "sales",
    "retired",
    "executive",
    "writer",
    "technician",
)
REGIONS = ("north", "south", "east", "west", "central")
GENDERS = ("F", "M")

MALFORMED_KINDS: tuple[str, ...] = (
    "missing_user_id",
    "missing_item_id",
    "unknown_event_type",
    "rating_out_of_range",
    "scroll_depth_out_of_range",
    "negative_dwell_time",
    "future_timestamp",
    "unknown_user",
    "unknown_item",
)
"""Malformed row kinds, cycled in this order. Names match the preprocessing quarantine reasons."""
UNKNOWN_EVENT_TYPE = "hover"

# Event-type mix at affinity 0 and affinity 1 (order of EVENT_TYPES); linear in between.
EVENT_PROBS_LOW = np.array([0.58, 0.25, 0.04, 0.02, 0.06, 0.05])
EVENT_PROBS_HIGH = np.array([0.28, 0.22, 0.16, 0.07, 0.15, 0.12])
# Log-dwell offset per event type (view, click, like, share, complete, rate).
DWELL_TYPE_OFFSET = np.array([-0.7, 0.0, 0.3, 0.2, 0.9, 0.5])
GROUP_PEAK_HOURS = (8, 13, 19, 22)
GROUP_AGE_MEANS = (24.0, 33.0, 45.0, 58.0)
GROUP_FEMALE_SHARE = (0.35, 0.65, 0.5, 0.4)
# Share of events per hour of day common to all groups (morning, lunch and evening peaks).
COMMON_HOUR_PROFILE = np.array(
    [
        1,
        0.6,
        0.4,
        0.3,
        0.3,
        0.5,
        1.2,
        2.2,
        3.0,
        2.6,
        2.2,
        2.4,
        3.0,
        2.8,
        2.4,
        2.3,
        2.5,
        3.0,
        3.6,
        4.2,
        4.6,
        4.4,
        3.4,
        2.0,
    ]
)
EXPLORATION = 0.10
DRIFT_DWELL_SCALE = 0.8
"""At ``drift`` d dwell times are multiplied by ``1 + 0.8 d``."""
DRIFT_SCROLL_SHRINK = 0.5
"""At ``drift`` d scroll depths are multiplied by ``1 - 0.5 d``."""
DRIFT_DEVICE_SWITCH = 0.6
"""At ``drift`` d a share ``0.6 d`` of events switch to tablet or tv."""
DRIFT_HOUR_SHIFT_H = 6.0
"""At ``drift`` d every event's time of day moves ``6 d`` hours later."""

US_PER_S = 1_000_000
US_PER_H = 3600 * US_PER_S
US_PER_DAY = 24 * US_PER_H
RAW_INTERACTIONS_SCHEMA = pa.schema([f.with_nullable(True) for f in INTERACTIONS.arrow()])
"""The INTERACTIONS types with every column nullable: raw files may hold malformed rows."""


@dataclass(frozen=True)
class World:
    """Seed-independent group parameters."""

    group_pref: np.ndarray  # (groups, topics), rows sum to 1
    peak_hour: np.ndarray  # (groups,)
    age_mean: np.ndarray  # (groups,)
    female_share: np.ndarray  # (groups,)
    occupation_p: np.ndarray  # (groups, occupations)
    region_p: np.ndarray  # (groups, regions)
    device_p: np.ndarray  # (groups, devices): the users' primary device


@dataclass(frozen=True)
class Population:
    """Sampled users and items plus the lookup tables the event sampler needs."""

    user_ids: pa.Array  # n_users + UNKNOWN_IDS ids; the tail ids are not in users.parquet
    item_ids: pa.Array  # n_items + UNKNOWN_IDS ids
    n_users: int
    n_items: int
    user_group: np.ndarray
    user_pref: np.ndarray  # (users, topics), the drift-free preference
    user_device: np.ndarray
    user_cdf: np.ndarray  # cumulative activity share
    pref_eff: np.ndarray  # (users, topics) preference after drift, exploration and topic availability
    item_topic: np.ndarray
    item_order: np.ndarray  # item indices sorted by (topic, popularity rank)
    item_gcdf: np.ndarray  # topic t + within-topic popularity cdf, aligned with item_order


@dataclass(frozen=True)
class Params:
    events: int
    users: int
    items: int
    groups: int
    seed: int
    drift: float
    malformed_fraction: float
    duplicate_fraction: float
    chunk_size: int
    start: datetime
    days: int

    def to_json(self) -> dict[str, Any]:
        return {
            "events": self.events,
            "users": self.users,
            "items": self.items,
            "groups": self.groups,
            "seed": self.seed,
            "drift": self.drift,
            "malformed_fraction": self.malformed_fraction,
            "duplicate_fraction": self.duplicate_fraction,
            "chunk_size": self.chunk_size,
            "start": self.start.isoformat(),
            "days": self.days,
        }


def _ids(prefix: str, n: int) -> pa.Array:
    """``prefix`` + zero-padded index (at least 6 digits) for ``0 .. n-1``."""
    width = max(6, len(str(n - 1)))
    return pa.array([f"{prefix}{i:0{width}d}" for i in range(n)], pa.string())


def _check_params(p: Params) -> None:
    for name in ("events", "users", "items", "groups", "chunk_size", "days"):
        if getattr(p, name) < 1:
            raise ValueError(f"synthetic: {name} must be >= 1, got {getattr(p, name)}")
    if p.seed < 0:
        raise ValueError(f"synthetic: seed must be >= 0, got {p.seed}")
    for name in ("drift", "malformed_fraction", "duplicate_fraction"):
        if not 0.0 <= getattr(p, name) <= 1.0:
            raise ValueError(f"synthetic: {name} must be within [0, 1], got {getattr(p, name)}")


def _utc(start: datetime | None) -> datetime:
    if start is None:
        return DEFAULT_START
    return start.replace(tzinfo=UTC) if start.tzinfo is None else start.astimezone(UTC)


def _epoch_us(moment: datetime) -> int:
    return int(round(moment.timestamp() * US_PER_S))


def make_world(groups: int) -> World:
    """Group profiles. Groups 0-3 focus on disjoint topic triples; later groups pick
    triples from a fixed world generator. Focus weights 0.5/0.3/0.2 take 85% of the mass."""
    rng = np.random.default_rng(WORLD_SEED)
    n_topics = len(TOPICS)
    pref = np.full((groups, n_topics), 0.15 / n_topics)
    for g in range(groups):
        focus = np.arange(3 * g, 3 * g + 3) % n_topics if g < n_topics // 3 else rng.choice(n_topics, 3, replace=False)
        pref[g, focus] += 0.85 * np.array([0.5, 0.3, 0.2])
    index = np.arange(groups)
    device_base = np.array(
        [[0.6, 0.25, 0.1, 0.05], [0.3, 0.55, 0.1, 0.05], [0.35, 0.2, 0.3, 0.15], [0.3, 0.1, 0.2, 0.4]]
    )
    return World(
        group_pref=pref,
        peak_hour=np.array([(GROUP_PEAK_HOURS[g % 4] + g // 4) % 24 for g in index]),
        age_mean=np.array([GROUP_AGE_MEANS[g % 4] + 3.0 * (g // 4) for g in index]),
        female_share=np.array([GROUP_FEMALE_SHARE[g % 4] for g in index]),
        occupation_p=rng.dirichlet(np.full(len(OCCUPATIONS), 0.4), size=groups),
        region_p=rng.dirichlet(np.full(len(REGIONS), 0.6), size=groups),
        device_p=device_base[index % 4],
    )


def _categorical(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One draw per row of ``probs`` (rows sum to 1)."""
    cdf = np.cumsum(probs, axis=1)
    return np.minimum((rng.random((probs.shape[0], 1)) > cdf).sum(axis=1), probs.shape[1] - 1)


def sample_users(
    rng: np.random.Generator, world: World, n_users: int
) -> tuple[pa.Table, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Users table (USERS schema) plus group, preference, primary device and activity arrays."""
    groups = world.group_pref.shape[0]
    group = rng.permutation(np.arange(n_users) % groups)
    pref = np.vstack([rng.dirichlet(40.0 * world.group_pref[g]) for g in group])
    pref = np.maximum(pref, 1e-9)
    pref /= pref.sum(axis=1, keepdims=True)
    age = np.clip(np.rint(rng.normal(world.age_mean[group], 6.0)), 16, 85).astype(np.int32)
    gender = np.where(rng.random(n_users) < world.female_share[group], 0, 1)
    occupation = _categorical(rng, world.occupation_p[group])
    region = _categorical(rng, world.region_p[group])
    device = _categorical(rng, world.device_p[group])
    activity = rng.lognormal(0.0, 1.0, n_users)
    for g in range(groups):
        members = group == g
        if members.any():
            activity[members] /= activity[members].sum()
    activity /= activity.sum()
    table = USERS.conform(
        pa.table(
            {
                "user_id": _ids("u", n_users),
                "age": pa.array(age, pa.int32()),
                "gender": pa.array(np.array(GENDERS)[gender]),
                "occupation": pa.array(np.array(OCCUPATIONS)[occupation]),
                "region": pa.array(np.array(REGIONS)[region]),
            }
        )
    )
    return table, group, pref, device, activity


def _item_text(rng: np.random.Generator, main: int, second: int) -> tuple[str, str]:
    """Title and body from the topic vocabularies: mostly main-topic words, some second-topic and filler."""
    main_words, second_words = TOPIC_WORDS[TOPICS[main]], TOPIC_WORDS[TOPICS[second if second >= 0 else main]]
    title_words = [main_words[i] for i in rng.choice(len(main_words), 3, replace=False)]
    title = f"{title_words[0].capitalize()} {rng.choice(FILLER_WORDS)} {title_words[1]} {title_words[2]}"
    n_words = int(rng.integers(25, 41))
    source = rng.choice(3, n_words, p=[0.7, 0.15, 0.15])
    words = [
        main_words[rng.integers(len(main_words))]
        if s == 0
        else second_words[rng.integers(len(second_words))]
        if s == 1
        else FILLER_WORDS[rng.integers(len(FILLER_WORDS))]
        for s in source
    ]
    return title, " ".join(words).capitalize() + "."


def sample_items(
    rng: np.random.Generator, n_items: int, start_us: int, days: int
) -> tuple[pa.Table, np.ndarray, np.ndarray, np.ndarray]:
    """Items table (ITEMS schema) plus main topic, second topic (-1 = none) and popularity arrays."""
    n_topics = len(TOPICS)
    topic = rng.permutation(np.arange(n_items) % n_topics)
    second = np.where(rng.random(n_items) < 0.35, (topic + rng.integers(1, n_topics, n_items)) % n_topics, -1)
    popularity = np.empty(n_items)
    for t in range(n_topics):
        members = np.flatnonzero(topic == t)
        rank = rng.permutation(len(members))
        popularity[members] = 1.0 / (rank + 1.0) ** 1.1
    texts = [_item_text(rng, int(topic[i]), int(second[i])) for i in range(n_items)]
    published = start_us - days * US_PER_DAY + rng.integers(0, days * US_PER_DAY, n_items)
    categories = [[TOPICS[t]] + ([TOPICS[s]] if s >= 0 else []) for t, s in zip(topic, second)]
    table = ITEMS.conform(
        pa.table(
            {
                "item_id": _ids("i", n_items),
                "title": pa.array([t for t, _ in texts]),
                "text": pa.array([x for _, x in texts]),
                "categories": pa.array(categories, pa.list_(pa.string())),
                "published_at": pa.array(published, pa.timestamp("us", tz="UTC")),
            }
        )
    )
    return table, topic, second, popularity


def _effective_pref(pref: np.ndarray, drift: float, available: np.ndarray) -> np.ndarray:
    """Preference after drift (mix with the preference rotated by half the topics),
    exploration (10% uniform) and masking topics without items; rows sum to 1."""
    rotated = np.roll(pref, len(TOPICS) // 2, axis=1)
    eff = (1.0 - drift) * pref + drift * rotated
    eff = (1.0 - EXPLORATION) * eff + EXPLORATION / len(TOPICS)
    eff = eff * available
    return eff / eff.sum(axis=1, keepdims=True)


def build_population(p: Params, world: World) -> tuple[Population, pa.Table, pa.Table, pa.Table, pa.Table]:
    """Sample users and items; return the sampler state, users/items tables and their ground truth."""
    start_us = _epoch_us(p.start)
    users, group, pref, device, activity = sample_users(np.random.default_rng([p.seed, 0, 0]), world, p.users)
    items, topic, second, popularity = sample_items(np.random.default_rng([p.seed, 0, 1]), p.items, start_us, p.days)
    available = np.bincount(topic, minlength=len(TOPICS)) > 0
    order = np.lexsort((-popularity, topic))
    gcdf = np.empty(p.items)
    for t in np.flatnonzero(available):
        members = order[topic[order] == t]
        positions = np.flatnonzero(topic[order] == t)
        cdf = np.cumsum(popularity[members])
        gcdf[positions] = t + cdf / cdf[-1]
    population = Population(
        user_ids=_ids("u", p.users + UNKNOWN_IDS),
        item_ids=_ids("i", p.items + UNKNOWN_IDS),
        n_users=p.users,
        n_items=p.items,
        user_group=group,
        user_pref=pref,
        user_device=device,
        user_cdf=np.cumsum(activity),
        pref_eff=_effective_pref(pref, p.drift, available),
        item_topic=topic,
        item_order=order,
        item_gcdf=gcdf,
    )
    truth_users = pa.table(
        {
            "user_id": users.column("user_id"),
            "group": pa.array(group, pa.int32()),
            **{f"pref_{t}": pa.array(pref[:, j]) for j, t in enumerate(TOPICS)},
            "activity": pa.array(activity),
        }
    )
    truth_items = pa.table(
        {
            "item_id": items.column("item_id"),
            "topic": pa.array(np.array(TOPICS)[topic]),
            "second_topic": pa.array([TOPICS[s] if s >= 0 else None for s in second], pa.string()),
            "popularity": pa.array(popularity),
        }
    )
    return population, users, items, truth_users, truth_items


def sample_events(rng: np.random.Generator, pop: Population, world: World, p: Params, n: int) -> dict[str, np.ndarray]:
    """``n`` good events as numpy columns (ids as indices, rating NaN when absent)."""
    user = np.minimum(np.searchsorted(pop.user_cdf, rng.random(n), side="right"), pop.n_users - 1)
    topic = _categorical(rng, pop.pref_eff[user])
    pos = np.minimum(np.searchsorted(pop.item_gcdf, topic + rng.random(n), side="right"), pop.n_items - 1)
    item = pop.item_order[pos]
    eff = pop.pref_eff[user]
    affinity = eff[np.arange(n), pop.item_topic[item]] / eff.max(axis=1)

    event = _categorical(rng, (1.0 - affinity)[:, None] * EVENT_PROBS_LOW + affinity[:, None] * EVENT_PROBS_HIGH)
    rating = np.clip(np.rint(1.5 + 3.2 * affinity + rng.normal(0.0, 0.8, n)), 1.0, 5.0)
    rating = np.where(event == EVENT_TYPES.index("rate"), rating, np.nan)
    log_dwell = np.log(15.0) + 1.2 * affinity + DWELL_TYPE_OFFSET[event] + rng.normal(0.0, 0.7, n)
    dwell = np.round(np.exp(log_dwell) * (1.0 + DRIFT_DWELL_SCALE * p.drift), 2)
    complete = event == EVENT_TYPES.index("complete")
    scroll = rng.beta(1.2 + 3.0 * affinity + 4.0 * complete, 2.0)
    scroll = np.round(scroll * (1.0 - DRIFT_SCROLL_SHRINK * p.drift), 4)

    group = pop.user_group[user]
    common = np.minimum(
        np.searchsorted(np.cumsum(COMMON_HOUR_PROFILE) / COMMON_HOUR_PROFILE.sum(), rng.random(n), side="right"), 23
    )
    personal = (world.peak_hour[group] + np.rint(rng.normal(0.0, 2.5, n)).astype(np.int64)) % 24
    hour = np.where(rng.random(n) < 0.5, common, personal)
    shift_us = int(round(p.drift * DRIFT_HOUR_SHIFT_H * US_PER_H))
    tod = (hour * US_PER_H + rng.integers(0, US_PER_H, n) + shift_us) % US_PER_DAY
    day = rng.integers(0, p.days, n)
    start_us = _epoch_us(p.start)
    ts = start_us + day * US_PER_DAY + tod

    local_hour = tod // US_PER_H
    device = np.where(rng.random(n) < 0.5, pop.user_device[user], _categorical(rng, _hour_device_probs()[local_hour]))
    switch = rng.random(n) < DRIFT_DEVICE_SWITCH * p.drift
    device = np.where(switch, DEVICES.index("tablet") + rng.integers(0, 2, n), device)
    return {
        "user": user,
        "session_user": user,
        "item": item,
        "event": event,
        "rating": rating,
        "dwell": dwell,
        "scroll": scroll,
        "device": device,
        "ts": ts,
        "session_hour": (ts - start_us) // US_PER_H,
    }


def _hour_device_probs() -> np.ndarray:
    """(24, devices) device mix by local hour: desktop at work hours, tv/tablet in the evening."""
    probs = np.tile(np.array([0.7, 0.1, 0.12, 0.08]), (24, 1))
    probs[9:18] = [0.3, 0.6, 0.07, 0.03]
    probs[18:24] = [0.4, 0.1, 0.22, 0.28]
    return probs


def corrupt(
    rng: np.random.Generator, good: dict[str, np.ndarray], kinds: np.ndarray, p: Params, pop: Population
) -> dict[str, np.ndarray]:
    """Copies of random good rows, each broken in exactly one way: ``MALFORMED_KINDS[kinds[j]]``."""
    n_good = len(good["user"])
    source = rng.integers(0, n_good, len(kinds))
    bad = {k: v[source].copy() for k, v in good.items()}
    counter = np.arange(len(kinds))
    alt = (counter // len(MALFORMED_KINDS)) % 2 == 0  # alternate the two broken values of a kind

    def rows(kind: str) -> np.ndarray:
        return kinds == MALFORMED_KINDS.index(kind)

    bad["user"][rows("missing_user_id")] = -1
    bad["item"][rows("missing_item_id")] = -1
    bad["event"][rows("unknown_event_type")] = len(EVENT_TYPES)
    m = rows("rating_out_of_range")
    bad["event"][m] = EVENT_TYPES.index("rate")
    bad["rating"][m] = np.where(alt[m], 0.0, 7.0)
    m = rows("scroll_depth_out_of_range")
    bad["scroll"][m] = np.where(alt[m], 1.5, -0.25)
    m = rows("negative_dwell_time")
    bad["dwell"][m] = -np.maximum(bad["dwell"][m], 1.0)
    m = rows("future_timestamp")
    bad["ts"][m] = bad["ts"][m] - _epoch_us(p.start) + _epoch_us(FUTURE_EPOCH)
    m = rows("unknown_user")
    bad["user"][m] = pop.n_users + rng.integers(0, UNKNOWN_IDS, int(m.sum()))
    m = rows("unknown_item")
    bad["item"][m] = pop.n_items + rng.integers(0, UNKNOWN_IDS, int(m.sum()))
    return bad


def to_table(cols: dict[str, np.ndarray], pop: Population) -> pa.Table:
    """Arrow table in RAW_INTERACTIONS_SCHEMA column order; index -1 becomes a null id."""

    def ids(vocab: pa.Array, index: np.ndarray) -> pa.Array:
        return vocab.take(pa.array(index, pa.int64(), mask=index < 0))

    events = pa.array((*EVENT_TYPES, UNKNOWN_EVENT_TYPE))
    session_user = ids(pop.user_ids, cols["session_user"])
    session = pc.binary_join_element_wise(session_user, pc.cast(pa.array(cols["session_hour"]), pa.string()), "-h")
    return pa.table(
        {
            "user_id": ids(pop.user_ids, cols["user"]),
            "item_id": ids(pop.item_ids, cols["item"]),
            "event_type": events.take(pa.array(cols["event"], pa.int64())),
            "rating": pa.array(cols["rating"], pa.float64(), mask=np.isnan(cols["rating"])),
            "dwell_time_s": pa.array(cols["dwell"], pa.float64()),
            "scroll_depth": pa.array(cols["scroll"], pa.float64()),
            "device": pa.array(DEVICES).take(pa.array(cols["device"], pa.int64())),
            "session_id": session,
            "timestamp": pa.array(cols["ts"], pa.int64()).cast(pa.timestamp("us", tz="UTC")),
            "event_id": pa.nulls(len(cols["user"]), pa.string()),  # only events sent to the serving tier have one
        }
    )


def _share(fraction: float, upto: int) -> int:
    """Extra rows owed after ``upto`` good rows: ``round(fraction * upto)`` (monotone in ``upto``)."""
    return int(round(fraction * upto))


def block_table(b: int, pop: Population, world: World, p: Params) -> tuple[pa.Table, np.ndarray, int]:
    """Rows of block ``b``: its good events, then malformed rows and duplicates, shuffled.

    Returns the table, the malformed kind index of each malformed row and the duplicate count.
    """
    lo, hi = b * BLOCK, min((b + 1) * BLOCK, p.events)
    rng = np.random.default_rng([p.seed, 1, b])
    good_cols = sample_events(rng, pop, world, p, hi - lo)
    good = INTERACTIONS.conform(to_table(good_cols, pop)).cast(RAW_INTERACTIONS_SCHEMA)
    first_bad = _share(p.malformed_fraction, lo)
    kinds = np.arange(first_bad, _share(p.malformed_fraction, hi)) % len(MALFORMED_KINDS)
    n_dup = _share(p.duplicate_fraction, hi) - _share(p.duplicate_fraction, lo)
    parts = [good]
    if len(kinds):
        bad = to_table(corrupt(rng, good_cols, kinds, p, pop), pop)
        parts.append(bad.cast(RAW_INTERACTIONS_SCHEMA))
    if n_dup:
        parts.append(good.take(pa.array(rng.integers(0, good.num_rows, n_dup))))
    table = pa.concat_tables(parts)
    return table.take(pa.array(rng.permutation(table.num_rows))), kinds, n_dup


class PartWriter:
    """Writes row groups of exactly ``chunk_size`` rows (the last may be shorter) into
    ``part-NNNNN.parquet`` files, starting a new file after :data:`ROWS_PER_PART` rows."""

    def __init__(self, directory: Path, chunk_size: int) -> None:
        self.directory, self.chunk_size = directory, chunk_size
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.parts: list[str] = []
        self._writer: pq.ParquetWriter | None = None
        self._part_rows = 0

    def add(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.pending_rows += table.num_rows
        while self.pending_rows >= self.chunk_size:
            merged = pa.concat_tables(self.pending)
            self._write(merged.slice(0, self.chunk_size))
            rest = merged.slice(self.chunk_size)
            self.pending, self.pending_rows = [rest], rest.num_rows

    def _write(self, chunk: pa.Table) -> None:
        if self._writer is None or self._part_rows >= ROWS_PER_PART:
            self._close_part()
            name = f"part-{len(self.parts):05d}.parquet"
            self._writer = pq.ParquetWriter(self.directory / name, RAW_INTERACTIONS_SCHEMA)
            self.parts.append(name)
        self._writer.write_table(chunk.combine_chunks(), row_group_size=self.chunk_size)
        self._part_rows += chunk.num_rows

    def _close_part(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._writer, self._part_rows = None, 0

    def close(self) -> None:
        if self.pending_rows or not self.parts:
            self._write(pa.concat_tables(self.pending) if self.pending else RAW_INTERACTIONS_SCHEMA.empty_table())
        self.pending, self.pending_rows = [], 0
        self._close_part()


@contextmanager
def _progress(enabled: bool, total: int) -> Iterator[Callable[[int], None]]:
    """A rich progress bar over ``total`` events (hidden when disabled); yields ``advance(n)``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("synthetic events"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), disable=not enabled
    ) as bar:
        task = bar.add_task("events", total=total)
        yield lambda n: bar.advance(task, n)


def generate(
    out: Path,
    *,
    events: int,
    users: int | None = None,
    items: int | None = None,
    groups: int = 4,
    seed: int = 0,
    drift: float = 0.0,
    malformed_fraction: float = 0.0,
    duplicate_fraction: float = 0.0,
    chunk_size: int = 200_000,
    start: datetime | None = None,
    days: int = 30,
    progress: bool = True,
) -> RawDataset:
    """Write a synthetic raw dataset to ``out`` and return it.

    ``events`` good events are written, plus ``round(malformed_fraction * events)``
    malformed rows (kinds cycled through :data:`MALFORMED_KINDS`) and
    ``round(duplicate_fraction * events)`` exact copies of good rows. Defaults:
    ``users = max(50, events // 50)``, ``items = max(50, events // 100)``, ``start``
    2026-01-01 UTC; event timestamps lie in ``[start, start + days)``. Memory is bounded
    by ``chunk_size`` (Parquet row-group size) and :data:`BLOCK`; the rows themselves do
    not depend on ``chunk_size``. Same arguments give byte-identical files. Existing
    ``interactions/`` and ``ground_truth/`` under ``out`` are replaced.
    """
    p = Params(
        events=events,
        users=users if users is not None else max(50, events // 50),
        items=items if items is not None else max(50, events // 100),
        groups=groups,
        seed=seed,
        drift=float(drift),
        malformed_fraction=float(malformed_fraction),
        duplicate_fraction=float(duplicate_fraction),
        chunk_size=chunk_size,
        start=_utc(start),
        days=days,
    )
    _check_params(p)
    dataset = RawDataset(Path(out))
    for directory in (dataset.interactions, dataset.ground_truth):
        if directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True)

    world = make_world(p.groups)
    pop, users_t, items_t, truth_users, truth_items = build_population(p, world)
    pq.write_table(users_t, dataset.users)
    pq.write_table(items_t, dataset.items)
    pq.write_table(truth_users, dataset.ground_truth / "users.parquet")
    pq.write_table(truth_items, dataset.ground_truth / "items.parquet")

    malformed = np.zeros(len(MALFORMED_KINDS), dtype=np.int64)
    duplicates = total = 0
    writer = PartWriter(dataset.interactions, p.chunk_size)
    with _progress(progress, p.events) as advance:
        for b in range(-(-p.events // BLOCK)):
            table, kinds, n_dup = block_table(b, pop, world, p)
            writer.add(table)
            malformed += np.bincount(kinds, minlength=len(MALFORMED_KINDS))
            duplicates += n_dup
            total += table.num_rows
            advance(min(BLOCK, p.events - b * BLOCK))
    writer.close()

    manifest = {
        "generator": "core.datasets.synthetic",
        "parameters": p.to_json(),
        "topics": list(TOPICS),
        "malformed_kinds": list(MALFORMED_KINDS),
        "counts": {
            "users": p.users,
            "items": p.items,
            "good_events": p.events,
            "malformed": {k: int(n) for k, n in zip(MALFORMED_KINDS, malformed)},
            "malformed_total": int(malformed.sum()),
            "duplicates": duplicates,
            "total_rows": total,
        },
        "parts": writer.parts,
    }
    (dataset.ground_truth / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return dataset.check()
