#!/usr/bin/env bash
# The GPU benchmark suite behind results/ (H100 or H200 image: python3, torch, triton, transformers preinstalled).
#
#   bash scripts/gpu_suite.sh check            # GPU-only tests of the kernels and patched models
#   bash scripts/gpu_suite.sh block_sparse     # block-sparse kernel vs Flex / FA4 / dense
#   bash scripts/gpu_suite.sh vertical_slash   # vertical-slash kernel vs its equivalent block layout
#   bash scripts/gpu_suite.sh estimation       # estimation kernels as a share of the sparse attention they feed
#   bash scripts/gpu_suite.sh prefill          # attention stage of every prefill policy vs dense
#   bash scripts/gpu_suite.sh e2e_llama8b e2e_gemma3   # whole models: TTFT / decode / memory vs transformers dense
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
      timeout 90 python3 -m pytest -q -m gpu -p no:warnings \
        tests/test_gpu.py tests/test_kernel_antidiag_onepass.py tests/test_kernel_vertical_slash.py \
        tests/test_kernel_lastq_score.py tests/test_kernel_pooled_score.py tests/test_kernel_proxy_score.py \
        tests/test_kernel_block_topk.py tests/test_kernel_decode.py 2>&1 | tail -15 ;;
    block_sparse)  # the full kernel table (block shares 3/10/30%, Flex, FA4, dense) and the Triton tile sweep
      timeout 300 python3 scripts/bench_block_sparse.py --out "$OUT/bench_block_sparse" | tail -25 ;;
    vertical_slash)  # the vertical-slash kernel vs its equivalent block layout (Triton only)
      timeout 120 python3 scripts/bench_block_sparse.py --keep 0.1 --baselines triton --no-tune --skip-check \
        --out "$OUT/bench_vertical_slash" | tail -8 ;;
    estimation)
      timeout 150 python3 scripts/bench_estimation.py --no-tune --contexts 32768 131072 \
        --out "$OUT/bench_estimation" | tail -40 ;;
    prefill)
      timeout 240 python3 scripts/bench_prefill.py --out "$OUT/bench_prefill" | tail -22 ;;
    e2e_gemma3)
      timeout 150 python3 scripts/bench_e2e.py --model gemma3 --contexts 32768 --decode 16 \
        --runs sdpa flash_attention_4 flexprefill xattention proxy vertical_slash quest duo lserve tidal \
        --out "$OUT/bench_e2e_gemma3" | tail -16 ;;
    e2e_llama8b)
      timeout 420 python3 scripts/bench_e2e.py --model llama8b --contexts 32768 131072 --decode 16 \
        --runs sdpa flash_attention_4 flexprefill xattention proxy xattention+quest quest duo lserve tidal \
        vertical_slash --out "$OUT/bench_e2e_llama8b" | tail -28 ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
