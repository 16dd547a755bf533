#!/usr/bin/env bash
# On the GPU machine (no network, no nox/asv): install the packages in place, run the GPU tests,
# then the single-layer benchmarks.  Results land in ${OUT:-benchmarks/results}.
#   bash scripts/gpu_run.sh [tests|bench|latency|cupy|all|asv]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
if [ -d .whl ]; then  # wheels carried from a machine with network (array-api-compat; asv and its needs)
  # into the interpreter itself, not a --target folder: asv runs benchmarks with a clean environment
  python3 -m pip install -q --no-index --no-deps --no-compile .whl/*.whl
fi
python3 -m pip install -q --no-deps --no-build-isolation -e packages/core -e packages/reference -e packages/triton_backend -e packages/cupy_backend
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
what=${1:-all}
status=0
if [ "$what" = tests ] || [ "$what" = all ]; then
  python3 -m pytest -q tests -p no:cacheprovider -m gpu --durations=5 2>&1 | tee "$OUT/gpu_tests.log"
  status=${PIPESTATUS[0]}
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  for mode in fwd fwd+bwd; do
    for causal in --no_causal ""; do
      python3 benchmarks/single_layer.py --backend triton --mode "$mode" $causal --out "$OUT" \
        --seq_lens 1024 2048 4096 8192 16384 32768 65536 131072 --heads 32 --dim 64 --dtype bfloat16 --repeats 5
    done
  done
fi
if [ "$what" = latency ] || [ "$what" = all ]; then  # a lone call and CUDA-graph replays, where host time matters
  for mode in fwd fwd+bwd; do
    for causal in --no_causal ""; do
      python3 benchmarks/single_layer.py --backend triton --mode "$mode" $causal --out "$OUT" --latency \
        --seq_lens 4096 8192 16384 32768 65536 --heads 32 --dim 64 --dtype bfloat16 --repeats 5 \
        --tag "single_layer_gpu_latency_${mode/+/_}_$([ -z "$causal" ] && echo causal || echo noncausal)"
    done
  done
fi
if [ "$what" = cupy ]; then  # the CuPy backend beside Triton and SDPA, in one run, at N = 131072 (issue 17)
  for mode in fwd fwd+bwd; do
    for causal in --no_causal ""; do
      for backend in triton cupy; do
        python3 benchmarks/single_layer.py --backend $backend --mode "$mode" $causal --out "$OUT" \
          --seq_lens 131072 --heads 32 --dim 64 --dtype bfloat16 --repeats 3 \
          --tag "single_layer_gpu_${backend}_n131072_${mode/+/_}_$([ -z "$causal" ] && echo causal || echo noncausal)"
      done
    done
  done
fi
rm -f "$OUT"/*.png  # at most 8 files come back: plots are redrawn from the JSON (benchmarks/single_layer.py --replot)
if [ "$what" = asv ]; then  # asv travels as wheels in .whl (the GPU image has none)
  python3 -m asv machine --yes --machine gpu >/dev/null
  python3 -m asv run --python=same --quick --machine gpu --show-stderr 2>&1 | tee "$OUT/asv_gpu.log"
fi
exit $status
