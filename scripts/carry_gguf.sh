#!/usr/bin/env bash
# Splits a demo GGUF into folders a device call may carry, for the GPU machine (no network there, 64 MiB a call,
# working tree included). Run from the project root on the CPU machine:
#
#   bash scripts/carry_gguf.sh gemma3        # or smollm2: the file from the accel cache (fetched there first if missing)
#
# It writes ignored folders .gg1 .. .ggN (listed in .git/info/exclude) and prints the device calls: each carries one
# folder and copies its part to /root/gg; the last one joins them into /root/acache/models and checks the md5. The
# calls must follow each other within the machine's idle window (30 s), as for FlashAttention-4's two halves
# (shared/gpu/README.md). Then, in that call or a later one on the same warm machine:
#   export ACCEL_CACHE=/root/acache; bash scripts/gpu_suite.sh eval_gemma3_long   (or e2e_gemma3_real)
# (the gguf package travels too: put its wheel in .whl and install it as shared/gpu/README.md shows).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
name=${1:?usage: carry_gguf.sh gemma3|smollm2}
file=$(${PYTHON:-python3} -c "from accel.models import fetch_demo_model; print(fetch_demo_model('$name', quiet=True))")

limit=$((64 * 1024 * 1024))
tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
part=$((limit - tree - 2 * 1024 * 1024))  # 2 MiB to spare for untracked files
size=$(stat -c %s "$file")
n=$(((size + part - 1) / part))
rm -rf .gg[0-9]*
tmp=$(mktemp -d)
split -b "$part" -d -a 3 "$file" "$tmp/p."
i=0
for p in "$tmp"/p.*; do
  i=$((i + 1))
  grep -qx "/.gg$i/" .git/info/exclude 2>/dev/null || echo "/.gg$i/" >> .git/info/exclude
  mkdir -p ".gg$i" && mv "$p" ".gg$i/part"
done
rmdir "$tmp"
md5=$(md5sum "$file" | cut -d' ' -f1)
base=$(basename "$file")
echo "$n parts of at most $part bytes ($size in all, md5 $md5). Device calls, one after the other:"
for i in $(seq 1 "$n"); do
  if [ "$i" -lt "$n" ]; then
    echo "  carry [\".gg$i\"]: mkdir -p /root/gg && cp .gg$i/part /root/gg/$i"
  else
    echo "  carry [\".gg$i\"]: cp .gg$i/part /root/gg/$i && mkdir -p /root/acache/models && cat \$(seq -f '/root/gg/%g' 1 $n) > /root/acache/models/$base && echo '$md5  /root/acache/models/$base' | md5sum -c"
  fi
done
