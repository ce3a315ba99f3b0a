#!/usr/bin/env bash
# The engine's GPU measurements in one run (bench/gpu_check.py); results under $OUT.
# On the GPU machine, after bench/gpu_pack.sh here and its first call there (see its header):
#   bash bench/gpu_check.sh [--only a,b | --skip c]   # ~6 minutes, and up to 2 per profile_* stage
# Anywhere, to check the script itself on tiny shapes:
#   OUT=/tmp/gpu-check bash bench/gpu_check.sh --dry-run
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder for the results}"
tokenizer=models/smollm2-135m-instruct
for part in .gpu/part1 .gpu/part2; do
    [ -e $part/tokenizer/tokenizer.json ] && tokenizer=$part/tokenizer
done
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ "${1:-}" = "--dry-run" ] && PY=.venv/bin/python
exec "$PY" bench/gpu_check.py --tokenizer "$tokenizer" "$@"
