#!/usr/bin/env bash
# The whole-run benchmarks of BENCHMARKS.md, in one call on a GPU machine:
#   bash benchmarks/run_bench.sh OUTDIR [CONFIG ...]      (CONFIG: a number below; default: all)
# Each configuration appends its JSON lines to OUTDIR/bench.jsonl, its log to OUTDIR/bench-N.log, and prints
# its table.
set -u
out="${1:-/tmp/turbo-repl-bench}"; shift || true; mkdir -p "$out"
. "$(dirname "$0")/gpu_env.sh" 2>/dev/null
export PYTHONUNBUFFERED=1
configs=(
  "--model wan2.1-1.3b --set attention=sagesla"
  "--model wan2.1-1.3b --set attention=sla --skip load --skip mp4"
  "--model wan2.1-14b-720p --set attention=sagesla --repeat 2 --skip load"
  "--model wan2.1-14b-720p --set attention=sagesla --set quant=int8 --text-encoder cpu --memory-cap 24 --no-cuda-graphs --repeat 1 --skip load --skip baseline --skip components"
  "--model wan2.1-1.3b --set attention=sagesla --set quant=int8 --skip load --skip baseline"
  "--model wan2.1-1.3b --set attention=sagesla --set quant=fp8 --skip load"
  "--model wan2.1-14b-720p --set attention=sagesla --set quant=fp8 --repeat 2 --skip load --skip mp4"
  "--model wan2.2-a14b-i2v --set attention=sagesla --set quant=fp8 --repeat 2 --skip load --skip mp4 --skip baseline"
  "--model wan2.1-1.3b --set attention=sagesla --cold --repeat 1 --skip baseline --skip components --skip mp4"
  "--model wan2.1-14b-720p --set attention=sagesla --cold --repeat 1 --skip baseline --skip components --skip mp4"
)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
for i in "${@:-${!configs[@]}}"; do
  echo "== [$i] turbo-repl bench ${configs[$i]}"
  # shellcheck disable=SC2086
  timeout 400 python3 -m turbo_repl.cli bench ${configs[$i]} >> "$out/bench.jsonl" 2> "$out/bench-$i.log" \
    || { echo "FAILED ($?)"; tail -n 25 "$out/bench-$i.log"; continue; }
  sed -n '/turbo-repl bench/,$p' "$out/bench-$i.log"
done
