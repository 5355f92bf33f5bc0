#!/usr/bin/env bash
# The whole-run benchmarks of BENCHMARKS.md, in one call on a GPU machine:
#   bash benchmarks/run_bench.sh [OUTDIR]
# Each configuration appends its JSON lines to OUTDIR/bench.jsonl and prints its table.
set -u
out="${1:-${OUT:-/tmp}}"
. "$(dirname "$0")/gpu_env.sh"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
bench() { echo "== turbo-repl bench $*"; timeout 400 python3 -m turbo_repl.cli bench "$@" >> "$out/bench.jsonl" 2>> "$out/bench.log" || echo "FAILED ($?): $*"; tail -n 40 "$out/bench.log" | sed -n '/turbo-repl bench/,$p'; : > "$out/bench.log"; }
bench --model wan2.1-1.3b --set attention=sagesla
bench --model wan2.1-1.3b --set attention=sla --skip load --skip mp4
bench --model wan2.1-14b-720p --set attention=sagesla --repeat 2 --skip load
bench --model wan2.1-14b-720p --set attention=sagesla --set quant=int8 --text-encoder cpu --memory-cap 24 --repeat 1 --skip load --skip baseline --skip components
