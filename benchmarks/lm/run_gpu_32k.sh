#!/usr/bin/env bash
# One GPU call (under 10 minutes on an H200, no network): install the packages in place, train the
# gpu-32k byte-level model (~5 minutes), then the 32k perplexity table (exact, local windows of 512
# and 4096 keys, HyperAttention in the last 2, last 4 and all layers with three parameter sets).
#   OUT=benchmarks/results HYPERATTN_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/lm/run_gpu_32k.sh
# Environment: OUT (results folder), MODEL (model folder), TRAIN_ARGS (extra train.py options),
# SAMPLES (sequences per row), SETTINGS (parameter sets, see perplexity.py --settings), TAG (the
# results' name; e.g. two shorter-trained models in one call, then benchmarks/perplexity_gaps.py):
#   for s in 1 2; do TRAIN_ARGS="--seed $s --steps 700" TAG=perplexity_lm32k_32768_seed$s bash benchmarks/lm/run_gpu_32k.sh; done
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-benchmarks/results}
MODEL=${MODEL:-/tmp/hyperattn-lm32k}
SAMPLES=${SAMPLES:-32}
SETTINGS=${SETTINGS:-"block_size=256 block_size=128,sample_size=128 min_seq_len=1024"}
TAG=${TAG:-perplexity_lm32k_32768}
mkdir -p "$OUT"
if [ -d .whl ]; then  # wheels the GPU image lacks (array-api-compat)
  python3 -m pip install -q --no-index --no-deps --no-compile .whl/*.whl
fi
python3 -m pip install -q --no-deps --no-build-isolation -e packages/core -e packages/reference -e packages/triton_backend
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
# shellcheck disable=SC2086
python3 benchmarks/lm/train.py --preset gpu-32k --out "$MODEL" --quiet ${TRAIN_ARGS:-}
cp "$MODEL/train_log.json" "$OUT/${TAG/perplexity_lm32k_32768/lm32k}_train_log.json"
# shellcheck disable=SC2086
python3 benchmarks/perplexity.py --model "$MODEL" --seq_len 32768 --num_samples "$SAMPLES" --seed 0 \
  --layers last:2 last:4 all --settings $SETTINGS --windows 512 4096 \
  --out "$OUT" --tag "$TAG" --quiet
