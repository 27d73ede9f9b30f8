"""DDP training through torchrun: 1 rank, 2 ranks and a simulated 2-node run follow the
same loss curve on the same global batches and seed, on the full and the sampled softmax."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from core.datasets.movielens import read_ratings
from training.ddp import DDPError, launch, read_training_data, write_training_data
from training.neural import NeuralConfig, NeuralData, NeuralRecommender, fit_neural

CFG = NeuralConfig(epochs=3, batch_size=30, embedding_dim=16, hidden=[32], seed=5)
RTOL = 1e-4


@pytest.fixture(scope="module")
def data_dir(settings, tmp_path_factory):
    ratings = read_ratings(settings.data_dir / "ml-100k")
    ratings = ratings[ratings["user_id"] <= 91]  # 91 users: 4 steps per epoch, the last one 1 user
    item_ids = np.array(sorted(ratings["item_id"].unique()), dtype=object)
    data = NeuralData.build(ratings.assign(confidence=ratings["rating"] / 5.0), item_ids, weight_col="confidence")
    return write_training_data(data, tmp_path_factory.mktemp("ddp-data"))


@pytest.fixture(scope="module")
def one_rank(data_dir, tmp_path_factory):
    return launch(data_dir, tmp_path_factory.mktemp("ddp-1"), nproc=1, cfg=CFG)


def _scores(model_dir) -> np.ndarray:
    rec = NeuralRecommender.load(model_dir)
    x = sp.random(20, len(rec.item_ids), density=0.05, format="csr", random_state=0, dtype=np.float32)
    return rec.score(x, list(rec.user_ids[:20]))


def test_training_data_round_trip(data_dir):
    data = read_training_data(data_dir)
    assert data.n_users == 91 and data.interactions.matrix.nnz > 1000
    weights = data.interactions.matrix.data
    assert weights.max() == pytest.approx(1.0) and weights.min() == pytest.approx(0.2)  # rating / 5
    assert list(data.interactions.user_ids) == list(range(1, 92))


def test_one_rank_matches_in_process_training(data_dir, one_rank):
    data = read_training_data(data_dir)
    local = fit_neural(data, CFG, progress=False, threads=1)
    assert len(one_rank["losses"]) == CFG.epochs * 4
    np.testing.assert_allclose(one_rank["losses"], local.losses, rtol=RTOL)
    throughput = one_rank["throughput"]
    assert throughput["world_size"] == 1 and throughput["backend"] == "gloo"
    assert throughput["samples"] == CFG.epochs * 91 and throughput["samples_per_s"] > 0


def test_two_ranks_follow_the_one_rank_loss_curve(data_dir, one_rank, tmp_path):
    two = launch(data_dir, tmp_path, nproc=2, cfg=CFG)
    assert two["throughput"]["world_size"] == 2
    assert two["throughput"]["collectives"] == "shared memory"  # both ranks on this host
    np.testing.assert_allclose(two["losses"], one_rank["losses"], rtol=RTOL)
    assert two["losses"][0] != pytest.approx(two["losses"][-1], rel=1e-3)  # it did learn something
    np.testing.assert_allclose(_scores(two["model_dir"]), _scores(one_rank["model_dir"]), rtol=1e-3, atol=1e-4)
    saved = json.loads((tmp_path / "losses.json").read_text())
    assert [row["samples"] for row in saved[:4]] == [30, 30, 30, 1]


def test_two_ranks_follow_the_in_process_sampled_softmax(data_dir, tmp_path):
    """Above ``full_softmax_max_items`` each rank scores its items among the step's sampled
    candidates; the loss curve and the model are the in-process fit's."""
    cfg = CFG.model_copy(update={"full_softmax_max_items": 100, "sampled_negatives": 64})
    local = fit_neural(read_training_data(data_dir), cfg, progress=False, threads=1)
    two = launch(data_dir, tmp_path, nproc=2, cfg=cfg)
    np.testing.assert_allclose(two["losses"], local.losses, rtol=RTOL)
    local.save(tmp_path / "local")
    np.testing.assert_allclose(_scores(two["model_dir"]), _scores(tmp_path / "local"), rtol=1e-3, atol=1e-4)


def test_simulated_two_node_run_matches(data_dir, one_rank, tmp_path):
    multi = launch(data_dir, tmp_path, nproc=1, nnodes=2, cfg=CFG)
    assert multi["throughput"]["world_size"] == 2 and multi["throughput"]["nnodes"] == 2
    assert multi["throughput"]["collectives"] == "gloo"  # nodes do not share memory
    np.testing.assert_allclose(multi["losses"], one_rank["losses"], rtol=RTOL)
    np.testing.assert_allclose(_scores(multi["model_dir"]), _scores(one_rank["model_dir"]), rtol=1e-3, atol=1e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a CUDA request on a CPU-only host")
def test_failing_ranks_are_reported_with_their_stderr(data_dir, tmp_path):
    with pytest.raises(DDPError) as failure:
        launch(data_dir, tmp_path, nproc=2, device="cuda", cfg=CFG)
    message = str(failure.value)
    assert "local rank 0" in message and "local rank 1" in message
    assert "CUDA is not available" in message


def test_bad_arguments_fail_before_starting_torchrun(tmp_path):
    with pytest.raises(FileNotFoundError, match="write_training_data"):
        launch(tmp_path / "missing", tmp_path / "out", nproc=1)
    with pytest.raises(ValueError, match="nproc and nnodes"):
        launch(tmp_path, tmp_path / "out", nproc=0)


def test_pipeline_neural_component_trains_with_ddp_when_configured(settings):
    """`neural.nproc: 2` makes the candidate fitter launch torchrun; the result scores like
    the in-process fit of the same config (same global batches and seed)."""
    from training.candidates import component_fitters
    from training.hybrid import FitContext
    from training.models import InteractionMatrix

    ratings = read_ratings(settings.data_dir / "ml-100k")
    frame = ratings[ratings["user_id"] <= 60].assign(user_id=lambda f: f["user_id"].astype(str))
    item_ids = np.array(sorted(frame["item_id"].unique()), dtype=object)
    ctx = FitContext(frame, InteractionMatrix.from_frame(frame, item_ids=item_ids), item_ids, {})
    neural = CFG.model_dump() | {"epochs": 2}
    local = component_fitters(settings.model_copy(update={"neural": NeuralConfig(**neural)}))["neural"](ctx)
    ddp = component_fitters(settings.model_copy(update={"neural": NeuralConfig(**neural | {"nproc": 2})}))["neural"](
        ctx
    )
    x = ctx.matrix.matrix[:10]
    users = list(ctx.matrix.user_ids[:10])
    np.testing.assert_allclose(ddp.score(x, users), local.score(x, users), rtol=1e-3, atol=1e-4)
    # The loss history the pipeline logs (models/<name>/loss.json) is the same on both paths.
    from training.neural import loss_curve

    ddp_curve, local_curve = loss_curve(ddp.model), loss_curve(local.model)
    assert (
        len(ddp_curve["loss"]) == 2
        and ddp_curve["weighted"]
        and ddp_curve["steps_per_epoch"] == local_curve["steps_per_epoch"]
    )
    np.testing.assert_allclose(ddp_curve["loss"], local_curve["loss"], rtol=RTOL)
