"""The malformed-input corpus under tests/data/bad: every kind of bad interaction is
quarantined with its reason, nothing crashes, every good row is kept and
``in = clean + quarantined + duplicates`` holds; bad users and items are set aside too.

Corpus convention: ``interactions/<reason>[__<variant>].<csv|jsonl>`` holds good rows
plus rows malformed in exactly that one way; bad rows, and only they, carry the session
id ``BAD`` (also inside unparseable lines), so the expected counts come from the file.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pytest

from pipelines.preprocess import QUARANTINE_REASONS, preprocess

pytestmark = pytest.mark.spark

BAD_DIR = Path(__file__).resolve().parents[2] / "data" / "bad"
CORPUS = sorted((BAD_DIR / "interactions").iterdir())
USERS_CSV, ITEMS_CSV = BAD_DIR / "users.csv", BAD_DIR / "items.csv"
NOW = datetime(2026, 6, 1, tzinfo=timezone.utc)
MARKER = "BAD"


def reason_of(path: Path) -> str:
    """The quarantine reason a corpus file exercises: its stem up to ``__``."""
    return path.stem.split("__")[0]


def expected_counts(path: Path) -> tuple[int, int]:
    """(good, bad) data rows of a corpus file: non-blank lines past a CSV header; bad
    ones hold :data:`MARKER`."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix == ".csv":
        lines = lines[1:]
    bad = sum(MARKER in line for line in lines)
    return len(lines) - bad, bad


def test_corpus_covers_every_quarantine_reason():
    kinds = {reason_of(p) for p in CORPUS}
    assert kinds == set(QUARANTINE_REASONS), kinds ^ set(QUARANTINE_REASONS)
    assert len(CORPUS) >= len(kinds) >= 20
    assert {p.suffix for p in CORPUS} == {".csv", ".jsonl"}  # both raw readers exercised
    for path in CORPUS:
        good, bad = expected_counts(path)
        assert good >= 3 and bad >= 1, path.name
    readme = (BAD_DIR / "README.md").read_text(encoding="utf-8")
    described = [p.name for p in [*CORPUS, *BAD_DIR.glob("*.csv")] if f"`{p.name}`" not in readme]
    assert not described, f"README.md does not describe {described}"


@pytest.mark.parametrize("path", CORPUS, ids=[p.name for p in CORPUS])
def test_each_malformed_kind_is_quarantined_and_good_rows_kept(spark, settings, tmp_path, path):
    good, bad = expected_counts(path)
    reason = reason_of(path)
    out = tmp_path / "out"
    report = preprocess(spark, path, out, settings.preprocess, users=USERS_CSV, items=ITEMS_CSV, now=NOW)

    assert report.quarantined == {reason: bad}
    assert report.clean == good  # every good row kept
    assert report.duplicates == 0
    assert report.in_ == good + bad
    assert report.in_ == report.clean + report.quarantined_total + report.duplicates

    quarantine = pd.read_parquet(out / "quarantine" / "interactions")
    assert len(quarantine) == bad
    assert (quarantine["reason"] == reason).all()
    assert quarantine["raw_record"].map(lambda raw: MARKER in raw).all()  # the bad line itself is kept
    clean = pd.read_parquet(out / "clean" / "interactions")
    assert len(clean) == good and not (clean["session_id"] == MARKER).any()
    assert clean["timestamp"].notna().all() and clean["event_type"].notna().all()


def test_bad_users_and_items_are_quarantined_with_reasons(spark, settings, tmp_path):
    events = tmp_path / "events.csv"
    events.write_text(
        "user_id,item_id,event_type,rating,dwell_time_s,scroll_depth,device,session_id,timestamp\n"
        "u1,i1,click,,5,0.5,mobile,s1,2026-03-01T10:00:00Z\n"
        "u3,i2,rate,4,,,,s2,2026-03-01T10:01:00Z\n"
        "u8,i1,click,,5,0.5,mobile,s3,2026-03-01T10:02:00Z\n"  # u8's row is unparseable: unknown user
        "u2,i3,click,,5,0.5,mobile,s4,2026-03-01T10:03:00Z\n",  # i3 has no title: unknown item
        encoding="utf-8",
    )
    out = tmp_path / "out"
    report = preprocess(spark, events, out, settings.preprocess,
                        users=BAD_DIR / "users_bad.csv", items=BAD_DIR / "items_bad.csv", now=NOW)

    assert report.users.quarantined == {"missing_user_id": 2, "duplicate_user_id": 1, "invalid_id": 2, "unparseable_record": 1}
    assert (report.users.in_, report.users.clean) == (9, 3)
    assert report.items.quarantined == {"missing_item_id": 1, "missing_title": 2, "duplicate_item_id": 1,
                                        "invalid_id": 1, "unparseable_record": 1}
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
