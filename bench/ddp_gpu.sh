#!/usr/bin/env bash
# Benchmark: DDP training throughput of the neural hybrid on every visible GPU (nccl).
#
# Run: bench/ddp_gpu.sh [extra bench/ddp.py options, e.g. --epochs 20 --batch-sizes 256 1024]
#
# Runs bench/ddp.py --device cuda with 1 rank and with one rank per visible GPU (torchrun,
# nccl backend, one GPU per local rank; with several ranks the softmax columns are split over
# the GPUs as on CPU, their exchanges on nccl) and prints its Markdown table (samples/s per
# global batch size and rank count, median of --repeat runs); the figures also go to
# <home>/bench/ddp-cuda.json (or --json PATH). Exits with status 2 and a message when no
# CUDA device is visible (a CPU-only torch build included) or torch lacks NCCL.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"

gpus="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')"
if [ "$gpus" -lt 1 ]; then
    echo "bench/ddp_gpu.sh: no CUDA device visible to torch ($("$PYTHON" -c 'import torch; print(torch.__version__)')); nothing to run." >&2
    echo "Run it on a host with NVIDIA GPUs and a CUDA build of torch (e.g. pip install torch==2.13.0 from the CUDA index)." >&2
    exit 2
fi
if ! "$PYTHON" -c 'import sys, torch.distributed as d; sys.exit(0 if d.is_nccl_available() else 1)'; then
    echo "bench/ddp_gpu.sh: this torch build has no NCCL backend; cannot run DDP on GPUs." >&2
    exit 2
fi

ranks="1"
if [ "$gpus" -gt 1 ]; then
    ranks="1 $gpus"
fi
echo "GPUs: $gpus ($("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name(0))'))"
# shellcheck disable=SC2086
exec "$PYTHON" bench/ddp.py --device cuda --ranks $ranks "$@"
