"""The neural recommender: a user tower (ID embedding, history bag, dense user features,
category profile) and an item tower (ID embedding, content features) scored by a dot product
plus an item bias, trained with a multinomial likelihood: over the whole catalogue up to
``full_softmax_max_items`` items, over the batch's positives plus sampled negatives above
(:class:`NegativeSampler`). Every random number of a step is seeded by position, never by
rank, so any DDP world size follows the same loss curve (:func:`train`); with more than one
rank the catalogue's columns are split over the ranks (:class:`ColumnShardedNet`). See
docs/models.md for the towers, the loss and the randomness.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from torch import nn

from core.settings import NeuralSettings as NeuralConfig
from training.models import InteractionMatrix, as_csr, rows_dot

__all__ = [
    "Candidates",
    "ColumnShardedNet",
    "NegativeSampler",
    "NeuralConfig",
    "NeuralData",
    "NeuralNet",
    "NeuralRecommender",
    "Peers",
    "StepResult",
    "build_net",
    "fit_neural",
    "is_quantized",
    "loss_curve",
    "quantize_int8",
    "shard_bounds",
    "train",
]

MODEL_FILE = "model.pt"
META_FILE = "neural.json"
FORMAT_VERSION = 1
INIT_STD = 0.1
"""Standard deviation of the normal init of the ID and history embeddings."""
MASK_BLOCK = 256
"""Items per independently seeded block of item-tower dropout masks."""
NEGATIVE_POWER = 0.5
"""Sampled negatives are drawn with probability ∝ (users who interacted with the item + 1)^this."""
ITEM_MASK_TAG, NEGATIVE_TAG, CANDIDATE_MASK_TAG = 1, 2, 3
"""Seed tags: ``default_rng([seed, epoch, step, tag, ...])`` for item-tower dropout over the
catalogue, negative draws, and item-tower dropout over a sampled step's candidates."""


# --------------------------------------------------------------------------- data
@dataclass
class NeuralData:
    """Training input: the interaction matrix plus dense per-user / per-item features.

    ``user_dense`` (n_users × f_u, float32) encodes ``user_features``: numeric columns
    standardized (mean 0, sd 1, missing → 0), other columns one-hot (missing → all 0).
    ``item_dense`` (n_items × f_i) is ``item_features`` as given (e.g. category multi-hot
    and/or a content embedding), rows aligned with ``interactions.item_ids``.
    """

    interactions: InteractionMatrix
    user_dense: np.ndarray
    item_dense: np.ndarray
    user_feature_names: list[str] = field(default_factory=list)

    @property
    def n_users(self) -> int:
        return self.interactions.matrix.shape[0]

    @property
    def n_items(self) -> int:
        return self.interactions.matrix.shape[1]

    @classmethod
    def build(
        cls,
        train: pd.DataFrame,
        item_ids: np.ndarray,
        user_features: pd.DataFrame | None = None,
        item_features: np.ndarray | None = None,
        weight_col: str | None = None,
    ) -> NeuralData:
        """Index ``train`` (user_id, item_id[, weight_col]) like
        :meth:`InteractionMatrix.from_frame` and encode the optional features.

        ``user_features`` has a ``user_id`` column (or index) and one row per user; users
        without a row get zeros. ``item_features`` has one row per entry of ``item_ids``.
        """
        for column in ("user_id", "item_id", *([weight_col] if weight_col else [])):
            if column not in train.columns:
                raise ValueError(f"NeuralData.build: train lacks column {column!r}")
        if weight_col is not None and (train[weight_col].isna().any() or (train[weight_col] < 0).any()):
            raise ValueError(f"NeuralData.build: column {weight_col!r} needs non-negative, non-missing weights")
        interactions = InteractionMatrix.from_frame(
            train, item_ids=np.asarray(item_ids, dtype=object), weight_col=weight_col
        )
        if interactions.matrix.nnz == 0:
            raise ValueError("NeuralData.build: no interaction of train matches item_ids")
        user_dense, names = _encode_user_features(user_features, interactions.user_ids)
        if item_features is None:
            item_dense = np.zeros((len(interactions.item_ids), 0), dtype=np.float32)
        else:
            item_dense = np.asarray(item_features, dtype=np.float32)
            if item_dense.ndim != 2 or item_dense.shape[0] != len(interactions.item_ids):
                raise ValueError(
                    f"NeuralData.build: item_features has shape {item_dense.shape}; "
                    f"need ({len(interactions.item_ids)}, f), one row per item id"
                )
            if not np.isfinite(item_dense).all():
                raise ValueError("NeuralData.build: item_features holds NaN or infinite values")
        return cls(interactions, user_dense, item_dense, names)


def _encode_user_features(frame: pd.DataFrame | None, user_ids: np.ndarray) -> tuple[np.ndarray, list[str]]:
    if frame is None:
        return np.zeros((len(user_ids), 0), dtype=np.float32), []
    if "user_id" in frame.columns:
        frame = frame.set_index("user_id")
    if frame.index.has_duplicates:
        dup = frame.index[frame.index.duplicated()][0]
        raise ValueError(f"user_features: user {dup!r} has more than one row")
    if frame.empty or not frame.index.isin(list(user_ids)).any():
        raise ValueError(
            f"user_features: none of its {len(frame)} user ids occurs in train "
            f"(e.g. {frame.index[:1].tolist()} vs {user_ids[:1].tolist()}; check the id types)"
        )
    frame = frame.reindex(list(user_ids))
    blocks: list[np.ndarray] = []
    names: list[str] = []
    for column in frame.columns:
        values = frame[column]
        if pd.api.types.is_bool_dtype(values) or not pd.api.types.is_numeric_dtype(values):
            levels = sorted(values.dropna().astype(str).unique())
            text = values.astype(str).where(values.notna(), None)
            blocks.append(
                np.stack([(text == level).to_numpy(dtype=np.float32) for level in levels], axis=1)
                if levels
                else np.zeros((len(frame), 0), np.float32)
            )
            names += [f"{column}={level}" for level in levels]
        else:
            v = values.to_numpy(dtype=np.float64)
            mean, sd = np.nanmean(v) if np.isfinite(v).any() else 0.0, np.nanstd(v) if np.isfinite(v).any() else 0.0
            z = (v - mean) / (sd if sd > 0 else 1.0)
            blocks.append(np.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)[:, None])
            names.append(str(column))
    dense = np.concatenate(blocks, axis=1) if blocks else np.zeros((len(frame), 0), np.float32)
    return dense.astype(np.float32), names


# --------------------------------------------------------------------------- network
class _Tower(nn.Module):
    """``Linear → ReLU → dropout`` per hidden width, then a linear output layer.

    Dropout takes explicit keep-masks (one per hidden layer) so that the caller owns the
    randomness; without masks (evaluation) it is the identity.
    """

    def __init__(self, n_in: int, hidden: Sequence[int], n_out: int, keep: float, out_bias: bool = True):
        super().__init__()
        widths = [n_in, *hidden]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.out = nn.Linear(widths[-1], n_out, bias=out_bias)
        self.keep = keep

    def forward(self, h: torch.Tensor, masks: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        for i, layer in enumerate(self.hidden):
            h = torch.relu(layer(h))
            if masks is not None:
                h = h * masks[i] / self.keep
        return self.out(h)


class NeuralNet(nn.Module):
    """The two towers; :meth:`forward` returns users×catalogue scores."""

    def __init__(self, n_users: int, n_items: int, user_dense: np.ndarray, item_dense: np.ndarray, cfg: NeuralConfig):
        super().__init__()
        d = cfg.embedding_dim
        self.n_users, self.n_items = n_users, n_items
        # Row n_users is the unknown user: fixed at zero (padding_idx gets no gradient).
        self.user_id = nn.Embedding(n_users + 1, d, padding_idx=n_users)
        self.history = nn.Parameter(torch.empty(n_items, d))
        self.item_id = nn.Embedding(n_items, d)
        self.item_bias = nn.Parameter(torch.zeros(n_items))
        user_rows = np.vstack([user_dense, np.zeros((1, user_dense.shape[1]), np.float32)])
        self.register_buffer("user_dense", torch.as_tensor(user_rows, dtype=torch.float32))
        self.register_buffer("item_dense", torch.as_tensor(item_dense, dtype=torch.float32))
        keep = 1.0 - cfg.dropout
        n_user_in = 2 * d + user_dense.shape[1] + item_dense.shape[1]
        self.user_tower = _Tower(n_user_in, cfg.hidden, d, keep)
        # No output bias: u · b would add the same number to every item of a user, which the
        # softmax ignores (zero gradient, so Adam would only amplify rounding noise).
        self.item_tower = _Tower(d + item_dense.shape[1], cfg.hidden, d, keep, out_bias=False)
        nn.init.normal_(self.user_id.weight, std=INIT_STD)
        with torch.no_grad():
            self.user_id.weight[n_users].zero_()
        nn.init.normal_(self.history, std=INIT_STD)
        nn.init.normal_(self.item_id.weight, std=INIT_STD)

    def user_vectors(
        self,
        bag_index: torch.Tensor,
        bag_offsets: torch.Tensor,
        bag_weight: torch.Tensor,
        user_rows: torch.Tensor,
        masks: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """User-tower output for a batch of bags. ``bag_weight`` sums to 1 per non-empty bag."""
        return _user_vectors(self, bag_index, bag_offsets, bag_weight, user_rows, masks)

    def item_vectors(
        self, masks: Sequence[torch.Tensor] | None = None, lo: int = 0, hi: int | None = None
    ) -> torch.Tensor:
        """Item-tower outputs of items ``lo..hi-1`` (all items by default)."""
        return self.item_tower(torch.cat([self.item_id.weight[lo:hi], self.item_dense[lo:hi]], dim=1), masks)

    def item_vectors_at(self, items: torch.Tensor, masks: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Item-tower outputs of the item indices ``items``."""
        return self.item_tower(torch.cat([self.item_id(items), self.item_dense[items]], dim=1), masks)

    def forward(
        self,
        bag_index: torch.Tensor,
        bag_offsets: torch.Tensor,
        bag_weight: torch.Tensor,
        user_rows: torch.Tensor,
        user_masks: Sequence[torch.Tensor] | None = None,
        item_masks: Sequence[torch.Tensor] | None = None,
        columns: torch.Tensor | None = None,
        column_offset: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scores of the batch's users over the whole catalogue, or with ``columns`` (item
        indices) the scores ``s_ui − column_offset_i`` of those items only (``item_masks``
        then cover those items)."""
        users = self.user_vectors(bag_index, bag_offsets, bag_weight, user_rows, user_masks)
        if columns is None:
            return users @ self.item_vectors(item_masks).T + self.item_bias
        bias = self.item_bias[columns] - column_offset if column_offset is not None else self.item_bias[columns]
        return users @ self.item_vectors_at(columns, item_masks).T + bias


def _user_vectors(
    m: nn.Module,
    bag_index: torch.Tensor,
    bag_offsets: torch.Tensor,
    bag_weight: torch.Tensor,
    user_rows: torch.Tensor,
    masks: Sequence[torch.Tensor] | None,
) -> torch.Tensor:
    """The user tower of ``m`` (a :class:`NeuralNet` or :class:`ColumnShardedNet`)."""
    bag = nn.functional.embedding_bag(bag_index, m.history, bag_offsets, mode="sum", per_sample_weights=bag_weight)
    parts = [m.user_id(user_rows), bag, m.user_dense[user_rows]]
    if m.item_dense.shape[1]:
        parts.append(
            nn.functional.embedding_bag(bag_index, m.item_dense, bag_offsets, mode="sum", per_sample_weights=bag_weight)
        )
    return m.user_tower(torch.cat(parts, dim=1), masks)


@dataclass(frozen=True)
class Peers:
    """The collectives of a column-sharded rank (:mod:`training.ddp` builds them on
    ``torch.distributed`` or shared memory).

    ``gather_rows(local, n)``: every rank's rows in rank order, rank ``r`` holding rows
    :func:`shard_bounds` ``(n, r, world)``; its backward sums the output gradient over ranks
    and returns this rank's rows. ``reduce_rows(partial, n)``: the sum over ranks of every
    rank's ``n`` rows, cut to this rank's rows; its backward gathers every rank's gradient
    rows. ``logsumexp(local)``: per row, ``log Σ exp`` over the columns of every rank; its
    backward is ``grad · exp(local − result)`` (this rank's columns).
    """

    rank: int
    world: int
    gather_rows: Callable[[torch.Tensor, int], torch.Tensor]
    reduce_rows: Callable[[torch.Tensor, int], torch.Tensor]
    logsumexp: Callable[[torch.Tensor], torch.Tensor]


class ColumnShardedNet(nn.Module):
    """A :class:`NeuralNet` split for DDP rank ``r`` of ``world``. The towers are the net's
    own (replicated, synchronised by DDP); the rank alone holds (:meth:`local_parameters`,
    which DDP must ignore) the rows of the items :func:`shard_bounds` ``(n_items, r, world)``
    of the item-ID and history tables and of the item biases, and the rows of the users
    ``shard_bounds(n_users, r, world)`` of the user-ID table.

    A step (:meth:`forward`): every rank looks up its rows for all ``B`` users of the batch
    (their ID embedding if it holds the user, the part of their history bag over its items)
    and ``reduce_rows`` sums these into the inputs of the rank's own users; the rank runs the
    user tower on its users, gathers all users' vectors, scores them against its columns (its
    items, or its share of a sampled step's candidates) and returns
    ``(Σ_u w_u lse_u − Σ x_ui s_ui, R_r)``: the first is what the rank back-propagates
    (``lse_u`` over every rank's columns, ``x s`` summed over the rank's columns,
    ``w_u = Σ_i x_ui``), whose gradient with respect to the rank's scores is the full loss's;
    ``R_r`` sums to ``Σ_u L_u`` over the ranks.
    """

    LOCAL = ("own.user_id", "own.history", "own.item_id", "own.item_bias")
    """Names of the rank's own parameters (in a submodule: DDP matches ignored names as
    ``{module}.{parameter}``)."""

    def __init__(self, net: NeuralNet, peers: Peers):
        super().__init__()
        self.net = [net]  # not a submodule: its full tables are not trained here
        self.peers = peers
        self.n_users, self.n_items = net.n_users, net.n_items
        self.lo, self.hi = shard_bounds(net.n_items, peers.rank, peers.world)
        self.user_lo, self.user_hi = shard_bounds(net.n_users, peers.rank, peers.world)
        self.user_tower, self.item_tower = net.user_tower, net.item_tower
        self.register_buffer("user_dense", net.user_dense)
        self.register_buffer("item_dense", net.item_dense)
        self.own = nn.Module()
        self.own.user_id = nn.Parameter(net.user_id.weight.detach()[self.user_lo : self.user_hi].clone())
        self.own.history = nn.Parameter(net.history.detach()[self.lo : self.hi].clone())
        self.own.item_id = nn.Parameter(net.item_id.weight.detach()[self.lo : self.hi].clone())
        self.own.item_bias = nn.Parameter(net.item_bias.detach()[self.lo : self.hi].clone())

    def local_parameters(self) -> list[nn.Parameter]:
        return [self.own.user_id, self.own.history, self.own.item_id, self.own.item_bias]

    def exchange_bytes(self, batch_size: int) -> int:
        """The largest tensor one of this net's collectives carries, in bytes."""
        d = self.own.item_id.shape[1]
        rows = max(-(-self.n_items // self.peers.world), -(-self.n_users // self.peers.world), batch_size)
        return 4 * max(rows * d, batch_size * 2 * d)

    def _inputs(self, batch: _Step) -> torch.Tensor:
        """The user tower's input for the rank's users (see :func:`_user_vectors`)."""
        own = batch.all_user_rows - self.user_lo
        held = (own >= 0) & (own < self.user_hi - self.user_lo)
        if self.user_hi > self.user_lo:
            ids = self.own.user_id[own.clamp(0, self.user_hi - self.user_lo - 1)] * held[:, None]
        else:
            ids = self.own.user_id.new_zeros((len(own), self.own.user_id.shape[1]))
        bags = nn.functional.embedding_bag(
            batch.part_index, self.own.history, batch.part_offsets, mode="sum", per_sample_weights=batch.part_weight
        )
        summed = self.peers.reduce_rows(torch.cat([ids, bags], dim=1), len(own))
        d = ids.shape[1]
        parts = [summed[:, :d], summed[:, d:], self.user_dense[batch.user_rows]]
        if self.item_dense.shape[1]:
            parts.append(
                nn.functional.embedding_bag(
                    batch.bag_index, self.item_dense, batch.bag_offsets, mode="sum", per_sample_weights=batch.bag_weight
                )
            )
        return torch.cat(parts, dim=1)

    def forward(self, batch: _Step) -> tuple[torch.Tensor, torch.Tensor]:
        users = self.user_tower(self._inputs(batch), batch.user_masks)
        users = self.peers.gather_rows(users, len(batch.user_weight))
        if batch.columns is None:
            rows = slice(None)
            dense, bias = self.item_dense[self.lo : self.hi], self.own.item_bias
        else:
            rows = batch.columns - self.lo
            dense, bias = self.item_dense[batch.columns], self.own.item_bias[rows] - batch.column_offset
        items = self.item_tower(torch.cat([self.own.item_id[rows], dense], dim=1), batch.item_masks)
        scores = users @ items.T + bias
        lse = (self.peers.logsumexp(scores) * batch.user_weight).sum()
        picked = (scores.reshape(-1)[batch.target_flat] * batch.target_weight).sum()
        return lse - picked, (lse if self.peers.rank == 0 else 0.0) - picked

    @torch.no_grad()
    def write_back(self) -> NeuralNet:
        """Assemble every rank's rows into the wrapped net (a collective: every rank calls
        it) and return the net."""
        net, gather = self.net[0], self.peers.gather_rows
        net.user_id.weight[: self.n_users] = gather(self.own.user_id.detach(), self.n_users)
        net.history.copy_(gather(self.own.history.detach(), self.n_items))
        net.item_id.weight.copy_(gather(self.own.item_id.detach(), self.n_items))
        net.item_bias.copy_(gather(self.own.item_bias.detach()[:, None], self.n_items)[:, 0])
        return net


def build_net(data: NeuralData, cfg: NeuralConfig) -> NeuralNet:
    """A freshly initialised :class:`NeuralNet`; the init depends only on ``cfg.seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return NeuralNet(data.n_users, data.n_items, data.user_dense, data.item_dense, cfg)


# --------------------------------------------------------------------------- batches
def _bags(x: sp.csr_matrix, keep: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``embedding_bag`` inputs (indices, offsets, weights normalised per row) for the rows
    of ``x``, keeping only the entries where ``keep`` is true."""
    counts = np.diff(x.indptr)
    index, weight = x.indices, x.data.astype(np.float32)
    if keep is not None:
        index, weight = index[keep], weight[keep]
        rows = np.repeat(np.arange(x.shape[0]), counts)[keep]
        counts = np.bincount(rows, minlength=x.shape[0])
    else:
        rows = np.repeat(np.arange(x.shape[0]), counts)
    totals = np.bincount(rows, weights=weight, minlength=x.shape[0])
    weight = (weight / np.where(totals > 0, totals, 1.0)[rows]).astype(np.float32)
    offsets = (np.cumsum(counts) - counts).astype(np.int64)
    return index.astype(np.int64), offsets, weight


@dataclass
class _Step:
    """One global batch's tensors for one rank.

    The user tower's inputs cover the rank's contiguous shard of the batch's users; the
    item-tower masks, ``columns`` and ``column_offset`` its columns (all items, or with
    ``columns`` those item indices); ``target_flat`` indexes the targets in the flattened
    users × columns scores (the rank's users on one rank; all the batch's users, restricted
    to the rank's columns, with ``user_weight`` = ``Σ_i x_ui`` per user, when columns are
    sharded). Sharded, ``all_user_rows`` and the ``part_*`` bag inputs cover all the batch's
    users, the bags restricted to the rank's items (indices relative to its first item)."""

    bag_index: torch.Tensor
    bag_offsets: torch.Tensor
    bag_weight: torch.Tensor
    user_rows: torch.Tensor
    user_masks: list[torch.Tensor] | None
    item_masks: list[torch.Tensor] | None
    target_flat: torch.Tensor
    target_weight: torch.Tensor
    columns: torch.Tensor | None = None
    column_offset: torch.Tensor | None = None
    user_weight: torch.Tensor | None = None
    all_user_rows: torch.Tensor | None = None
    part_index: torch.Tensor | None = None
    part_offsets: torch.Tensor | None = None
    part_weight: torch.Tensor | None = None


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous shard ``[lo, hi)`` of ``n`` rows for ``rank``: sizes differ by at most one."""
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def _item_keep(
    cfg: NeuralConfig, epoch: int, step: int, n_items: int, lo: int, hi: int, tag: int = ITEM_MASK_TAG
) -> list[np.ndarray]:
    """Item-tower dropout keep-masks (one per hidden layer) of item rows ``lo..hi-1``.

    Rows come in blocks of :data:`MASK_BLOCK` items; block ``b`` is drawn from
    ``default_rng([seed, epoch, step, tag, b])``, so a rank draws only the blocks of its own
    item shard and still gets exactly the rows a single process would."""
    masks = [np.empty((hi - lo, h), dtype=bool) for h in cfg.hidden]
    for block in range(lo // MASK_BLOCK, -(-hi // MASK_BLOCK)):
        b_lo, b_hi = block * MASK_BLOCK, min((block + 1) * MASK_BLOCK, n_items)
        a, b = max(lo, b_lo), min(hi, b_hi)
        rng = np.random.default_rng([cfg.seed, epoch, step, tag, block])
        for mask, width in zip(masks, cfg.hidden):
            drawn = rng.random((b_hi - b_lo, width), dtype=np.float32) >= cfg.dropout
            mask[a - lo : b - lo] = drawn[a - b_lo : b - b_lo]
    return masks


@dataclass(frozen=True)
class Candidates:
    """The columns of a sampled-softmax step: sorted item indices and their logQ offsets
    ``o_j`` (0 for the batch's positives, ``log(m q_j / c_j)`` for a sampled negative)."""

    items: np.ndarray
    offset: np.ndarray


class NegativeSampler:
    """Sampled-softmax candidates for a global batch.

    ``P`` = the items in the history of any user of the batch; ``m`` =
    ``cfg.sampled_negatives`` draws ``n_1..n_m`` i.i.d. from ``q_j ∝ (k_j + 1)^``
    :data:`NEGATIVE_POWER` (``k_j`` the item's training users), seeded by
    ``default_rng([seed, epoch, step, 2])``; ``N`` = the drawn items not in ``P``, item
    ``j`` drawn ``c_j`` times. The step scores ``C = P ∪ N`` with offsets ``o_j = 0`` on
    ``P`` and ``log(m q_j / c_j)`` on ``N``, so ``Σ_{j ∈ C} exp(s_uj − o_j)`` is an unbiased
    estimate of ``Σ_j exp(s_uj)`` over the whole catalogue (exact on ``P``, importance
    sampled on the rest)."""

    def __init__(self, x: sp.csr_matrix, cfg: NeuralConfig):
        users = np.bincount(x.indices, minlength=x.shape[1]).astype(np.float64)
        weight = (users + 1.0) ** NEGATIVE_POWER
        self.q = weight / weight.sum()
        self.cdf = np.cumsum(self.q)
        self.m, self.seed = cfg.sampled_negatives, cfg.seed

    def candidates(self, batch: sp.csr_matrix, epoch: int, step: int) -> Candidates:
        positives = np.unique(batch.indices).astype(np.int64)
        u = np.random.default_rng([self.seed, epoch, step, NEGATIVE_TAG]).random(self.m)
        draws = np.minimum(np.searchsorted(self.cdf, u * self.cdf[-1], side="right"), len(self.cdf) - 1)
        negatives, counts = np.unique(draws, return_counts=True)
        fresh = ~np.isin(negatives, positives, assume_unique=True)
        negatives, counts = negatives[fresh], counts[fresh]
        items = np.concatenate([positives, negatives])
        offset = np.concatenate([np.zeros(len(positives)), np.log(self.m * self.q[negatives] / counts)])
        order = np.argsort(items, kind="stable")
        return Candidates(items[order], offset[order].astype(np.float32))


def _make_step(
    x: sp.csr_matrix,
    rows: np.ndarray,
    cfg: NeuralConfig,
    epoch: int,
    step: int,
    rank: int,
    world: int,
    device: torch.device,
    sampler: NegativeSampler | None = None,
    shard_columns: bool = False,
) -> _Step:
    """Draw the random numbers of the global batch ``rows`` from ``default_rng([seed,
    epoch, step])`` (input dropout, ID dropout, user-tower dropout, in this order), then cut
    this rank's contiguous shard of users. The columns are every item, or with ``sampler``
    the step's :class:`Candidates`; with ``shard_columns`` this rank keeps only its columns:
    the items of :func:`shard_bounds` ``(n_items, rank, world)`` (the candidates among them)."""
    n_users, n_items = x.shape
    rng = np.random.default_rng([cfg.seed, epoch, step])
    batch = x[rows]
    keep_input = rng.random(batch.nnz, dtype=np.float32) >= cfg.input_dropout
    as_unknown = rng.random(len(rows), dtype=np.float32) < cfg.id_dropout
    user_keep = (
        [rng.random((len(rows), h), dtype=np.float32) >= cfg.dropout for h in cfg.hidden] if cfg.dropout > 0 else None
    )
    lo, hi = shard_bounds(len(rows), rank, world)
    if shard_columns:  # every user's bag is needed below; the shard's are a slice of them
        shard = None
        every_index, every_offsets, every_weight = _bags(batch, keep_input)
        first, last = (np.append(every_offsets, len(every_index))[[lo, hi]]).tolist()
        index, weight = every_index[first:last], every_weight[first:last]
        offsets = every_offsets[lo:hi] - first
    else:
        shard = batch[lo:hi]
        index, offsets, weight = _bags(shard, keep_input[batch.indptr[lo] : batch.indptr[hi]])

    def t(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(array), dtype=dtype).to(device)

    item_lo, item_hi = shard_bounds(n_items, rank, world) if shard_columns else (0, n_items)
    candidates = sampler.candidates(batch, epoch, step) if sampler is not None else None
    if candidates is None:
        c_lo, c_hi = item_lo, item_hi
        item_keep = _item_keep(cfg, epoch, step, n_items, c_lo, c_hi) if cfg.dropout > 0 else None
    else:
        c_lo, c_hi = (int(v) for v in np.searchsorted(candidates.items, [item_lo, item_hi]))
        n_candidates = len(candidates.items)
        item_keep = (
            _item_keep(cfg, epoch, step, n_candidates, c_lo, c_hi, CANDIDATE_MASK_TAG) if cfg.dropout > 0 else None
        )
    # Targets: this rank's users over all columns, or all users over this rank's columns.
    targets = batch if shard_columns else shard
    target_rows = np.repeat(np.arange(targets.shape[0]), np.diff(targets.indptr))
    position = targets.indices if candidates is None else np.searchsorted(candidates.items, targets.indices)
    mine = (position >= c_lo) & (position < c_hi) if shard_columns else slice(None)
    part: dict[str, torch.Tensor] = {}
    if shard_columns:
        counts = np.diff(np.append(every_offsets, len(every_index)))
        held = (every_index >= item_lo) & (every_index < item_hi)
        counts = np.bincount(np.repeat(np.arange(len(rows)), counts)[held], minlength=len(rows))
        part = {
            "all_user_rows": t(np.where(as_unknown, n_users, rows), torch.int64),
            "part_index": t(every_index[held] - item_lo, torch.int64),
            "part_offsets": t(np.cumsum(counts) - counts, torch.int64),
            "part_weight": t(every_weight[held], torch.float32),
        }
    return _Step(
        **part,
        bag_index=t(index, torch.int64),
        bag_offsets=t(offsets, torch.int64),
        bag_weight=t(weight, torch.float32),
        user_rows=t(np.where(as_unknown, n_users, rows)[lo:hi], torch.int64),
        user_masks=[t(m[lo:hi], torch.float32) for m in user_keep] if user_keep else None,
        item_masks=[t(m, torch.float32) for m in item_keep] if item_keep else None,
        target_flat=t(target_rows[mine] * (c_hi - c_lo) + position[mine] - c_lo, torch.int64),
        target_weight=t(targets.data[mine], torch.float32),
        columns=t(candidates.items[c_lo:c_hi], torch.int64) if candidates is not None else None,
        column_offset=t(candidates.offset[c_lo:c_hi], torch.float32) if candidates is not None else None,
        user_weight=t(np.bincount(target_rows, targets.data, len(rows)), torch.float32) if shard_columns else None,
    )


# --------------------------------------------------------------------------- training
@dataclass
class StepResult:
    """One optimizer step: the global batch's mean loss ``Σ_u L_u / B`` and ``B``."""

    epoch: int
    step: int
    loss: float
    samples: int


def steps_per_epoch(n_users: int, batch_size: int) -> int:
    return math.ceil(n_users / batch_size)


def loss_curve(rec: NeuralRecommender, train_users: int | None = None) -> dict:
    """The training loss history of ``rec`` (its per-step global losses, which every fit
    path records: :func:`fit_neural`, the DDP workers, segment fine-tuning), per epoch.

    Returns ``{"epochs": [0, 1, ...], "loss": [mean loss of each epoch], "step_loss":
    [...], "steps_per_epoch": n, "weighted": bool}``. An epoch's loss is the mean of
    ``Σ_u L_u / B`` over its steps weighted by each step's users ``B`` when the number of
    training users is known (``train_users``, by default ``rec.n_users`` when the step count
    fits it), else the plain mean of its steps (e.g. a model fine-tuned on a subset of its
    users). Reading the recorded losses changes nothing of the model. Empty lists when
    ``rec`` has no recorded loss (e.g. an old save)."""
    losses = [float(v) for v in rec.losses]
    epochs, batch = int(rec.cfg.epochs), int(rec.cfg.batch_size)
    empty = {"epochs": [], "loss": [], "step_loss": losses, "steps_per_epoch": 0, "weighted": False}
    if not losses or epochs < 1 or len(losses) % epochs:
        return empty
    n_steps = len(losses) // epochs
    users = train_users if train_users is not None else rec.n_users
    weighted = steps_per_epoch(users, batch) == n_steps and users > 0
    sizes = [min(batch, users - s * batch) for s in range(n_steps)] if weighted else [1] * n_steps
    per_epoch = [float(np.dot(losses[e * n_steps : (e + 1) * n_steps], sizes) / sum(sizes)) for e in range(epochs)]
    return {
        "epochs": list(range(epochs)),
        "loss": per_epoch,
        "step_loss": losses,
        "steps_per_epoch": n_steps,
        "weighted": weighted,
    }


def train(
    net: nn.Module,
    data: NeuralData,
    cfg: NeuralConfig,
    *,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    on_step: Callable[[StepResult], None] | None = None,
    progress: bool = True,
) -> list[StepResult]:
    """Train ``net`` in place; return the global loss of every step.

    One process: ``net`` is a :class:`NeuralNet`; the step's loss is ``S = Σ_u L_u`` over
    the batch, back-propagated as ``S / B``. More ranks: ``net`` is a
    :class:`ColumnShardedNet` wrapped in DDP (which must ignore its
    :meth:`~ColumnShardedNet.local_parameters`); rank ``r`` back-propagates its
    ``G_r · world_size / B`` (see :class:`ColumnShardedNet`), DDP averages the replicated
    parameters' gradients over ranks and the rank's own table rows get theirs divided by
    ``world_size``, so every parameter gets ``∇ Σ_u L_u / B``, the single-process gradient.
    The reported loss is ``all_reduce(S_r) / B`` (``all_reduce`` sums a tensor over ranks in
    place or not and returns it; None for one process), reduced once per epoch for all its
    steps; ``on_step`` is called at the end of each epoch for each of its steps.

    Catalogues of more than ``cfg.full_softmax_max_items`` items train on the sampled
    softmax of :class:`NegativeSampler`.
    """
    device = torch.device(device)
    module = net.module if hasattr(net, "module") else net
    sharded = isinstance(module, ColumnShardedNet)
    if world_size > 1 and (all_reduce is None or not sharded):
        raise ValueError("train: world_size > 1 needs a ColumnShardedNet (in DDP) and all_reduce")
    x = data.interactions.matrix
    if x.shape != (module.n_users, module.n_items):
        raise ValueError(
            f"train: data has {x.shape} users×items but the net was built for {(module.n_users, module.n_items)}"
        )
    sampler = NegativeSampler(x, cfg) if data.n_items > cfg.full_softmax_max_items else None
    local = module.local_parameters() if sharded else []
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n_steps = steps_per_epoch(data.n_users, cfg.batch_size)
    results: list[StepResult] = []
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.epochs * n_steps, desc=f"neural (world {world_size})", unit="step", leave=False)
    shard_sums: list[torch.Tensor] = []
    sizes: list[int] = []
    net.train()
    try:
        for epoch in range(cfg.epochs):
            order = np.random.default_rng([cfg.seed, epoch]).permutation(data.n_users)
            for step in range(n_steps):
                rows = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
                batch = _make_step(x, rows, cfg, epoch, step, rank, world_size, device, sampler, sharded)
                if sharded:
                    objective, shard_sum = net(batch)
                else:
                    logits = net(
                        batch.bag_index,
                        batch.bag_offsets,
                        batch.bag_weight,
                        batch.user_rows,
                        batch.user_masks,
                        batch.item_masks,
                        batch.columns,
                        batch.column_offset,
                    )
                    log_p = torch.log_softmax(logits, dim=1).reshape(-1)
                    objective = shard_sum = -(log_p[batch.target_flat] * batch.target_weight).sum()
                optimizer.zero_grad(set_to_none=True)
                (objective * (world_size / len(rows))).backward()
                for parameter in local:
                    if parameter.grad is not None:
                        parameter.grad.div_(world_size)
                optimizer.step()
                shard_sums.append(shard_sum.detach())
                sizes.append(len(rows))
                if bar is not None:
                    bar.update(1)
            # One loss reduction per epoch, not per step: fewer synchronisation points.
            totals = torch.stack(shard_sums)
            if all_reduce is not None:
                totals = all_reduce(totals)
            for step, (total, size) in enumerate(zip(totals.tolist(), sizes)):
                results.append(StepResult(epoch, step, total / size, size))
                if on_step is not None:
                    on_step(results[-1])
            shard_sums.clear(), sizes.clear()
            if bar is not None:
                bar.set_postfix(epoch=epoch, loss=f"{np.mean([r.loss for r in results[-n_steps:]]):.3f}")
    finally:
        if bar is not None:
            bar.close()
    net.eval()
    return results


# --------------------------------------------------------------------------- recommender
class NeuralRecommender:
    """A trained :class:`NeuralNet` with the id maps that give its rows and columns meaning."""

    def __init__(
        self,
        net: nn.Module,
        cfg: NeuralConfig,
        user_ids: Sequence,
        item_ids: Sequence,
        user_feature_names: Sequence[str] = (),
        losses: Sequence[float] = (),
    ):
        self.net = net.eval()
        self.cfg = cfg
        self.user_ids = np.asarray(user_ids, dtype=object)
        self.item_ids = np.asarray(item_ids, dtype=object)
        self.user_index = {u: i for i, u in enumerate(self.user_ids)}
        self.item_index = {i: j for j, i in enumerate(self.item_ids)}
        self.user_feature_names = list(user_feature_names)
        self.losses = list(losses)
        self._items: torch.Tensor | None = None
        self._item_side: tuple[np.ndarray, np.ndarray] | None = None
        self.train_seconds: float | None = None

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    def _rows(self, n: int, user_ids: Sequence | None) -> torch.Tensor:
        if user_ids is None:
            return torch.full((n,), self.n_users, dtype=torch.int64)
        if len(user_ids) != n:
            raise ValueError(f"score: {len(user_ids)} user ids for {n} history rows")
        return torch.tensor([self.user_index.get(u, self.n_users) for u in user_ids], dtype=torch.int64)

    def item_embeddings(self) -> np.ndarray:
        """Item-tower outputs (n_items × embedding_dim); the item bias is not included."""
        return self._item_tensor().numpy().copy()

    def item_biases(self) -> np.ndarray:
        return self.net.item_bias.detach().cpu().numpy().copy()

    def item_side(self) -> tuple[np.ndarray, np.ndarray]:
        """Item-tower outputs and item biases as float32 arrays, computed once (read-only)."""
        if self._item_side is None:
            vectors, bias = self.item_embeddings().astype(np.float32), self.item_biases().astype(np.float32)
            vectors.flags.writeable = bias.flags.writeable = False
            self._item_side = (vectors, bias)
        return self._item_side

    def _item_tensor(self) -> torch.Tensor:
        if self._items is None:
            with torch.inference_mode():
                self._items = self.net.item_vectors().cpu()
        return self._items

    def user_tensor(self, x: sp.csr_matrix, user_ids: Sequence | None = None) -> torch.Tensor:
        """User-tower outputs (a CPU tensor) for history rows ``x`` (users×items); unknown or
        missing ``user_ids`` use the zero ID embedding and zero user features."""
        x = as_csr(x, np.float32)
        if x.shape[1] != len(self.item_ids):
            raise ValueError(f"score: history has {x.shape[1]} item columns; the model knows {len(self.item_ids)}")
        if x.nnz and x.data.min() < 0:
            raise ValueError("score: history weights must be non-negative")
        index, offsets, weight = _bags(x)
        with torch.inference_mode():
            return self.net.user_vectors(
                torch.as_tensor(index),
                torch.as_tensor(offsets),
                torch.as_tensor(weight),
                self._rows(x.shape[0], user_ids),
            ).cpu()

    def user_embeddings(self, x: sp.csr_matrix, user_ids: Sequence | None = None) -> np.ndarray:
        """:meth:`user_tensor` as an array."""
        return self.user_tensor(x, user_ids).numpy()

    def score_users(self, users: torch.Tensor, items: np.ndarray | None = None) -> np.ndarray:
        """Scores ``u · v_i + b_i`` of the user-tower outputs ``users`` (:meth:`user_tensor`) on
        the item indices ``items`` (None: every item, computed in torch), as float32."""
        if items is None:
            with torch.inference_mode():
                return (users @ self._item_tensor().T + self.net.item_bias.detach().cpu()).numpy()
        vectors, bias = self.item_side()
        items = np.asarray(items, dtype=np.int64)
        return rows_dot(users.numpy().astype(np.float32, copy=False), vectors[items]) + bias[items]

    def score(self, x: sp.csr_matrix, user_ids: Sequence | None = None) -> np.ndarray:
        """users×items scores ``u · v_i + b_i`` for history rows ``x`` (see :meth:`user_tensor`)."""
        return self.score_users(self.user_tensor(x, user_ids))

    def recommend(
        self, x: sp.csr_matrix, k: int, user_ids: Sequence | None = None, exclude_seen: bool = True
    ) -> np.ndarray:
        """Top-``k`` item indices per history row, best first; seen items excluded."""
        scores = self.score(x, user_ids)
        if exclude_seen:
            x = sp.csr_matrix(x)
            scores[np.repeat(np.arange(x.shape[0]), np.diff(x.indptr)), x.indices] = -np.inf
        k = min(k, scores.shape[1])
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
        return np.take_along_axis(top, order, axis=1)

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> Path:
        """Write ``model.pt`` (state dict: tensors only) and ``neural.json`` (config, ids,
        feature names, losses) to ``directory``; quantized models cannot be saved."""
        if is_quantized(self.net):
            raise ValueError(
                "save: an INT8-quantized model is for serving only; save the float model and quantize after load"
            )
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in self.net.state_dict().items()}
        torch.save(state, directory / MODEL_FILE)
        meta = {
            "format_version": FORMAT_VERSION,
            "config": self.cfg.model_dump(mode="json"),
            "user_ids": [_plain(u) for u in self.user_ids],
            "item_ids": [_plain(i) for i in self.item_ids],
            "user_feature_names": self.user_feature_names,
            "user_dense_dim": int(self.net.user_dense.shape[1]),
            "item_dense_dim": int(self.net.item_dense.shape[1]),
            "losses": self.losses,
        }
        (directory / META_FILE).write_text(json.dumps(meta))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> NeuralRecommender:
        directory = Path(directory)
        for name in (MODEL_FILE, META_FILE):
            if not (directory / name).exists():
                raise FileNotFoundError(f"NeuralRecommender.load: {directory / name} not found")
        meta = json.loads((directory / META_FILE).read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"NeuralRecommender.load: {directory} has format {meta.get('format_version')!r}; "
                f"this code reads {FORMAT_VERSION}"
            )
        cfg = NeuralConfig(**meta["config"])
        state = torch.load(directory / MODEL_FILE, map_location="cpu", weights_only=True)
        n_users, n_items = len(meta["user_ids"]), len(meta["item_ids"])
        net = NeuralNet(
            n_users,
            n_items,
            np.zeros((n_users, meta["user_dense_dim"]), np.float32),
            np.zeros((n_items, meta["item_dense_dim"]), np.float32),
            cfg,
        )
        net.load_state_dict(state)
        return cls(net, cfg, meta["user_ids"], meta["item_ids"], meta["user_feature_names"], meta["losses"])


def _plain(value: object) -> object:
    return value.item() if isinstance(value, np.generic) else value


def is_quantized(net: nn.Module) -> bool:
    """True when ``net`` holds a quantized module (see :func:`quantize_int8`)."""
    return any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in net.modules())


# --------------------------------------------------------------------------- entry points
def fit_neural(
    data: NeuralData, cfg: NeuralConfig | None = None, progress: bool = True, threads: int | None = None
) -> NeuralRecommender:
    """Train in this process (world size 1) with :func:`train` and return the recommender.

    ``threads`` sets torch's intra-op threads for the fit only (restored afterwards); on a
    busy host one thread is often much faster than several for models of this size."""
    cfg = cfg or NeuralConfig()
    net = build_net(data, cfg)
    start = time.perf_counter()
    before = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise ValueError(f"fit_neural: threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    try:
        results = train(net, data, cfg, progress=progress)
    finally:
        torch.set_num_threads(before)
    rec = NeuralRecommender(
        net,
        cfg,
        data.interactions.user_ids,
        data.interactions.item_ids,
        data.user_feature_names,
        [r.loss for r in results],
    )
    rec.train_seconds = time.perf_counter() - start
    return rec


def quantize_int8(rec: NeuralRecommender) -> NeuralRecommender:
    """A copy of ``rec`` whose ``nn.Linear`` layers hold INT8 weights with dynamically
    quantized activations (``torch.ao.quantization.quantize_dynamic``), for CPU serving.
    Embeddings, biases and the item bias stay float32."""
    import copy

    from torch.ao.quantization import quantize_dynamic

    net = copy.deepcopy(rec.net).cpu().eval()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
        quantized = quantize_dynamic(net, {nn.Linear}, dtype=torch.qint8)
    return NeuralRecommender(quantized, rec.cfg, rec.user_ids, rec.item_ids, rec.user_feature_names, rec.losses)
