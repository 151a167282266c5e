#!/usr/bin/env bash
# The GPU benchmark suite behind results/ (H100 or H200 image: python3, torch, triton, transformers preinstalled).
#
#   bash scripts/gpu_suite.sh check      # GPU-only tests of the kernels and patched models
#   bash scripts/gpu_suite.sh kernels    # block-sparse + estimation kernels
#   bash scripts/gpu_suite.sh prefill    # attention stage of every prefill policy vs dense
#   bash scripts/gpu_suite.sh e2e        # whole-model TTFT / decode / memory, every policy vs transformers dense
#
# FlashAttention-4 (optional) must be importable for the FA4 baselines: see shared/gpu/README.md for the offline
# install used here (PYTHONPATH=/tmp/site:...). Results land in ${OUT:-results}.
set -u
OUT=${OUT:-results}
export TRITON_INTERPRET=0
mkdir -p "$OUT"
python3 -c "import accel.kernels" 2>/dev/null || python3 -m pip install --no-deps --no-build-isolation -e . -q

for stage in "$@"; do
  case "$stage" in
    check)
      timeout 240 python3 -m pytest -q -m gpu -p no:warnings -x \
        tests/test_gpu.py tests/test_kernel_flash_block_sparse.py tests/test_kernel_decode.py \
        tests/test_kernel_lastq_score.py tests/test_kernel_pooled_score.py tests/test_kernel_proxy_score.py \
        tests/test_kernel_block_topk.py tests/test_kernel_antidiag_score.py tests/test_kernel_vertical_slash.py \
        $(ls tests/test_kernel_antidiag_onepass.py 2>/dev/null) 2>&1 | tail -15 ;;
    kernels)
      timeout 200 python3 scripts/bench_block_sparse.py --no-tune --out "$OUT/bench_block_sparse" | tail -25
      timeout 150 python3 scripts/bench_estimation.py --no-tune --contexts 32768 131072 \
        --out "$OUT/bench_estimation" | tail -40 ;;
    prefill)
      timeout 240 python3 scripts/bench_prefill.py --out "$OUT/bench_prefill" | tail -22 ;;
    e2e)
      timeout 420 python3 scripts/bench_e2e.py --model llama8b --contexts 131072 --decode 16 \
        --runs sdpa flash_attention_4 flexprefill xattention proxy quest duo lserve tidal xattention+quest \
        vertical_slash --out "$OUT/bench_e2e_llama8b" | tail -25
      timeout 150 python3 scripts/bench_e2e.py --model gemma3 --contexts 32768 --decode 16 \
        --runs sdpa flash_attention_4 flexprefill xattention proxy vertical_slash quest duo lserve tidal \
        --out "$OUT/bench_e2e_gemma3" | tail -20 ;;
    *) echo "unknown stage $stage (check, kernels, prefill, e2e)"; exit 2 ;;
  esac
done
