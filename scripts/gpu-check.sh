#!/usr/bin/env bash
# On a CUDA machine: set up .venv with a CUDA build of torch, run the GPU tests, then the benchmark
# on the GPU (PRIME vs TA vs exact-SVD TSV on the bench zoo), and with two GPUs one Ray worker per GPU.
# Extra arguments go to `primerge bench`. Takes a few minutes on one modern GPU.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv-gpu/bin/python ] || "$PYTHON" -m venv .venv-gpu
. .venv-gpu/bin/activate
pip install --quiet --upgrade pip
pip install --quiet torch  # the CUDA build (this script is for GPU machines)
pip install --quiet -e ".[eval,test,ray]"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
python -m pytest -q tests/test_gpu.py
primerge bench --device cuda --methods task_arithmetic,prime,tsv:svd=exact --repeats 3 --no-scaling "$@"
GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -ge 2 ]; then
  primerge bench --device cuda --methods task_arithmetic,prime,tsv:svd=exact --repeats 3 --no-scaling \
    --ray-workers "$GPUS" --gpus-per-worker 1 "$@"
fi
