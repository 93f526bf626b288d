#!/usr/bin/env bash
# The one command of a device call (issue 33). Prepare here first, then call the device with
#   command: bash benchmarks/gpu_check.sh      carry: [".gpu-wheels"]      timeout_s: 600
# Everything comes back in $OUT/gpu_check (report.md, report.json, log.txt, mixgen_run.json,
# train_eval.json). Extra arguments go to `gpu_check.py run` (e.g. --budget 300).
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec python3 -m benchmarks.gpu_check run --out "${OUT:-/tmp/gpu-check-out}/gpu_check" "$@"
