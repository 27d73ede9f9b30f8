"""Reading raw tables in every supported format and place, KNN imputation, decay weights."""

import json
from datetime import UTC, datetime

import boto3
import pandas as pd
import pytest

from core.schemas import INTERACTIONS, USERS
from pipelines.preprocess import decay_weight, knn_impute_age, parse_interactions, preprocess
from pipelines.read import detect_format, read_raw_table

pytestmark = pytest.mark.spark
NOW = datetime(2026, 6, 1, tzinfo=UTC)
ROWS = [
    {
        "user_id": "u1",
        "item_id": "i1",
        "event_type": "click",
        "rating": None,
        "dwell_time_s": 12.5,
        "scroll_depth": 0.5,
        "device": "mobile",
        "session_id": "s1",
        "timestamp": "2026-03-01T10:00:00+02:00",
    },
    {
        "user_id": "u2",
        "item_id": "i2",
        "event_type": "rate",
        "rating": 4,
        "dwell_time_s": None,
        "scroll_depth": None,
        "device": "tv",
        "session_id": "s2",
        "timestamp": "1772352000",
    },
]


def _write_all_formats(root):
    frame = pd.DataFrame(ROWS)
    (root / "csv").mkdir(parents=True)
    frame.to_csv(root / "csv" / "events.csv", index=False)
    (root / "events.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    typed = frame.assign(timestamp=pd.to_datetime(["2026-03-01T08:00:00Z", "2026-03-01T08:00:00Z"], utc=True))
    typed.to_parquet(root / "events.parquet", index=False)
    return {"csv": root / "csv", "json": root / "events.jsonl", "parquet": root / "events.parquet"}


def test_every_format_parses_to_the_same_typed_rows(spark, tmp_path):
    paths = _write_all_formats(tmp_path)
    for fmt, path in paths.items():
        assert detect_format(path) == fmt
        raw = read_raw_table(spark, path, INTERACTIONS, tmp_path / "staging")
        parsed = parse_interactions(raw).orderBy("user_id").collect()
        assert [r.user_id for r in parsed] == ["u1", "u2"], fmt
        assert parsed[0].timestamp.replace(tzinfo=None) == datetime(2026, 3, 1, 8, 0), fmt  # +02:00 → UTC
        assert parsed[1].rating == 4.0 and parsed[0].dwell_time_s == 12.5, fmt
        assert all(r._unparseable is None and not r._corrupt for r in parsed), fmt
        assert json.loads(parsed[0]._raw)["user_id"] == "u1", fmt


def test_mixed_formats_in_one_directory_are_refused(tmp_path):
    (tmp_path / "a.csv").write_text("user_id\n")
    (tmp_path / "b.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match="mixes formats"):
        detect_format(tmp_path)


def test_s3_input_is_staged_through_boto3(spark, settings, tmp_path, s3_endpoint):
    paths = _write_all_formats(tmp_path)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.upload_file(str(paths["json"]), "raw", "feeds/2026-03-01/events.jsonl")
    s3.upload_file(str(paths["json"]), "raw", "feeds/2026-03-02/events.jsonl")
    report = preprocess(
        spark, "s3://raw/feeds/", tmp_path / "out", settings.preprocess, now=NOW, s3_endpoint_url=s3_endpoint
    )
    assert (report.in_, report.duplicates, report.clean) == (4, 2, 2)  # the same two events in two daily files
    with pytest.raises(FileNotFoundError, match="nothing found"):
        preprocess(
            spark, "s3://raw/missing/", tmp_path / "out2", settings.preprocess, now=NOW, s3_endpoint_url=s3_endpoint
        )


def test_knn_imputes_age_from_similar_users(spark):
    rows = [(f"s{i}", 20 + i % 3, "F", "student", "north") for i in range(6)]
    rows += [(f"r{i}", 70 + i % 3, "M", "retired", "south") for i in range(6)]
    rows += [("x_student", None, "F", "student", "north"), ("x_retired", None, "M", "retired", "south")]
    users = spark.createDataFrame(rows, USERS.spark())
    filled = {r.user_id: r.age for r in knn_impute_age(users, neighbours=3).collect()}
    assert 19 <= filled["x_student"] <= 23 and 69 <= filled["x_retired"] <= 73
    assert filled["s0"] == 20  # known ages untouched


def test_decay_weight_halves_every_half_life(spark):
    as_of = datetime(2026, 1, 15, tzinfo=UTC)
    df = spark.createDataFrame(
        [
            (datetime(2026, 1, 15, tzinfo=UTC),),
            (datetime(2026, 1, 8, tzinfo=UTC),),
            (datetime(2026, 1, 1, tzinfo=UTC),),
        ],
        "timestamp timestamp",
    )
    weights = [r.w for r in df.select(decay_weight(as_of, 7.0).alias("w")).collect()]
    assert weights == pytest.approx([1.0, 0.5, 0.25])


def test_preprocess_cli_writes_clean_quarantine_and_report(settings, tmp_path):
    import subprocess
    import sys

    from core.datasets.synthetic import generate

    raw = generate(
        tmp_path / "raw", events=2000, seed=4, malformed_fraction=0.02, duplicate_fraction=0.01, progress=False
    )
    out = tmp_path / "out"
    cli = [
        sys.executable,
        "-m",
        "hyperrec.cli",
        "preprocess",
        "--interactions",
        str(raw.interactions),
        "--users",
        str(raw.users),
        "--items",
        str(raw.items),
        "--out",
        str(out),
    ]
    env = {"HYPERREC_HOME": str(tmp_path / "home"), "HYPERREC_SPARK__MASTER": "local[1]", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(cli, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["in"] == report["clean"] + report["quarantined_total"] + report["duplicates"]
    assert report["quarantined_total"] == 40 and report["duplicates"] == 20
    assert json.loads(done.stdout)["clean"] == report["clean"]
    assert len(pd.read_parquet(out / "quarantine" / "interactions")) == 40
    assert (out / "clean" / "interactions").is_dir() and (out / "split" / "test").is_dir()
