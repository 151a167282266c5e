#!/usr/bin/env bash
# The GPU benchmark suite behind results/ (H100 or H200 image: python3, torch, triton, transformers preinstalled).
#
#   bash scripts/gpu_suite.sh check            # GPU-only tests of the kernels and patched models (a quick subset)
#   bash scripts/gpu_suite.sh tests_models     # the whole GPU suite, first half (one device call each)
#   bash scripts/gpu_suite.sh tests_kernels    # the whole GPU suite, second half
#   bash scripts/gpu_suite.sh block_sparse     # block-sparse kernel vs Flex / FA4 / dense
#   bash scripts/gpu_suite.sh vertical_slash   # vertical-slash kernel vs its equivalent block layout
#   bash scripts/gpu_suite.sh estimation       # estimation kernels as a share of the sparse attention they feed
#   bash scripts/gpu_suite.sh prefill          # attention stage of every prefill policy vs dense
#   bash scripts/gpu_suite.sh e2e_llama8b e2e_gemma3   # whole models: TTFT / decode / memory vs transformers dense
#   bash scripts/gpu_suite.sh decode static_decode     # decode attention (graph + eager); whole-model static-cache
#                                                      # decode as CUDA graphs and compiled (batch 4 at 128K: H200)
#   bash scripts/gpu_suite.sh decode_floor decode_tiles  # every decode policy's step attention vs its byte floor;
#                                                      # the split-KV kernel's key tiles / stages (32-layer graphs)
#   bash scripts/gpu_suite.sh decode_splits            # split-KV waves: the selection launch swept, step floors
#   bash scripts/gpu_suite.sh quest_norm_floor         # Quest's group_reduce='max_norm' against 'max': its cost
#   bash scripts/gpu_suite.sh launch_floor             # the share of each byte floor plain reads reach at all
#   bash scripts/gpu_suite.sh select_attend            # Quest's top-k in the split launch vs its own launch
#   bash scripts/gpu_suite.sh select_attend_stamps     # select_attend's phases timed inside the kernel (b1, b4)
#   bash scripts/gpu_suite.sh tidal_floor tidal_e2e    # TidalDecode's shared selection vs one per KV head (before
#                                                      # 2026-12-04): attention vs byte floor; compiled b1 / b4 steps
#   bash scripts/gpu_suite.sh prefill_thresholds       # the prefill policies at defaults vs the settings that keep
#                                                      # mean recall >= 0.95 on the demo models (32K / 128K)
#   bash scripts/gpu_suite.sh e2e_llama8b_planted      # the same with attention structure planted in the weights
#   bash scripts/gpu_suite.sh e2e_sweep_8k_32k e2e_sweep_64k e2e_sweep_128k_prefill e2e_sweep_128k_decode
#                                                      # every policy, 8K-128K, 128 decode steps (a device call each)
#   bash scripts/gpu_suite.sh profile_128k             # torch profiler split of a patched 128K prefill
#   bash scripts/gpu_suite.sh e2e_llama70b_2gpu        # Llama-70B shape split over two GPUs (2x H200), 128K
#   bash scripts/gpu_suite.sh e2e_gemma3_real          # the same on the real Gemma-3-270M with a needle prompt
#   bash scripts/gpu_suite.sh eval_gemma3_long         # accel-eval grid on the real Gemma-3-270M, 4K to 32K
#
# The last two need the demo GGUF in $ACCEL_CACHE/models (the machine has no network: carry it, and carry the gguf
# wheel too). The Gemma-3 file (253 MB) is more than one call carries: `bash scripts/carry_gguf.sh gemma3` splits it
# into ignored folders and prints the chain of calls that joins it there (2026-12-06: 5 calls, then the whole
# eval_gemma3_long grid in 4.8 min on an H100 with EVAL_DIR=/root/eg3).
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
    tests_models)  # the whole GPU suite in two calls of under 10 minutes: the patched models and FA4 kernels,
      timeout 560 python3 -m pytest -q -m gpu -p no:warnings tests/test_gpu.py tests/test_kernel_flash_fwd.py \
        tests/test_kernel_flash_block_sparse.py tests/test_kernel_fa4_layout.py 2>&1 | tail -15 ;;
    tests_kernels)  # ... then every other GPU-marked test
      timeout 560 python3 -m pytest -q -m gpu -p no:warnings tests \
        --ignore tests/test_gpu.py --ignore tests/test_kernel_flash_fwd.py \
        --ignore tests/test_kernel_flash_block_sparse.py --ignore tests/test_kernel_fa4_layout.py 2>&1 | tail -15 ;;
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
    e2e_gemma3_real)  # real weights and a niah prompt of 32736 tokens (32768 less the decoded tokens, rounded down)
      timeout 200 python3 scripts/bench_e2e.py --model gemma3 --weights real --contexts 32736 --decode 16 \
        --runs sdpa dense flexprefill xattention proxy vertical_slash streaming quest duo lserve tidal xattention+quest \
        --out "$OUT/bench_e2e_gemma3_real" | tail -40 ;;
    eval_gemma3_long)  # dense and every policy at its defaults, niah_single/niah_multikey/vt, 3 samples, 4K-32K.
      # 32736 = 32768 (max_position_embeddings) - 32 (vt's max_new_tokens). Decode of this small model is bound by
      # kernel launches, not the GPU: one process per policy (quest, the slowest to decode, split by length) fills
      # the cells (OUT/cells, keyed by policy/task/length, so the split changes no cell), then the full command
      # reruns over the finished cells and writes eval.json / eval.md. Cells, logs and tables come back as one tar.
      # Loading the model from the GGUF takes about 2 minutes per process on the H100 machine (16 cores).
      # EVAL_DIR=/some/dir starts a fresh grid elsewhere (a cell is reused only with the same settings and tokenizer).
      D=${EVAL_DIR:-results/eval_gemma3_long}; LONG=4096,8192,16384,32736
      E=(--model gemma3 --tasks niah_single,niah_multikey,vt --samples 3 --depths 0,0.5,1)
      mkdir -p "$D/logs"
      for job in "quest 32736" "quest 4096,8192,16384" "lserve $LONG" "tidal $LONG" "duo $LONG" "dense $LONG" \
          "streaming $LONG" "vertical_slash $LONG" "xattention $LONG" "flexprefill $LONG" "proxy $LONG"; do
        read -r pol lens <<<"$job"
        OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 timeout "${EVAL_TIMEOUT:-480}" python3 -m accel.eval.cli "${E[@]}" \
          --policy "$pol" --lengths "$lens" --no-plots --out "$D" >"$D/logs/${pol}_${lens//,/-}.log" 2>&1 &
      done
      wait
      n=$(ls "$D"/cells/*.json 2>/dev/null | wc -l); echo "cells finished: $n of 120"
      if [ "$n" -ge 120 ]; then
        timeout 90 python3 -m accel.eval.cli "${E[@]}" --lengths $LONG --no-plots --out "$D" >"$D/logs/full.log" 2>&1
        tail -45 "$D/logs/full.log"
      fi
      tar czf "$OUT/eval_gemma3_long.tgz" "$D" ;;
    decode)
      timeout 150 python3 scripts/bench_decode.py --contexts 32768,131072 --batches 1,4,8 --out "$OUT" | tail -24 ;;
    decode_floor)
      timeout 580 python3 scripts/bench_decode_floor.py --batches 1 4 --out "$OUT/bench_decode_floor" | tail -20 ;;
    decode_tiles)
      timeout 300 python3 scripts/bench_decode.py --tile-sweep --batches 1,4 --out "$OUT" | tail -12
      timeout 300 python3 scripts/bench_decode.py --token-sweep --batches 1,4 --out "$OUT" | tail -10 ;;
    decode_splits)  # the split count's waves: TidalDecode's selection launch swept, then every policy's floor
      timeout 200 python3 scripts/bench_decode.py --logits-sweep --batches 1,4 --out "$OUT" | tail -8
      timeout 380 python3 scripts/bench_decode_floor.py --batches 1 4 --runs dense quest tidal duo lserve \
        --out "$OUT/bench_decode_floor_splits" | tail -14 ;;
    select_attend)  # Quest's top-k inside the split launch vs its own launch: one layer, then the step floor
      timeout 200 python3 scripts/bench_decode.py --select-attend --batches 1,4 --out "$OUT" | tail -10
      timeout 300 python3 scripts/bench_decode_floor.py --batches 1 --runs dense quest quest@twolaunch \
        --out "$OUT/bench_decode_floor_selattend_b1" | tail -8 ;;
    select_attend_stamps)  # where a Quest layer's microseconds go inside select_attend, program by program
      timeout 300 python3 scripts/bench_decode.py --stamps --batches 1,4 --out "$OUT" | tail -8 ;;
    launch_floor)  # each policy's step reads alone, one plain read kernel per dependent launch of a layer
      timeout 500 python3 scripts/bench_decode_floor.py --batches 1 --launch-floor \
        --out "$OUT/bench_decode_floor_launch_b1" | tail -12 ;;
    quest_norm_floor)  # Quest's max_norm group reduction (one more reduction over the page bounds) vs max
      timeout 500 python3 scripts/bench_decode_floor.py --batches 1 4 \
        --runs dense quest quest:group_reduce=max_norm --out "$OUT/bench_decode_floor_quest_norm" | tail -10 ;;
    tidal_floor)
      timeout 580 python3 scripts/bench_decode_floor.py --batches 1 4 \
        --runs dense tidal tidal:shared=false,group_reduce=sum --out "$OUT/bench_decode_floor_tidal_shared" | tail -10 ;;
    tidal_e2e)  # two policies compiled per batch: about 2 x 45 s of compile apiece
      for b in 1 4; do
        timeout 290 python3 scripts/bench_static_decode.py --mode compile --contexts 131072 --batches $b \
          --runs dense tidal tidal:shared=false,group_reduce=sum --steps 16 \
          --out "$OUT/bench_static_decode_compile_tidal_b$b" | tail -6
      done ;;
    prefill_thresholds)
      timeout 400 python3 scripts/bench_prefill.py --contexts 32768 131072 --policy xattention \
        --policy xattention:threshold=0.97 --policy flexprefill --policy flexprefill:gamma=0.97 --policy proxy \
        --policy proxy:gamma=0.95 --out "$OUT/bench_prefill_thresholds" | tail -16 ;;
    static_decode)
      timeout 240 python3 scripts/bench_static_decode.py --contexts 32768 131072 --batches 1 4 \
        --out "$OUT/bench_static_decode" | tail -20
      # compiled: one run per batch (each compiles every policy: about 45 s apiece)
      for b in 1 4; do
        timeout 580 python3 scripts/bench_static_decode.py --mode compile --contexts 131072 --batches $b \
          --runs dense quest tidal duo lserve lserve:reuse_steps=1 --steps 16 \
          --out "$OUT/bench_static_decode_compile_b$b" | tail -8
      done ;;
    e2e_llama8b)
      timeout 420 python3 scripts/bench_e2e.py --model llama8b --contexts 32768 131072 --decode 16 \
        --runs sdpa flash_attention_4 flexprefill xattention proxy xattention+quest quest duo lserve tidal \
        vertical_slash --out "$OUT/bench_e2e_llama8b" | tail -28 ;;
    e2e_llama8b_planted)
      timeout 420 python3 scripts/bench_e2e.py --model llama8b --attention planted --contexts 32768 131072 --decode 8 \
        --runs sdpa flash_attention_4 flex_attention xattention flexprefill proxy vertical_slash xattention+quest \
        flexprefill+lserve --out "$OUT/bench_e2e_llama8b_planted" | grep "^|" | tail -18 ;;
    e2e_sweep_8k_32k|e2e_sweep_64k|e2e_sweep_128k_prefill|e2e_sweep_128k_decode)  # every policy and composition,
      # 128 decode steps, one device call (<= 10 min) per stage; merged: results/bench_e2e_llama8b_sweep.md
      ALL="sdpa flash_attention_4 flex_attention dense xattention flexprefill proxy vertical_slash quest duo lserve tidal
           xattention+quest flexprefill+lserve"
      case "$stage" in
        e2e_sweep_8k_32k) ctx="8192 32768"; runs=$ALL ;;
        e2e_sweep_64k) ctx=65536; runs=$ALL ;;
        e2e_sweep_128k_prefill) ctx=131072; runs="sdpa flash_attention_4 flex_attention dense xattention flexprefill
                                                    proxy vertical_slash" ;;
        *) ctx=131072; runs="sdpa flash_attention_4 quest duo lserve tidal xattention+quest flexprefill+lserve" ;;
      esac
      # shellcheck disable=SC2086
      timeout 590 python3 scripts/bench_e2e.py --model llama8b --attention planted --contexts $ctx --decode 128 \
        --runs $runs --out "$OUT/bench_e2e_llama8b_sweep_${stage#e2e_sweep_}" | grep "^|" | tail -16 ;;
    profile_128k)
      timeout 170 python3 scripts/bench_e2e.py --model llama8b --attention planted --contexts 131072 --no-density \
        --profile --runs flexprefill --out "$OUT/bench_e2e_llama8b_profile" | tail -3 ;;
    e2e_llama70b_2gpu)
      timeout 560 python3 scripts/bench_e2e.py --model llama70b --gpus 2 --contexts 131072 --decode 8 \
        --runs sdpa xattention+quest --out "$OUT/bench_e2e_llama70b_2gpu" | tail -20 ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
