#!/usr/bin/env bash
# The GPU benchmark set on full-size SD1.5 shapes (random weights, built here: no download) at 512 px,
# batch 4, LoRA rank 4, fp16 and bf16: loracraft's step against the bare floor and against the
# diffusers reference script's per-step work, with peak GPU memory; then the command line itself.
# Budget: under 10 minutes on one current data-centre GPU (model build ~1 min, each bench a few).
#
#   scripts/bench_gpu.sh [WORK_DIR]      (results: WORK_DIR/*.json; the printed tables)
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-$(mktemp -d -t loracraft-bench-gpu-XXXX)}
mkdir -p "$W"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
THREADS=${THREADS:-8}  # CPU threads for data work and the reference's DataLoader process
run() { echo "+ $*" >&2; timeout "${LIMIT:-300}" "$@"; }
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible to PyTorch')"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
LIMIT=420 run python scripts/bench_train.py --device cuda --dtype fp16 --models sd15 --variants a,b,d,f \
    --images 32 --warmup 3 --window 5 --rounds 4 --threads "$THREADS" --work-dir "$W" --json "$W/train-fp16.json"
run python scripts/bench_train.py --device cuda --dtype bf16 --models sd15 --variants a,b,d \
    --images 32 --warmup 3 --window 5 --rounds 3 --threads "$THREADS" --work-dir "$W" --json "$W/train-bf16.json"
run python scripts/bench_cli.py --model sd15 --device cuda --dtype fp16 --short 10 --long 60 --rounds 1 \
    --threads "$THREADS" --work-dir "$W" --json "$W/cli-fp16.json"
echo "results in $W" >&2
