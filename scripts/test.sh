#!/usr/bin/env bash
# Install loracraft with its test extras and run the whole test suite (what CI runs).
# torch==2.13.0 first: on this project's CPU machines pip takes the CPU build from local disk;
# asking for a range instead would pull a multi-GB CUDA build.
set -uo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "torch==2.13.0" || exit 1
python -m pip install -q -e ".[test]" || exit 1
# Browser tests (tests/ui) drive Debian's Chromium through chromedriver: install both when missing
# and possible (root + apt-get); otherwise those tests skip and say why (-rs prints the reasons).
if ! command -v chromedriver >/dev/null 2>&1 || ! { command -v chromium >/dev/null 2>&1 \
    || command -v chromium-browser >/dev/null 2>&1 || command -v google-chrome >/dev/null 2>&1; }; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "scripts/test.sh: installing Debian chromium + chromium-driver for the browser tests" >&2
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; } >/dev/null \
      || echo "scripts/test.sh: could not install chromium; browser tests will skip" >&2
  fi
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline
python -m pytest -q -rs "$@"
code=$?
if [ "$code" -eq 5 ]; then
  echo "scripts/test.sh: pytest collected no tests — treating as failure" >&2
  exit 1
fi
exit "$code"
