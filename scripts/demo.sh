#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and run the offline demo: build or reuse the fine-tuned zoo,
# merge it with every method, evaluate, print the accuracy table. Extra arguments go to `primerge demo`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
primerge demo "$@"
