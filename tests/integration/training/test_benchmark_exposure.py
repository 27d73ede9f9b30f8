"""`hyperrec benchmark` reports the best model's lists as served with the exposure-aware
re-ranker (``metrics.json`` → ``exposure_rerank``), leaving the recommendation files plain."""

import pandas as pd
import pytest

from training.benchmark import export_raw_dataset, run_benchmark


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from core.datasets.synthetic import generate

    tmp = tmp_path_factory.mktemp("exposure")
    raw = generate(tmp / "raw", events=6000, seed=9, progress=False)
    return export_raw_dataset(raw, tmp / "ds")


def run(settings, dataset, out, **serving):
    settings = settings.model_copy(update={"serving": settings.serving.model_copy(update=serving)})
    return run_benchmark(
        settings, dataset=str(dataset), protocol="u75", k=10, out=out, models=("popularity", "ease"), log=lambda _: None
    )


def test_exposure_rerank_is_reported_for_the_best_model(settings, dataset, tmp_path):
    plain = run(settings, dataset, tmp_path / "plain", exposure_strength=0.0)
    fair = run(settings, dataset, tmp_path / "fair", exposure_strength=0.1, exposure_tail_share=0.2)
    assert "exposure_rerank" not in plain
    for name in ("popularity", "ease"):  # the plain lists are written and scored alike either way
        a = pd.read_csv(tmp_path / "plain" / f"recommendations-{name}.csv")
        b = pd.read_csv(tmp_path / "fair" / f"recommendations-{name}.csv")
        pd.testing.assert_frame_equal(a, b)
        assert plain["models"][name]["ndcg"] == fair["models"][name]["ndcg"]
        assert 0 <= plain["models"][name]["long_tail"] <= 1
    served = fair["exposure_rerank"]
    assert served["strength"] == 0.1 and served["tail_share"] == 0.2 and served["pool"] == 100
    best = fair["models"][fair["best"]]
    assert served["long_tail"] >= 0.2 - 1e-9 and served["long_tail"] > best["long_tail"]
    assert served["coverage"] >= best["coverage"] and served["ndcg"] <= best["ndcg"] + 0.05
