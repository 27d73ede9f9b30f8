"""Training the neural recommender with PyTorch DistributedDataParallel (one code path for
1..N ranks; gloo on CPU, nccl on CUDA). A worker per rank, started by torchrun::

    torchrun --nproc_per_node 2 -m training.ddp --data DIR --out DIR [--epochs N] [--device cuda]

:func:`launch` starts torchrun as a child process and returns what rank 0 wrote (``model/``,
``losses.json``, ``throughput.json``). See docs/models.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
import torch.distributed as dist

from core.net import free_port
from core.settings import NeuralSettings
from training.models import InteractionMatrix
from training.neural import (
    ColumnShardedNet,
    NeuralData,
    NeuralRecommender,
    Peers,
    build_net,
    shard_bounds,
    train,
)

INTERACTIONS_FILE = "interactions.parquet"
USER_DENSE_FILE = "user_dense.npy"
ITEM_DENSE_FILE = "item_dense.npy"
DATA_META_FILE = "data.json"
CONFIG_FILE = "config.json"
LOSSES_FILE = "losses.json"
THROUGHPUT_FILE = "throughput.json"
MODEL_DIR = "model"
SHM_DIR = Path("/dev/shm")
"""Where :class:`SharedMemoryCollectives` maps its segments and FIFOs (a tmpfs)."""
TAIL_CHARS = 4000


_OWN = ("user_id.weight", "history", "item_id.weight", "item_bias")
"""The net's parameters that :class:`ColumnShardedNet` splits over the ranks instead of replicating."""


class DDPError(RuntimeError):
    """A torchrun run failed; the message names the failing ranks and their stderr tails."""


# --------------------------------------------------------------------------- data exchange
def write_training_data(data: NeuralData, directory: str | Path) -> Path:
    """Write ``data`` for the workers: ``interactions.parquet`` (user, item: row/column
    indices; weight), the dense feature matrices as ``.npy`` and ``data.json`` (the user
    and item ids of those indices, the user feature names). Overwrites earlier files."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    coo = data.interactions.matrix.tocoo()
    pd.DataFrame(
        {"user": coo.row.astype(np.int64), "item": coo.col.astype(np.int64), "weight": coo.data.astype(np.float32)}
    ).to_parquet(directory / INTERACTIONS_FILE, index=False)
    np.save(directory / USER_DENSE_FILE, data.user_dense.astype(np.float32))
    np.save(directory / ITEM_DENSE_FILE, data.item_dense.astype(np.float32))
    meta = {
        "user_ids": [_plain(u) for u in data.interactions.user_ids],
        "item_ids": [_plain(i) for i in data.interactions.item_ids],
        "user_feature_names": list(data.user_feature_names),
    }
    (directory / DATA_META_FILE).write_text(json.dumps(meta))
    return directory


def read_training_data(directory: str | Path) -> NeuralData:
    """Inverse of :func:`write_training_data`."""
    directory = Path(directory)
    for name in (INTERACTIONS_FILE, USER_DENSE_FILE, ITEM_DENSE_FILE, DATA_META_FILE):
        if not (directory / name).exists():
            raise FileNotFoundError(f"training data: {directory / name} not found (write it with write_training_data)")
    meta = json.loads((directory / DATA_META_FILE).read_text())
    frame = pd.read_parquet(directory / INTERACTIONS_FILE)
    user_ids = np.asarray(meta["user_ids"], dtype=object)
    item_ids = np.asarray(meta["item_ids"], dtype=object)
    matrix = sp.csr_matrix(
        (frame["weight"].to_numpy(np.float32), (frame["user"].to_numpy(), frame["item"].to_numpy())),
        shape=(len(user_ids), len(item_ids)),
        dtype=np.float32,
    )
    interactions = InteractionMatrix(
        matrix, user_ids, item_ids, {u: i for i, u in enumerate(user_ids)}, {it: j for j, it in enumerate(item_ids)}
    )
    return NeuralData(
        interactions,
        np.load(directory / USER_DENSE_FILE),
        np.load(directory / ITEM_DENSE_FILE),
        list(meta["user_feature_names"]),
    )


def _plain(value: object) -> object:
    return value.item() if isinstance(value, np.generic) else value


# --------------------------------------------------------------------------- collectives
class Collectives:
    """Sum and gather over the ranks of a job (every rank calls each, in the same order,
    with tensors of one shape): the gloo / nccl process group of ``torch.distributed``."""

    def __init__(self, group=None):
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks, in place; returns it."""
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``tensor``, in rank order."""
        parts = [torch.empty_like(tensor) for _ in range(self.world)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return parts

    def close(self) -> None:
        pass


class SharedMemoryCollectives(Collectives):
    """:class:`Collectives` among ranks on one host through shared memory, without sockets or
        communication threads: each rank owns a segment of two ``capacity``-byte slots; call ``k``
        copies the rank's tensor into slot ``k mod 2`` (a file in :data:`SHM_DIR` mapped by every
    rank), writes one byte into a FIFO to every peer,
        reads one byte from every peer's FIFO (blocking in the kernel, so a waiting rank uses no
        CPU), then reads all ranks' slots. A rank rewrites a slot (call ``k + 2``) only after
        every peer has announced call ``k + 1``, i.e. finished reading call ``k``. Sums add the
        slots in rank order, so every rank gets the same bits. A peer that dies closes its FIFO
        and the waiting ranks raise. Set up collectively over ``setup`` (a process group)."""

    def __init__(self, capacity: int, setup=None):
        super().__init__(setup)
        self.capacity = int(capacity)
        token = [uuid.uuid4().hex[:12] if self.rank == 0 else None]
        dist.broadcast_object_list(token, src=0, group=setup)
        base = SHM_DIR / f"hyperrec-ddp-{token[0]}"
        try:
            self._connect(base, setup)
        except BaseException:
            mine = [f"{base}-{self.rank}"] + [f"{base}-{self.rank}-{peer}" for peer in range(self.world)]
            for path in mine:  # whatever of its files this rank made
                Path(path).unlink(missing_ok=True)
            raise
        self._slots = [
            [torch.frombuffer(m, dtype=torch.uint8)[i * self.capacity : (i + 1) * self.capacity] for i in (0, 1)]
            for m in self._maps
        ]
        self._calls = 0

    def _connect(self, base: Path, setup) -> None:
        """Create this rank's segment and FIFOs, map and open everyone's, unlink the names."""
        import mmap

        size = 2 * self.capacity
        fd = os.open(f"{base}-{self.rank}", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        os.ftruncate(fd, size)
        os.close(fd)
        for peer in range(self.world):
            if peer != self.rank:
                os.mkfifo(f"{base}-{self.rank}-{peer}", 0o600)
        dist.barrier(group=setup)
        self._maps = []
        for r in range(self.world):
            fd = os.open(f"{base}-{r}", os.O_RDWR)
            self._maps.append(mmap.mmap(fd, size))
            os.close(fd)
        self._peers = [r for r in range(self.world) if r != self.rank]
        # Readers first (non-blocking open), then writers (a reader exists: no wait).
        self._inbox = {r: os.open(f"{base}-{r}-{self.rank}", os.O_RDONLY | os.O_NONBLOCK) for r in self._peers}
        dist.barrier(group=setup)
        self._outbox = {r: os.open(f"{base}-{self.rank}-{r}", os.O_WRONLY) for r in self._peers}
        dist.barrier(group=setup)
        # Everyone has mapped and opened everything: the names can go (nothing leaks on a crash).
        os.unlink(f"{base}-{self.rank}")
        for peer in self._peers:
            os.unlink(f"{base}-{self.rank}-{peer}")

    def _exchange(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Publish ``tensor`` and return every rank's, as views of the shared slots."""
        flat = tensor.detach().reshape(-1)
        size = flat.numel() * flat.element_size()
        if size > self.capacity:
            raise ValueError(f"SharedMemoryCollectives: {size} bytes exceed the slot capacity {self.capacity}")
        slot = self._calls % 2
        self._calls += 1
        self._slots[self.rank][slot][:size].view(flat.dtype).copy_(flat)
        for fd in self._outbox.values():
            os.write(fd, b"\x01")
        for peer, fd in self._inbox.items():
            self._wait(peer, fd)
        return [s[slot][:size].view(flat.dtype).view(tensor.shape) for s in self._slots]

    @staticmethod
    def _wait(peer: int, fd: int) -> None:
        """Read the peer's byte, blocking in the kernel until it is there."""
        select.select([fd], [], [])
        if not os.read(fd, 1):
            raise RuntimeError(f"SharedMemoryCollectives: rank {peer} exited")

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        parts = self._exchange(tensor)
        with torch.no_grad():
            tensor.copy_(parts[0])
            for part in parts[1:]:
                tensor.add_(part)
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        return [part.clone() for part in self._exchange(tensor)]

    def close(self) -> None:
        for fd in [*self._inbox.values(), *self._outbox.values()]:
            os.close(fd)
        self._slots, self._inbox, self._outbox = [], {}, {}
        for m in self._maps:
            # A tensor that still views the mapping keeps it until the process ends.
            with contextlib.suppress(BufferError):
                m.close()


def _average_hook(collectives: Collectives, bucket):  # no annotation: DDP checks it at run time
    """DDP communication hook: the bucket's gradients averaged over ranks (synchronously)."""
    buffer = bucket.buffer()
    collectives.all_reduce(buffer).div_(collectives.world)
    future: torch.futures.Future = torch.futures.Future()
    future.set_result(buffer)
    return future


def local_collectives(capacity: int, device: torch.device) -> Collectives:
    """Shared-memory collectives when every rank is on this host and on the CPU and the shared
    memory has room (``HYPERREC_DDP_SHM=0`` turns them off); else a new process group's."""
    if device.type != "cpu" or int(os.environ.get("LOCAL_WORLD_SIZE", "0")) != dist.get_world_size():
        return Collectives(dist.new_group(backend=dist.get_backend()))  # the same on every rank
    wanted = os.environ.get("HYPERREC_DDP_SHM", "1") != "0"
    room = shutil.disk_usage(SHM_DIR).free if SHM_DIR.is_dir() else 0
    # Every rank needs two slots; leave half of the free shared memory to others.
    agreed = torch.tensor([int(wanted and room > 4 * capacity * dist.get_world_size())])
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
    if int(agreed):
        return SharedMemoryCollectives(capacity)
    return Collectives(dist.new_group(backend=dist.get_backend()))


# --------------------------------------------------------------------------- worker
class GatherRows(torch.autograd.Function):
    """Forward: every rank's rows in rank order, rank ``r`` holding rows
    ``shard_bounds(n, r, world)`` (blocks padded to one size for ``all_gather``).
    Backward: the output gradient summed over ranks (``all_reduce``), cut to this rank's
    rows, i.e. this rank's share of the gradient of the sum of all ranks' losses."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, n: int, collectives: Collectives) -> torch.Tensor:
        world, rank = collectives.world, collectives.rank
        bounds = [shard_bounds(n, r, world) for r in range(world)]
        if local.shape[0] != bounds[rank][1] - bounds[rank][0]:
            raise ValueError(f"GatherRows: rank {rank} holds {local.shape[0]} rows, expected rows {bounds[rank]}")
        padded = local.new_zeros((max(hi - lo for lo, hi in bounds), *local.shape[1:]))
        padded[: local.shape[0]] = local
        parts = collectives.all_gather(padded)
        ctx.collectives, ctx.rows = collectives, bounds[rank]
        return torch.cat([part[: hi - lo] for part, (lo, hi) in zip(parts, bounds)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = ctx.collectives.all_reduce(grad.contiguous().clone())
        lo, hi = ctx.rows
        return grad[lo:hi], None, None


class ReduceRows(torch.autograd.Function):
    """Forward: the sum over ranks of every rank's ``n`` rows (``all_reduce``), cut to this
    rank's rows ``shard_bounds(n, rank, world)``. Backward: every rank's gradient rows in rank
    order (``all_gather``), which is the gradient of each rank's summand."""

    @staticmethod
    def forward(ctx, partial: torch.Tensor, n: int, collectives: Collectives) -> torch.Tensor:
        bounds = [shard_bounds(n, r, collectives.world) for r in range(collectives.world)]
        lo, hi = bounds[collectives.rank]
        ctx.collectives, ctx.bounds = collectives, bounds
        return collectives.all_reduce(partial.detach().clone())[lo:hi]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        padded = grad.new_zeros((max(hi - lo for lo, hi in ctx.bounds), *grad.shape[1:]))
        padded[: grad.shape[0]] = grad
        parts = ctx.collectives.all_gather(padded)
        return torch.cat([part[: hi - lo] for part, (lo, hi) in zip(parts, ctx.bounds)]), None, None


class GlobalLogSumExp(torch.autograd.Function):
    """Forward: per row, ``log Σ exp`` over the columns of every rank (each rank holds some
    columns of the same rows), from every rank's row maximum ``m_r`` and ``z_r = Σ exp(local
    − m_r)`` (one ``all_gather``). Backward: ``grad · exp(local − result)``, the derivative
    with respect to this rank's columns; no communication."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, collectives: Collectives) -> torch.Tensor:
        if local.shape[1]:
            peak = local.detach().max(dim=1).values
            total = torch.exp(local.detach() - peak[:, None]).sum(dim=1)
        else:  # no columns on this rank
            peak = local.new_full((local.shape[0],), -torch.inf)
            total = local.new_zeros(local.shape[0])
        parts = torch.stack(collectives.all_gather(torch.stack([peak, total])))
        peaks, totals = parts[:, 0], parts[:, 1]
        top = peaks.max(dim=0).values
        result = top + torch.log((totals * torch.exp(peaks - top)).sum(dim=0))
        ctx.save_for_backward(local, result)
        return result

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        local, result = ctx.saved_tensors
        return grad[:, None] * torch.exp(local - result[:, None]), None


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.ddp", description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, required=True, help="directory written by write_training_data")
    p.add_argument("--out", type=Path, required=True, help="rank 0 writes model/, losses.json, throughput.json here")
    p.add_argument("--config", type=Path, help="JSON of NeuralConfig fields (defaults otherwise)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="global batch, in users")
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per rank (CPU)")
    p.add_argument("--progress", action="store_true", help="tqdm bar on rank 0")
    return p.parse_args(argv)


def _config(args: argparse.Namespace) -> NeuralSettings:
    fields = json.loads(args.config.read_text()) if args.config else {}
    for name in ("epochs", "batch_size", "lr", "seed"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    return NeuralSettings(**fields)


def _worker(argv: list[str] | None = None) -> None:
    from torch.nn.parallel import DistributedDataParallel

    args = _parse(argv)
    cfg = _config(args)
    if "RANK" not in os.environ:
        raise RuntimeError("training.ddp: no RANK in the environment; start it with torchrun (or use launch())")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("training.ddp --device cuda: CUDA is not available on this node")
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"training.ddp: local rank {local_rank} has no GPU "
                f"({torch.cuda.device_count()} visible); use --nproc_per_node <= GPUs"
            )
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
        torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        data = read_training_data(args.data)
        net = build_net(data, cfg).to(device)

        def all_reduce(t: torch.Tensor) -> torch.Tensor:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            return t

        model: torch.nn.Module = net  # one rank: the plain net, as an in-process fit
        collectives: Collectives | None = None
        if world > 1:
            replicated = sum(p.numel() * p.element_size() for n, p in net.named_parameters() if n not in _OWN)
            peers = Peers(
                rank,
                world,
                lambda local, n: GatherRows.apply(local, n, collectives),
                lambda partial, n: ReduceRows.apply(partial, n, collectives),
                lambda scores: GlobalLogSumExp.apply(scores, collectives),
            )
            sharded = ColumnShardedNet(net, peers)
            collectives = local_collectives(max(replicated, sharded.exchange_bytes(cfg.batch_size)), device)
            all_reduce = collectives.all_reduce
            # Each rank's table rows are its own: DDP neither broadcasts nor all-reduces them.
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(sharded, list(ColumnShardedNet.LOCAL))
            # The feature buffers are constant and identical on every rank: no per-step
            # broadcast; the gradients live in one bucket (one all-reduce per step, no copy
            # in and out).
            model = DistributedDataParallel(
                sharded,
                device_ids=[local_rank] if device.type == "cuda" else None,
                forward_sync_buffers=False,
                gradient_as_bucket_view=True,
                bucket_cap_mb=replicated / 2**20 + 1,
            )
            if isinstance(collectives, SharedMemoryCollectives):
                model.register_comm_hook(collectives, _average_hook)

        dist.barrier()
        start, cpu_start = time.perf_counter(), time.process_time()
        results = train(
            model,
            data,
            cfg,
            rank=rank,
            world_size=world,
            device=device,
            all_reduce=all_reduce,
            progress=args.progress,
        )
        if world > 1:
            sharded.write_back()  # every rank's table rows into net (a collective)
            collectives.close()
        cpu = torch.tensor([time.process_time() - cpu_start], dtype=torch.float64, device=device)
        dist.barrier()
        seconds = time.perf_counter() - start
        dist.all_reduce(cpu, op=dist.ReduceOp.SUM)  # CPU seconds of all ranks' processes
        if rank == 0:
            out = args.out
            out.mkdir(parents=True, exist_ok=True)
            rec = NeuralRecommender(
                net.cpu(),
                cfg,
                data.interactions.user_ids,
                data.interactions.item_ids,
                data.user_feature_names,
                [r.loss for r in results],
            )
            rec.save(out / MODEL_DIR)
            (out / LOSSES_FILE).write_text(
                json.dumps([{"epoch": r.epoch, "step": r.step, "loss": r.loss, "samples": r.samples} for r in results])
            )
            samples = sum(r.samples for r in results)
            (out / THROUGHPUT_FILE).write_text(
                json.dumps(
                    {
                        "samples": samples,
                        "seconds": seconds,
                        "samples_per_s": samples / seconds,
                        "cpu_seconds": float(cpu),
                        "cpu_ms_per_sample": 1e3 * float(cpu) / samples,
                        "steps": len(results),
                        "epochs": cfg.epochs,
                        "batch_size": cfg.batch_size,
                        "world_size": world,
                        "nnodes": int(os.environ.get("GROUP_WORLD_SIZE", "1")),
                        "backend": backend,
                        # What the ranks' own exchanges (and, in shared memory, DDP's) run on.
                        "collectives": (
                            None
                            if collectives is None
                            else "shared memory"
                            if isinstance(collectives, SharedMemoryCollectives)
                            else backend
                        ),
                        "device": device.type,
                        "threads_per_rank": torch.get_num_threads() if device.type == "cpu" else None,
                    },
                    indent=2,
                )
            )
            print(
                f"rank 0: {len(results)} steps, {samples / seconds:.1f} samples/s, final loss {results[-1].loss:.4f}",
                flush=True,
            )
        # Nobody tears down while rank 0 still writes: a gloo group whose peer has already
        # exited can hang in its destructor.
        dist.barrier()
        del model  # release the DDP reducer's hold on the process group before destroying it
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    from torch.distributed.elastic.multiprocessing.errors import record

    record(_worker)(argv)


# --------------------------------------------------------------------------- launcher
def _tail(path: Path, chars: int = TAIL_CHARS) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-chars:]


def _rank_failures(log_dir: Path) -> list[str]:
    """``rank-dir: stderr tail`` for every worker whose stderr shows a traceback or error."""
    found = []
    for path in sorted(log_dir.rglob("stderr.log")):
        text = _tail(path)
        if "Traceback" in text or "Error" in text:
            # <log_dir>/node<i>/<run id>/attempt_<n>/<local rank>/stderr.log
            node, local_rank = path.relative_to(log_dir).parts[0], path.parent.name
            found.append(f"--- {node}, local rank {local_rank} ({path}) ---\n{text}")
    return found


def launch(
    data_dir: str | Path,
    out_dir: str | Path,
    nproc: int = 2,
    nnodes: int = 1,
    device: str = "cpu",
    cfg: NeuralSettings | None = None,
    epochs: int | None = None,
    threads: int = 1,
    timeout: float = 600.0,
    progress: bool = False,
) -> dict:
    """Run :mod:`training.ddp` under torchrun (``sys.executable -m torch.distributed.run``)
    with ``nproc`` ranks per node and return ``{"losses": [global loss per step], "steps":
    [{epoch, step, loss, samples}], "throughput": {...}, "model_dir": Path, "out_dir": Path}``.

    ``nnodes > 1`` starts one torchrun per node on this host, joined by a c10d rendezvous
    on a free loopback port (a multi-node run in miniature). Worker logs go to
    ``out_dir/logs``; torchrun's own output to ``out_dir/torchrun-node<i>.log``.
    """
    if nproc < 1 or nnodes < 1:
        raise ValueError(f"launch: nproc and nnodes must be >= 1, got nproc={nproc}, nnodes={nnodes}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"launch: device must be 'cpu' or 'cuda', got {device!r}")
    data_dir, out_dir = Path(data_dir).resolve(), Path(out_dir).resolve()
    read_training_data(data_dir)  # fail here, not in every rank, on a bad data directory
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in (LOSSES_FILE, THROUGHPUT_FILE):
        (out_dir / stale).unlink(missing_ok=True)
    worker = [
        "-m",
        "training.ddp",
        "--data",
        str(data_dir),
        "--out",
        str(out_dir),
        "--device",
        device,
        "--threads",
        str(threads),
    ]
    if cfg is not None:
        (out_dir / CONFIG_FILE).write_text(cfg.model_dump_json())
        worker += ["--config", str(out_dir / CONFIG_FILE)]
    if epochs is not None:
        worker += ["--epochs", str(epochs)]
    if progress:
        worker.append("--progress")
    log_dir = out_dir / "logs"
    shutil.rmtree(log_dir, ignore_errors=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    if device == "cuda":
        env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root, *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    base = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--redirects",
        "3",
        "--max-restarts",
        "0",
    ]
    if nnodes == 1:
        commands = [base + ["--standalone", "--nnodes", "1", "--log-dir", str(log_dir / "node0")] + worker]
    else:
        # Loopback only: a simulated cluster on this host.
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        endpoint, run_id = f"127.0.0.1:{free_port()}", f"hyperrec-{uuid.uuid4().hex[:8]}"
        join_timeout = max(int(min(timeout, 300)), 30)  # a node that never comes fails the others
        commands = [
            base
            + [
                "--nnodes",
                str(nnodes),
                "--node-rank",
                str(i),
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                endpoint,
                "--rdzv-id",
                run_id,
                "--rdzv-conf",
                f"is_host={1 if i == 0 else 0},join_timeout={join_timeout}",
                "--local-addr",
                "127.0.0.1",
                "--log-dir",
                str(log_dir / f"node{i}"),
            ]
            + worker
            for i in range(nnodes)
        ]
    logs = [out_dir / f"torchrun-node{i}.log" for i in range(len(commands))]
    handles = [open(path, "w") for path in logs]  # noqa: SIM115 - closed in the finally below
    procs = []
    try:
        for command, handle in zip(commands, handles):
            # Own session per torchrun, so that a timeout can stop it together with its workers.
            procs.append(
                subprocess.Popen(
                    command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True
                )
            )
        deadline = time.monotonic() + timeout
        codes = []
        for proc in procs:
            try:
                codes.append(proc.wait(timeout=max(deadline - time.monotonic(), 0.1)))
            except subprocess.TimeoutExpired:
                raise DDPError(
                    f"launch: torchrun did not finish within {timeout:.0f} s "
                    f"(nproc={nproc}, nnodes={nnodes}); logs in {log_dir}\n" + "\n".join(_rank_failures(log_dir))
                ) from None
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for handle in handles:
            handle.close()
    if any(codes) or not (out_dir / LOSSES_FILE).exists():
        failures = _rank_failures(log_dir) or [f"--- {path.name} ---\n{_tail(path)}" for path in logs]
        raise DDPError(
            f"launch: torchrun failed (exit codes {codes}, nproc={nproc}, nnodes={nnodes}, "
            f"device={device}); failing ranks' stderr:\n" + "\n".join(failures)
        )
    losses = json.loads((out_dir / LOSSES_FILE).read_text())
    return {
        "losses": [row["loss"] for row in losses],
        "steps": losses,
        "throughput": json.loads((out_dir / THROUGHPUT_FILE).read_text()),
        "model_dir": out_dir / MODEL_DIR,
        "out_dir": out_dir,
    }


if __name__ == "__main__":
    main()
