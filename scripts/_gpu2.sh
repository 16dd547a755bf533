python3 -m pip install -q --no-index --no-deps --no-compile .whl/*.whl
python3 -m pip install -q --no-deps --no-build-isolation -e packages/core -e packages/reference -e packages/triton_backend
export HYPERATTN_COMMIT=$COMMIT
timeout 300 python3 -m pytest -q tests/test_triton.py -p no:cacheprovider --durations=8 2>&1 | tail -25 > $OUT/gpu_tests.log; tail -25 $OUT/gpu_tests.log
timeout 40 python3 scripts/gpu_lsh_sweep.py 2>&1 | tee $OUT/lsh.txt
timeout 80 python3 scripts/gpu_profile.py 2>&1 > $OUT/profile.txt; grep -v "^-\|Self CPU" $OUT/profile.txt | cut -c1-60,100-150 | head -70
for mode in fwd fwd+bwd; do for causal in --no_causal ""; do
timeout 60 python3 benchmarks/single_layer.py --backend triton --mode $mode $causal --out $OUT --seq_lens 131072 --heads 32 --dim 64 --dtype bfloat16 --repeats 3 2>&1 | tail -4
done; done
