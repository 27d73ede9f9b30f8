"""`hyperrec features get|build` against a temporary home."""

import os

import pandas as pd
import pytest
from typer.testing import CliRunner

from feature_store.online import OnlineStore
from hyperrec.cli import app, latest_run_dir

runner = CliRunner()


@pytest.fixture
def home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HYPERREC_HOME", str(home))
    monkeypatch.delenv("HYPERREC_ONLINE_STORE__URL", raising=False)
    config = tmp_path / "cli.yaml"
    config.write_text(f"home: {home}\nonline_store:\n  url: null\n")
    return home, config


def test_features_get_prints_the_online_profile(home):
    home_dir, config = home
    profiles = pd.DataFrame(
        {"user_id": ["u1", "u2"], "events_7d": [3, 0], "cat_Drama": [0.125, 0.0], "mean_dwell": [12.3456789, 0.0]}
    )
    with OnlineStore(None, data_dir=home_dir / "online") as store:
        store.materialize(profiles, version="run-42")

    result = runner.invoke(app, ["features", "get", "u1", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "user u1 (version run-42)" in result.output
    rows = {
        line.split("│")[1].strip(): line.split("│")[2].strip()
        for line in result.output.splitlines()
        if line.count("│") == 3
    }
    assert rows == {"cat_Drama": "0.125", "events_7d": "3", "mean_dwell": "12.3457"}

    missing = runner.invoke(app, ["features", "get", "nobody", "--config", str(config)])
    assert missing.exit_code == 1
    assert "user 'nobody' not found in the online store" in missing.output


def test_features_build_help_and_missing_run_dir(home, tmp_path):
    _, config = home
    help_result = runner.invoke(app, ["features", "build", "--help"])
    assert help_result.exit_code == 0 and "--run-dir" in help_result.output

    result = runner.invoke(app, ["features", "build", "--config", str(config)])
    assert result.exit_code == 1
    assert "no run directory with split/train under" in result.output

    result = runner.invoke(app, ["features", "build", "--run-dir", str(tmp_path / "nope"), "--config", str(config)])
    assert result.exit_code == 1 and "run directory not found" in result.output


def test_latest_run_dir_picks_the_newest_split(tmp_path):
    runs = tmp_path / "runs"
    for name, mtime in (("a", 300), ("b", 100), ("c", 200)):
        (runs / name / "split" / "train").mkdir(parents=True)
        os.utime(runs / name / "split" / "train", (mtime, mtime))
    (runs / "newest_without_split").mkdir()
    assert latest_run_dir(runs).name == "a"
