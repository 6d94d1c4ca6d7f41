#!/usr/bin/env bash
# Install loracraft with its test extras and run the whole test suite (what CI runs).
# torch==2.13.0 first: on this project's CPU machines pip takes the CPU build from local disk;
# asking for a range instead would pull a multi-GB CUDA build.
set -uo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "torch==2.13.0" || exit 1
python -m pip install -q -e ".[test]" || exit 1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline
python -m pytest -q "$@"
code=$?
if [ "$code" -eq 5 ]; then
  echo "scripts/test.sh: pytest collected no tests — treating as failure" >&2
  exit 1
fi
exit "$code"
