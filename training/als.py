"""Implicit-feedback matrix factorisation (Hu, Koren & Volinsky 2008) trained with Spark
MLlib's ALS, plus a least-squares fold-in that scores users ALS never saw. See
docs/models.md for the objective and the fold-in.

Without a checkpoint directory Spark keeps the whole ALS lineage, and deep lineages
overflow the JVM's thread stack (which kills a local-mode Spark session), so
:func:`fit_als` refuses more than :data:`ITERATIONS_PER_STACK_MIB` iterations per MiB of
thread stack unless a checkpoint directory is set; raise the stack with ``-Xss16m`` in
``spark.driver.extraJavaOptions`` (local mode) or ``spark.executor.extraJavaOptions``.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp

from training.models import InteractionMatrix, top_k

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import SparkSession

ITERATIONS_PER_STACK_MIB = 12  # margin below the measured 14 per MiB
DEFAULT_THREAD_STACK_MIB = 1.0  # HotSpot's default -Xss on 64-bit Linux
CHECKPOINT_INTERVAL = 5
_SIZE_UNITS = {"": 1 / 1024 / 1024, "k": 1 / 1024, "m": 1.0, "g": 1024.0}


@dataclass
class FactorModel:
    """Users×rank and items×rank factors; ``score = U · Yᵀ``.

    ``user_ids[r]`` is the user of row ``r`` of ``user_factors``; item rows follow the
    ``item_ids`` given to :func:`fit_als` (items absent from training have zero factors).
    ``reg`` and ``alpha`` are kept for :meth:`score_history`.
    """

    user_ids: np.ndarray
    user_factors: np.ndarray
    item_factors: np.ndarray
    reg: float
    alpha: float
    name: str = "als"
    fit_seconds: float = 0.0

    @property
    def rank(self) -> int:
        return int(self.item_factors.shape[1])

    def score(self, user_rows: np.ndarray) -> np.ndarray:
        """Scores (len(user_rows)×n_items) of training users from their learned factors."""
        rows = np.asarray(user_rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self.user_ids)):
            bad = rows[(rows < 0) | (rows >= len(self.user_ids))][0]
            raise IndexError(f"user row {bad} out of range: the model has {len(self.user_ids)} users")
        return self.score_factors(self.user_factors[rows])

    def score_factors(self, factors: np.ndarray) -> np.ndarray:
        """Scores (rows of ``factors``×n_items) of users with the factors ``factors``."""
        return (factors @ self.item_factors.T).astype(np.float32)

    def fold_in(self, x: sp.csr_matrix | np.ndarray) -> np.ndarray:
        """User factors (rows of ``x``×rank) solving Spark's implicit-ALS least squares
        ``u = (YᵀY + Yᵀ(C_u − I)Y + reg·n_u·I)⁻¹ Yᵀ C_u p_u`` against the fixed item factors
        ``Y`` (``c_ui = 1 + alpha·|r_ui|``, ``p_ui = [r_ui > 0]``, ``n_u`` the user's positive
        interactions); an empty row gives zeros. A training user's own row reproduces its
        learned factors."""
        x = sp.csr_matrix(x, dtype=np.float64)
        y = self.item_factors.astype(np.float64)
        if x.shape[1] != y.shape[0]:
            raise ValueError(f"history has {x.shape[1]} item columns, the model {y.shape[0]} items")
        yty = y.T @ y
        eye = np.eye(self.rank)
        out = np.zeros((x.shape[0], self.rank), dtype=np.float64)
        for r in range(x.shape[0]):
            start, end = x.indptr[r], x.indptr[r + 1]
            items, values = x.indices[start:end], x.data[start:end]
            positive = values > 0
            if not positive.any():
                continue
            yi = y[items]
            extra = self.alpha * np.abs(values)  # c_ui − 1
            a = yty + (yi * extra[:, None]).T @ yi + self.reg * positive.sum() * eye
            b = ((1.0 + extra) * positive) @ yi
            out[r] = np.linalg.solve(a, b)
        return out.astype(np.float32)

    def score_history(self, x: sp.csr_matrix | np.ndarray) -> np.ndarray:
        """Scores (rows of ``x``×n_items) of users given only their interaction rows, via
        :meth:`fold_in`: works for unknown users and histories updated by live events."""
        return self.score_factors(self.fold_in(x))

    def recommend(
        self, x: sp.csr_matrix, k: int, user_rows: np.ndarray | None = None, exclude_seen: bool = True
    ) -> np.ndarray:
        """Top-``k`` item indices per row of ``x``, best first; scored from the learned factors
        of ``user_rows`` when given, else by fold-in of ``x``. Seen items are excluded."""
        scores = self.score(user_rows) if user_rows is not None else self.score_history(x)
        return top_k(scores, x if exclude_seen else None, k)


def _factor_array(frame: pd.DataFrame, n: int, rank: int) -> np.ndarray:
    """Dense n×rank float32 array from Spark's (id, features) factor frame; missing ids stay 0."""
    out = np.zeros((n, rank), dtype=np.float32)
    if len(frame):
        ids = frame["id"].to_numpy(dtype=np.int64)
        out[ids] = np.stack([np.asarray(f, dtype=np.float32) for f in frame["features"]])
    return out


def thread_stack_mib(java_options: str) -> float:
    """Thread stack size in MiB set by ``-Xss<n>[k|m|g]`` or ``-XX:ThreadStackSize=<KiB>`` in a
    JVM option string (the last one wins); :data:`DEFAULT_THREAD_STACK_MIB` when absent."""
    size = DEFAULT_THREAD_STACK_MIB
    for match in re.finditer(r"-Xss(\d+)([kKmMgG]?)\b|-XX:ThreadStackSize=(\d+)\b", java_options):
        if match.group(3):
            size = int(match.group(3)) / 1024
        else:
            size = int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    return size


def task_thread_stack_mib(spark: SparkSession) -> float:
    """Stack size of the threads that run tasks: the driver JVM's own arguments in local
    mode, ``spark.executor.extraJavaOptions`` otherwise."""
    sc = spark.sparkContext
    if sc.master.startswith("local"):
        bean = sc._jvm.java.lang.management.ManagementFactory.getRuntimeMXBean()
        return thread_stack_mib(" ".join(str(a) for a in bean.getInputArguments()))
    return thread_stack_mib(sc.getConf().get("spark.executor.extraJavaOptions", ""))


def fit_als(
    spark: SparkSession,
    train: pd.DataFrame,
    item_ids: np.ndarray,
    *,
    rank: int = 64,
    reg: float = 0.1,
    alpha: float = 10.0,
    max_iter: int = 15,
    seed: int = 42,
    weight_col: str | None = None,
    checkpoint_dir: str | None = None,
) -> FactorModel:
    """Fit implicit ALS (``pyspark.ml.recommendation.ALS(implicitPrefs=True)``) on ``train``.

    ``train`` has ``user_id``/``item_id`` (and ``weight_col`` when given; else every event
    weighs 1 and repeated pairs are summed, as in :meth:`InteractionMatrix.from_frame`).
    Indices match ``InteractionMatrix.from_frame(train, item_ids=item_ids)``: users sorted,
    items in ``item_ids`` order; events on items outside ``item_ids`` are dropped.

    Checkpoint-free by default: no checkpoint directory is needed, and ``max_iter`` is then
    limited by the task threads' stack (:data:`ITERATIONS_PER_STACK_MIB` per MiB; ValueError beyond it). With
    ``checkpoint_dir`` (set on the Spark context) or a context that already has one, the
    lineage is cut every :data:`CHECKPOINT_INTERVAL` iterations and any ``max_iter`` runs.
    """
    from pyspark.ml.recommendation import ALS

    if rank < 1 or max_iter < 1:
        raise ValueError(f"fit_als: rank ({rank}) and max_iter ({max_iter}) must be >= 1")
    if reg < 0 or alpha < 0:
        raise ValueError(f"fit_als: reg ({reg}) and alpha ({alpha}) must be >= 0")
    matrix = InteractionMatrix.from_frame(train, item_ids=item_ids, weight_col=weight_col)
    coo = matrix.matrix.tocoo()
    if coo.nnz == 0:
        raise ValueError("fit_als: no interactions on the given items to train on")
    if checkpoint_dir is not None:
        spark.sparkContext.setCheckpointDir(str(checkpoint_dir))
    checkpointed = spark.sparkContext.getCheckpointDir() is not None
    if not checkpointed:
        stack = task_thread_stack_mib(spark)
        limit = int(ITERATIONS_PER_STACK_MIB * stack)
        if max_iter > limit:
            raise ValueError(
                f"fit_als: max_iter={max_iter} without checkpointing overflows a {stack:g} MiB thread stack "
                f"(limit {limit}); pass checkpoint_dir or give the JVM a larger stack "
                f"(-Xss{-(-max_iter // ITERATIONS_PER_STACK_MIB)}m or more in spark.driver/executor.extraJavaOptions)"
            )
    start = time.perf_counter()
    triples = pd.DataFrame(
        {"user": coo.row.astype(np.int32), "item": coo.col.astype(np.int32), "rating": coo.data.astype(np.float32)}
    )
    blocks = max(1, min(spark.sparkContext.defaultParallelism, 8))
    als = ALS(
        rank=rank,
        maxIter=max_iter,
        regParam=reg,
        alpha=alpha,
        implicitPrefs=True,
        userCol="user",
        itemCol="item",
        ratingCol="rating",
        seed=seed,
        nonnegative=False,
        numUserBlocks=blocks,
        numItemBlocks=blocks,
        checkpointInterval=CHECKPOINT_INTERVAL if checkpointed else -1,
        coldStartStrategy="drop",
    )
    fitted = als.fit(spark.createDataFrame(triples))
    users = fitted.userFactors.toPandas()
    items = fitted.itemFactors.toPandas()
    seconds = time.perf_counter() - start
    return FactorModel(
        user_ids=matrix.user_ids,
        user_factors=_factor_array(users, len(matrix.user_ids), rank),
        item_factors=_factor_array(items, len(matrix.item_ids), rank),
        reg=float(reg),
        alpha=float(alpha),
        fit_seconds=seconds,
    )
