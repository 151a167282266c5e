#!/usr/bin/env bash
# The committed evaluation grid (results/eval_smollm2, results/eval_gemma3): dense, streaming and xattention on the
# two demo models, on CPU (reference backend). Sized for a 2-core CPU: short lengths, 3 samples per cell, needle
# depths 0 / 0.5 / 1, 12 generated tokens (a 7-digit answer). Rerunning resumes: finished cells are read back.
set -euo pipefail
cd "$(dirname "$0")/.."
POLICIES=(--policy dense --policy streaming:sink=64,window=256 --policy xattention)
COMMON=(--tasks niah_single --samples 3 --depths 0,0.5,1 --max-new-tokens 12 --device cpu)
accel-eval --model smollm2 "${POLICIES[@]}" "${COMMON[@]}" --lengths 512,1024,2048 --out results/eval_smollm2 "$@"
accel-eval --model gemma3 "${POLICIES[@]}" "${COMMON[@]}" --lengths 512,1024 --out results/eval_gemma3 "$@"
