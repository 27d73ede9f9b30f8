"""State files are written atomically: a reader sees the old content or the new, and a
writer that fails midway leaves the old content and no temporary file behind."""

from __future__ import annotations

import json
import stat
import threading

import pytest

from core.files import write_atomic, write_json_atomic, write_text_atomic
from core.run_context import RunContext
from core.settings import load_settings


def test_a_writer_failing_midway_leaves_the_old_content(tmp_path):
    path = tmp_path / "state.json"
    write_json_atomic(path, {"n": 1})

    def half_then_crash(tmp):
        tmp.write_text('{"n": 2, "trunc')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, half_then_crash)
    assert json.loads(path.read_text()) == {"n": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def _circular() -> dict:
    payload: dict = {}
    payload["self"] = payload  # json.dumps cannot encode it, even with default=str
    return payload


def test_run_json_keeps_its_old_content_when_the_new_cannot_be_written(tmp_path):
    run = RunContext.create(load_settings(home=str(tmp_path)), "atomic")
    run.write_json("timings.json", {"ingest": 1.5})
    with pytest.raises(ValueError, match="Circular"):
        run.write_json("timings.json", _circular())
    assert run.read_json("timings.json") == {"ingest": 1.5}
    assert [p.name for p in run.root.iterdir()] == ["timings.json"]


def test_a_reader_never_sees_half_a_run_json(tmp_path):
    """A reader polling while a task rewrites its run JSON only ever sees whole files."""
    run = RunContext.create(load_settings(home=str(tmp_path)), "readers")
    payloads = [{"n": i, "rows": list(range(20_000))} for i in range(2)]
    run.write_json("timings.json", payloads[0])
    stop, torn, seen = threading.Event(), [], [0]

    def read() -> None:
        while not stop.is_set():
            try:
                json.loads(run.path("timings.json").read_text())
                seen[0] += 1
            except ValueError as exc:
                torn.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    for i in range(12):
        run.write_json("timings.json", payloads[i % 2])
    stop.set()
    reader.join()
    assert seen[0] > 0 and torn == []


def test_circular_payload_leaves_old_file(tmp_path):
    path = write_json_atomic(tmp_path / "report.json", {"ok": True})
    with pytest.raises(ValueError, match="Circular"):
        write_json_atomic(path, _circular())
    assert json.loads(path.read_text()) == {"ok": True}


def test_mode_is_set_before_the_file_appears(tmp_path):
    path = write_text_atomic(tmp_path / "secret.yaml", "token: x\n", mode=0o600)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
