import pytest

from core.errors import ConfigError
from core.run_context import RunContext
from core.settings import PROJECT_ROOT, load_settings


def test_defaults_come_from_default_yaml():
    s = load_settings()
    assert s.mode == "embedded"
    assert s.preprocess.hash_algorithm == "md5"
    assert s.home.is_absolute() and s.data_dir == PROJECT_ROOT / "data"


def test_env_overrides_yaml(monkeypatch):
    monkeypatch.setenv("HYPERREC_SPARK__MASTER", "local-cluster[2,1,1024]")
    monkeypatch.setenv("HYPERREC_TRAINING__K", "20")
    s = load_settings()
    assert s.spark.master == "local-cluster[2,1,1024]"
    assert s.training.k == 20


def test_stack_overlay_changes_only_urls_and_sizes(monkeypatch):
    monkeypatch.delenv("HYPERREC_CONFIG", raising=False)
    stack = load_settings(PROJECT_ROOT / "config" / "stack.yaml")
    embedded = load_settings(home="/tmp/x")
    assert stack.mode == "stack"
    assert stack.online_store.url.startswith("redis://")
    assert stack.airflow_conn.startswith("postgresql")
    assert stack.mlflow_backend_store_uri.startswith("postgresql")
    assert embedded.airflow_conn == "sqlite:////tmp/x/airflow/airflow.db"
    assert stack.training == embedded.training  # model settings are mode independent


def test_bad_values_are_rejected_with_the_field_named():
    with pytest.raises(ConfigError, match="hash_algorithm"):
        load_settings(preprocess={"hash_algorithm": "crc32"})
    with pytest.raises(ConfigError, match="unknown key spark.nonsense"):
        load_settings(spark={"nonsense": 1})


def test_missing_overlay_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_settings(tmp_path / "nope.yaml")


def test_every_run_gets_its_own_directory(tmp_path):
    s = load_settings(home=str(tmp_path))
    a = RunContext.create(s, "manual__2026-01-01T00:00:00+00:00")
    b = RunContext.create(s, "scheduled__2026-01-02T00:00:00+00:00")
    assert a.root != b.root and a.root.parent == b.root.parent == tmp_path / "runs"
    assert RunContext.of_airflow_run(s, "manual__2026-01-01T00:00:00+00:00").root == a.root
    a.write_json("x.json", {"n": 1})
    assert a.read_json("x.json") == {"n": 1}
    with pytest.raises(FileNotFoundError, match="missing"):
        b.read_json("x.json")
