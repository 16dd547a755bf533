python3 -m pip install -q --no-index --no-deps --no-compile .whl/*.whl
python3 -m pip install -q --no-deps --no-build-isolation -e packages/core -e packages/reference -e packages/triton_backend
timeout 200 python3 -m pytest -q tests/test_triton.py -p no:cacheprovider -m gpu -k "not 131072" 2>&1 | tail -5
timeout 200 python3 scripts/gpu_crossover.py 2>&1 | tee $OUT/crossover.txt
timeout 60 python3 scripts/gpu_host_profile.py causal 2>&1 | tail -40 | cut -c1-160
