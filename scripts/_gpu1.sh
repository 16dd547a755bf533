set -x
python3 -m pip install -q --no-index --no-deps --no-compile .whl/*.whl
python3 -m pip install -q --no-deps --no-build-isolation -e packages/core -e packages/reference -e packages/triton_backend
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 150 python3 -m pytest -q -x tests/test_triton.py -p no:cacheprovider -k "same_plan and gpu" --durations=5 2>&1 | tail -15 | tee $OUT/tests.txt
timeout 90 python3 scripts/gpu_profile.py 2>&1 | tee $OUT/profile.txt | grep -v "^-\|Self CPU" | cut -c1-150 | head -80
timeout 160 python3 scripts/gpu_tune.py fwd 2>&1 | tee $OUT/tune_fwd.txt
timeout 120 python3 scripts/gpu_tune.py bwd 2>&1 | tee $OUT/tune_bwd.txt
