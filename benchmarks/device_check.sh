#!/usr/bin/env bash
# One-GPU device check (H100/H200, under 8 minutes): bf16 parity with diffusers, SD3-Medium forward at 1024²,
# a real FlowSteer train step (compile, s/step, MFU, peak memory) and 4-step sampling throughput, ours vs
# diffusers. Prints one labelled line per number, a summary, and last one JSON line. See benchmarks/device_check.py.
#
#   bash benchmarks/device_check.sh                                   # everything, real sizes
#   bash benchmarks/device_check.sh --config=configs/sd3_medium.py --set train.batch_size=2 --set model.remat_policy=full
#   bash benchmarks/device_check.sh --parts=train,sampling            # a rerun of some parts
#   bash benchmarks/device_check.sh --small                           # toy sizes: the plumbing, on a CPU
#
# Install on the GPU machine (CUDA 12 driver), in this order, from the repository root:
#   pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128   # or the CUDA 12.x index
#                                                      # pytorch.org lists for 2.13.0: a CUDA build of the pinned torch
#   pip install "jax[cuda12]==0.10.2"
#   pip install -r requirements.txt -r requirements-test.txt -e .
# torch first: requirements-test.txt's torch==2.13.0 is then already satisfied (a +cuXXX build matches it), so
# pip keeps the CUDA build. Check both see the GPU:
#   python -c "import jax, torch; print(jax.devices(), torch.cuda.is_available())"
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# JAX and torch share the GPU in one process: without this JAX takes 75% of its memory at start-up.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONUNBUFFERED=1  # result lines and tracebacks in order when piped to a file (| tee)

if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi -L || true
fi
# The script's own watchdog prints the results at --budget_s (455 s); this is the backstop.
exec timeout -k 5 470 "${PYTHON:-python}" -m benchmarks.device_check "$@"
