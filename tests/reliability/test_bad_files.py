"""Bad input files get one clear line before Spark starts: each file below, given to
``hyperrec preprocess``, ends with exit status 1 and one ``error:`` line naming the file
and what is wrong with it; no traceback, no output directory, no Spark session.

Files that are bad row by row (undecodable bytes, over-long fields, ...) keep their good
rows: that corpus is tests/data/bad/interactions, run through preprocess with the row
count identity in tests/integration/pipelines/test_bad_corpus.py.
"""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from core.settings import PROJECT_ROOT
from hyperrec.cli import app

HEADER = "user_id,item_id,event_type,rating,dwell_time_s,scroll_depth,device,session_id,timestamp\n"
GOOD = "u1,i1,click,,10,0.5,mobile,s1,2026-03-10T09:00:00Z\n"
JSON_GOOD = '{"user_id": "u1", "item_id": "i1", "event_type": "click", "timestamp": "2026-03-10T09:00:00Z"}\n'


def _write(name: str, data: bytes | str) -> Callable[[Path], Path]:
    def make(root: Path) -> Path:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
        return path

    return make


def _parquet(name: str, frame: pd.DataFrame) -> Callable[[Path], Path]:
    def make(root: Path) -> Path:
        root.mkdir(parents=True, exist_ok=True)
        frame.to_parquet(root / name, index=False)
        return root / name

    return make


def _directory(name: str, files: dict[str, str]) -> Callable[[Path], Path]:
    def make(root: Path) -> Path:
        for file, text in files.items():
            _write(f"{name}/{file}", text)(root)
        (root / name).mkdir(parents=True, exist_ok=True)
        return root / name

    return make


RANDOM = bytes(range(256)) * 64
# name → (make the input under a directory, what the error line must say)
BAD_FILES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "empty_csv": (_write("empty.csv", b""), "empty file (0 bytes)"),
    "empty_jsonl": (_write("empty.jsonl", b""), "empty file (0 bytes)"),
    "header_only": (_write("header_only.csv", HEADER), "a CSV header but no record"),
    "foreign_header": (_write("foreign.csv", "a,b,c\n1,2,3\n"), "needs column(s) user_id, item_id, event_type"),
    "half_header": (_write("half.csv", "user_id,item_id\nu1,i1\n"), "needs column(s) event_type, timestamp"),
    "random_bytes": (_write("random.csv", RANDOM), "binary content"),
    "gzip_as_csv": (_write("events.csv", gzip.compress((HEADER + GOOD).encode())), "binary content"),
    "utf16": (_write("utf16.csv", (HEADER + GOOD).encode("utf-16")), "UTF-16/32 text"),
    "bin_extension": (_write("events.bin", HEADER + GOOD), "unsupported file type '.bin'"),
    "no_extension": (_write("events", HEADER + GOOD), "unsupported file type '(none)'"),
    "nonexistent": (lambda root: root / "nope" / "events.csv", "no such file or directory"),
    "parquet_foreign_columns": (_parquet("foreign.parquet", pd.DataFrame({"a": [1], "b": ["x"]})), "Parquet schema"),
    "parquet_corrupt": (_write("corrupt.parquet", RANDOM), "not a readable Parquet file"),
    "parquet_no_rows": (
        _parquet("none.parquet", pd.DataFrame({c: pd.Series([], dtype=str) for c in HEADER.strip().split(",")})),
        "holds no record",
    ),
    "json_foreign_keys": (_write("foreign.jsonl", '{"a": 1, "b": 2}\n'), "needs column(s) user_id"),
    "json_not_objects": (_write("text.jsonl", "hello\nworld\n"), "no JSON object"),
    "empty_directory": (_directory("nothing", {}), "no .csv, .json"),
    "directory_of_empty_files": (_directory("blank", {"a.csv": "", "b.csv": ""}), "every input file"),
    "mixed_formats": (_directory("mixed", {"a.csv": HEADER + GOOD, "b.jsonl": JSON_GOOD}), "mixes formats"),
    "headers_disagree": (
        _directory(
            "headers",
            {
                "a.csv": HEADER + GOOD,
                "b.csv": HEADER.replace("device,", "") + "u1,i1,click,,1,0.5,s,2026-03-10T09:00:00Z\n",
            },
        ),
        "disagree on their header",
    ),
}


@pytest.fixture
def no_spark(monkeypatch):
    """Fail loudly if a check lets preprocess reach Spark."""

    def refuse(*args, **kwargs):
        raise AssertionError("Spark started for an input that should have been refused first")

    monkeypatch.setattr("pipelines.spark.get_spark", refuse)


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_gets_one_line_before_spark(case, tmp_path, no_spark):
    make, expected = BAD_FILES[case]
    source = make(tmp_path / "in")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["preprocess", "--interactions", str(source), "--out", str(out)])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # handled, not raised
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert str(source) in lines[0] and expected in lines[0], lines[0]
    assert "Traceback" not in result.output and not out.exists()


def test_corpus_size():
    assert len(BAD_FILES) >= 15


def test_bad_users_table_and_bad_encoding_setting_are_named(tmp_path, no_spark):
    events = _write("events.csv", HEADER + GOOD)(tmp_path)
    users = tmp_path / "users.jsonl"
    users.write_text('{"name": "x"}\n')
    args = ["preprocess", "--interactions", str(events), "--users", str(users), "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and f"error: {users}: users needs column(s) user_id" in result.output

    config = tmp_path / "latin.yaml"
    config.write_text("preprocess:\n  input_encoding: klingon\n")
    args = ["preprocess", "--interactions", str(events), "--out", str(tmp_path / "o"), "--config", str(config)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and "unknown encoding 'klingon'" in result.output


def test_the_real_command_prints_no_traceback(tmp_path):
    """One real process (the installed entry point's module), random bytes as input."""
    source = _write("random.csv", RANDOM)(tmp_path)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "hyperrec.cli",
            "preprocess",
            "--interactions",
            str(source),
            "--out",
            str(tmp_path / "o"),
        ],
        cwd=PROJECT_ROOT,
        env={**os.environ, "HYPERREC_DEBUG": ""},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stdout == "" and done.stderr.strip() == f"error: {source}: binary content, not CSV text in utf-8"
