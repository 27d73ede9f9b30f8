"""The malformed-input corpus under tests/data/bad: every kind of bad interaction is
quarantined with its reason, nothing crashes, every good row is kept and
``in = clean + quarantined + duplicates`` holds; bad users and items are set aside too.

Corpus convention: ``interactions/<reason>[__<variant>].<csv|jsonl>`` holds good rows
plus rows malformed in exactly that one way. Session ids name the file: good rows carry
``<stem>#<n>``, bad rows (also inside unparseable lines) ``BAD#<stem>``, so expected counts
come from the file itself. To stay fast, all files of one format go through one
preprocess run (a directory input); the tags attribute every output row to its file.
"""

from __future__ import annotations

import re
import shutil
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest

from pipelines.preprocess import QUARANTINE_REASONS, PreprocessReport, preprocess

pytestmark = pytest.mark.spark

BAD_DIR = Path(__file__).resolve().parents[2] / "data" / "bad"
CORPUS = sorted((BAD_DIR / "interactions").iterdir())
USERS_CSV, ITEMS_CSV = BAD_DIR / "users.csv", BAD_DIR / "items.csv"
NOW = datetime(2026, 6, 1, tzinfo=UTC)
MARKER = "BAD#"


def kind_of(path: Path) -> str:
    """The QUARANTINE_REASONS key a corpus file exercises: its stem up to ``__``."""
    return path.stem.split("__")[0]


def reason_of(path: Path) -> str:
    """The reason recorded for the file's bad rows: its kind, except ``too_long:<field>``
    for ``too_long__<field>`` files."""
    kind = kind_of(path)
    return f"{kind}:{path.stem.split('__')[1]}" if kind == "too_long" else kind


def expected_counts(path: Path) -> tuple[int, int]:
    """(good, bad) data rows of a corpus file: non-blank lines past a CSV header; bad
    ones hold :data:`MARKER`."""
    text = path.read_bytes().decode("utf-8", errors="replace")  # undecodable.csv is latin-1
    lines = [line for line in text.splitlines() if line.strip()]
    if path.suffix == ".csv":
        lines = lines[1:]
    bad = sum(MARKER in line for line in lines)
    return len(lines) - bad, bad


def from_file(path: Path) -> re.Pattern:
    """Matches the bad-row tag of ``path`` (``BAD#invalid_id`` but not ``BAD#invalid_id__csv``)."""
    return re.compile(rf"{re.escape(MARKER + path.stem)}\b")


def test_corpus_covers_every_quarantine_reason():
    kinds = {kind_of(p) for p in CORPUS}
    assert kinds == set(QUARANTINE_REASONS), kinds ^ set(QUARANTINE_REASONS)
    assert len(CORPUS) >= len(kinds) >= 20
    assert {p.suffix for p in CORPUS} == {".csv", ".jsonl"}  # both raw readers exercised
    for path in CORPUS:
        good, bad = expected_counts(path)
        assert good >= 3 and bad >= 1, path.name
    readme = (BAD_DIR / "README.md").read_text(encoding="utf-8")
    undescribed = [p.name for p in [*CORPUS, *BAD_DIR.glob("*.csv")] if f"`{p.name}`" not in readme]
    assert not undescribed, f"README.md does not describe {undescribed}"


# Corpus files that expose a bug in pipelines/read.py or preprocess.py: run alone (so the
# batch of their format stays green) and expected to fail until fixed.
KNOWN_BUGS: dict[str, str] = {}  # file name → why it is expected to fail (none open)
BATCHED = [p for p in CORPUS if p.name not in KNOWN_BUGS]
# Normalized values of good rows, by session number (<stem>#1, #2, #3).
NORMALIZED = {
    "unparseable_timestamp.csv": {"timestamp": ["2026-03-01 08:00:00", "2026-03-02 11:30:00", "2026-03-08 09:04:00"]},
    "timestamp_out_of_range.csv": {"timestamp": ["2026-03-01 10:00:00", "2026-01-15 08:00:00", "2026-01-15 07:00:00"]},
    "missing_timestamp.jsonl": {"timestamp": ["2026-03-07 09:00:00", "2026-03-01 10:00:00", "2026-03-07 09:04:00"]},
    "future_timestamp.jsonl": {"timestamp": ["2026-05-31 23:59:59", "2026-06-01 12:00:00", "2026-04-01 00:00:00"]},
    "unknown_device.jsonl": {"device": ["mobile", "tv", "tablet"]},
    "unknown_item.jsonl": {"device": ["desktop", "mobile", "tv"]},
    "missing_event_type.csv": {"event_type": ["click", "view", "rate"]},
    "unknown_event_type.csv": {"event_type": ["click", "share", "complete"]},
    "unparseable_rating.csv": {"rating": [4.0, 4.5, 5.0], "event_type": ["rate", "rate", "rate"]},
    "unparseable_dwell_time.jsonl": {"dwell_time_s": [12.5, 30.0, 0.0]},
    "missing_user_id.csv": {"user_id": ["u1", "u2", "u3"]},
    "missing_item_id.jsonl": {"item_id": ["i1", "i2", "i3"]},
    "unknown_user.csv": {"session_id": ["unknown_user#1,a", "unknown_user#2", "unknown_user#3"]},
}
Outcome = tuple[PreprocessReport, pd.DataFrame, pd.DataFrame]


def run(spark, settings, source: Path, out: Path) -> Outcome:
    """(report, quarantined interactions, clean interactions) of preprocessing ``source``."""
    report = preprocess(spark, source, out, settings.preprocess, users=USERS_CSV, items=ITEMS_CSV, now=NOW)
    return report, pd.read_parquet(out / "quarantine" / "interactions"), pd.read_parquet(out / "clean" / "interactions")


@pytest.fixture(scope="module")
def runs(spark, settings, tmp_path_factory) -> dict[str, Outcome]:
    """Per file suffix: the outcome of one preprocess run over every batched corpus file
    of that format (a directory input)."""
    root = tmp_path_factory.mktemp("bad_corpus")
    result = {}
    for suffix in sorted({p.suffix for p in BATCHED}):
        source = root / suffix.lstrip(".")
        source.mkdir()
        for path in BATCHED:
            if path.suffix == suffix:
                shutil.copy(path, source / path.name)
        result[suffix] = run(spark, settings, source, root / f"out_{suffix.lstrip('.')}")
    return result


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_count_identity_holds_per_run(runs, suffix):
    report, quarantine, clean = runs[suffix]
    files = [p for p in BATCHED if p.suffix == suffix]
    expected = Counter()
    for path in files:
        expected[reason_of(path)] += expected_counts(path)[1]
    good = sum(expected_counts(p)[0] for p in files)

    assert report.quarantined == dict(expected)  # each kind, and nothing else, quarantined
    assert report.clean == good and report.duplicates == 0  # every good row kept
    assert report.in_ == good + sum(expected.values())
    assert report.in_ == report.clean + report.quarantined_total + report.duplicates
    assert len(quarantine) == report.quarantined_total and len(clean) == report.clean
    assert (quarantine["raw_record"].str.len() > 0).all()


def _case(path: Path):
    bug = KNOWN_BUGS.get(path.name)
    return pytest.param(path, id=path.name, marks=[pytest.mark.xfail(strict=True, reason=bug)] if bug else [])


@pytest.mark.parametrize("path", [_case(p) for p in CORPUS])
def test_each_malformed_kind_is_quarantined_and_good_rows_kept(runs, spark, settings, tmp_path, path):
    good, bad = expected_counts(path)
    if path.name in KNOWN_BUGS:
        report, quarantine, clean = run(spark, settings, path, tmp_path / "out")
        assert report.quarantined == {reason_of(path): bad} and report.clean == good
    else:
        report, quarantine, clean = runs[path.suffix]

    mine = quarantine[quarantine["raw_record"].str.contains(from_file(path))]
    assert len(mine) == bad, mine
    assert (mine["reason"] == reason_of(path)).all(), mine[["reason", "raw_record"]].to_dict("records")
    kept = clean[clean["session_id"].str.startswith(f"{path.stem}#")].sort_values("session_id")
    assert len(kept) == good  # every good row of the file survives, normalized
    assert kept["event_type"].isin(["view", "click", "like", "share", "complete", "rate"]).all()
    stamps = pd.to_datetime(kept["timestamp"], utc=True)  # Spark writes UTC wall time
    assert stamps.between(pd.Timestamp("2026-01-01", tz="UTC"), pd.Timestamp("2026-06-02", tz="UTC")).all()
    assert kept["device"].dropna().isin(["mobile", "desktop", "tablet", "tv"]).all()
    for column, values in NORMALIZED.get(path.name, {}).items():
        actual = list(stamps.dt.strftime("%Y-%m-%d %H:%M:%S")) if column == "timestamp" else list(kept[column])
        assert actual == values, column


@pytest.fixture(scope="module")
def dims(spark, settings, tmp_path_factory) -> tuple[PreprocessReport, Path]:
    """Preprocess of a few interactions against users_bad.csv and items_bad.csv."""
    root = tmp_path_factory.mktemp("bad_dims")
    events = root / "events.csv"
    events.write_text(
        "user_id,item_id,event_type,rating,dwell_time_s,scroll_depth,device,session_id,timestamp\n"
        "u1,i1,click,,5,0.5,mobile,s1,2026-03-01T10:00:00Z\n"
        "u3,i2,rate,4,,,,s2,2026-03-01T10:01:00Z\n"
        "u8,i1,click,,5,0.5,mobile,s3,2026-03-01T10:02:00Z\n"  # u8's row is unparseable: unknown user
        "u2,i3,click,,5,0.5,mobile,s4,2026-03-01T10:03:00Z\n",  # i3 has no title: unknown item
        encoding="utf-8",
    )
    report = preprocess(
        spark,
        events,
        root / "out",
        settings.preprocess,
        users=BAD_DIR / "users_bad.csv",
        items=BAD_DIR / "items_bad.csv",
        now=NOW,
    )
    return report, root / "out"


def test_bad_users_and_items_are_quarantined_with_reasons(dims):
    report, out = dims
    assert report.users.quarantined == {
        "missing_user_id": 2,
        "duplicate_user_id": 1,
        "invalid_id": 2,
        "unparseable_record": 1,
    }
    assert (report.users.in_, report.users.clean) == (9, 3)
    assert report.items.quarantined == {
        "missing_item_id": 1,
        "missing_title": 2,
        "duplicate_item_id": 1,
        "invalid_id": 1,
        "unparseable_record": 1,
    }
    assert (report.items.in_, report.items.clean) == (8, 2)
    for table in (report.users, report.items):
        assert table.in_ == table.clean + sum(table.quarantined.values())

    users = pd.read_parquet(out / "clean" / "users").set_index("user_id")
    assert sorted(users.index) == ["u1", "u2", "u3"]
    assert users["age"].notna().all() and report.imputed.get("age") == 1  # "forty" kept, age imputed
    items = pd.read_parquet(out / "clean" / "items").set_index("item_id")
    assert sorted(items.index) == ["i1", "i2"] and pd.isna(items.loc["i2", "published_at"])
    for table in ("users", "items"):
        quarantine = pd.read_parquet(out / "quarantine" / table)
        assert quarantine["reason"].notna().all() and (quarantine["raw_record"].str.len() > 0).all()

    assert report.quarantined == {"unknown_user": 1, "unknown_item": 1}
    assert report.clean == 2 and report.in_ == report.clean + report.quarantined_total + report.duplicates


def test_first_of_duplicate_ids_in_file_order_is_kept(dims):
    _, out = dims
    items = pd.read_parquet(out / "clean" / "items").set_index("item_id")
    assert items.loc["i1", "title"] == "Rates rise again"
    users = pd.read_parquet(out / "clean" / "users").set_index("user_id")
    assert users.loc["u1", "age"] == 34


def test_quoted_newline_in_item_text_keeps_the_item(spark, settings, tmp_path):
    events = tmp_path / "events.csv"
    events.write_text(
        "user_id,item_id,event_type,rating,dwell_time_s,scroll_depth,device,session_id,timestamp\n"
        "u1,i1,click,,5,0.5,mobile,s1,2026-03-01T10:00:00Z\n"
        "u1,i2,click,,5,0.5,mobile,s2,2026-03-01T10:01:00Z\n",
        encoding="utf-8",
    )
    report = preprocess(
        spark,
        events,
        tmp_path / "out",
        settings.preprocess,
        users=USERS_CSV,
        items=BAD_DIR / "items_multiline.csv",
        now=NOW,
    )
    assert report.items.quarantined == {}, report.items.to_json()
    assert (report.items.in_, report.items.clean) == (3, 3)
    assert report.quarantined == {} and report.clean == 2
