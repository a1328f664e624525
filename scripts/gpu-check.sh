#!/usr/bin/env bash
# The GPU checks, on a CUDA machine: the GPU tests (a CUDA merge against the CPU one, CUDA merges
# repeated byte for byte), then `primerge bench` of Task Arithmetic, PRIME and exact-SVD TSV on the
# bench zoo on the GPU and on the same machine's CPU, and with two GPUs and Ray one worker per GPU.
# Extra arguments go to `primerge bench`. A few minutes on one modern GPU.
#
# It runs primerge from this checkout (PYTHONPATH=src, nothing installed) with the machine's own
# Python, whose torch must see the GPU. What that Python lacks of primerge's dependencies is
# installed into .gpu-site/: from the package index, or, on a machine without network (a lent
# device machine has torch, transformers, safetensors, tqdm, pyyaml and numpy, not pydantic), from
# wheels fetched beforehand where there is network:
#
#   bash scripts/gpu-check.sh --prepare 3.12   # here: the wheels for that Python into .gpu-wheels/
#   bash scripts/gpu-check.sh                  # there, with .gpu-wheels/ carried along
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
WHEELS=.gpu-wheels
SITE=.gpu-site
NEEDED=("pydantic>=2.5")  # primerge's dependencies a CUDA image may lack (pyproject.toml)

if [ "${1:-}" = "--prepare" ]; then
  version="${2:?usage: gpu-check.sh --prepare PYTHON_VERSION (e.g. 3.12)}"
  python3 -m pip download --quiet --dest "$WHEELS" --only-binary=:all: --python-version "$version" \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "${NEEDED[@]}"
  ls "$WHEELS"
  exit 0
fi

PYTHON="${PYTHON:-python3}"
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
if ! "$PYTHON" -c "import pydantic" 2>/dev/null; then
  if [ -d "$WHEELS" ]; then
    "$PYTHON" -m pip install --quiet --no-index --find-links "$WHEELS" --target "$SITE" "${NEEDED[@]}"
  else
    "$PYTHON" -m pip install --quiet --target "$SITE" "${NEEDED[@]}"
  fi
fi
export PYTHONPATH="$PWD/src:$PWD/$SITE${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -c "import primerge, primerge.bench"  # a dependency still missing is named here
"$PYTHON" -m pytest -q -p no:cacheprovider tests/test_gpu.py
METHODS=task_arithmetic,prime,tsv:svd=exact
"$PYTHON" -m primerge bench --device cuda --methods "$METHODS" --repeats 2 --no-scaling "$@"
"$PYTHON" -m primerge bench --device cpu --methods "$METHODS" --repeats 2 --no-scaling --no-accuracy "$@"
GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -ge 2 ] && "$PYTHON" -c "import ray" 2>/dev/null; then
  "$PYTHON" -m primerge bench --device cuda --methods "$METHODS" --repeats 2 --no-scaling --no-accuracy \
    --ray-workers "$GPUS" --gpus-per-worker 1 "$@"
fi
