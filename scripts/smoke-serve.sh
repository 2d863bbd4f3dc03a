#!/usr/bin/env bash
# What a new user does: clone, `make serve`, wait for /health/ready, generate one adapter. Prints the timings.
# Usage: scripts/smoke-serve.sh [PORT] [DEADLINE_S]   (README states the budget this checks)
set -euo pipefail
port=${1:-8765}; deadline=${2:-600}
src=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
dir=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$dir"' EXIT
git clone -q "$src" "$dir/sglora"; cd "$dir/sglora"
start=$(date +%s)
make serve PORT="$port" > serve.log 2>&1 &
until curl -fs "localhost:$port/health/ready" > /dev/null; do
  sleep 2
  if (( $(date +%s) - start > deadline )); then echo "not ready after ${deadline}s"; tail -20 serve.log; exit 1; fi
done
ready=$(( $(date +%s) - start ))
t0=$(date +%s.%N)
curl -fs -X POST "localhost:$port/generate-lora" -H 'content-type: application/json' \
     -d '{"description": "a photo of a green star"}' -o adapter.safetensors -D headers.txt
t1=$(date +%s.%N)
grep -i '^x-adapter-id' headers.txt
echo "ready after ${ready}s (install + demo store + load); first /generate-lora $(echo "$t1 - $t0" | bc) s;" \
     "adapter $(stat -c %s adapter.safetensors) bytes"
