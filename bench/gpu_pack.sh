#!/usr/bin/env bash
# Packs what bench/gpu_check.sh needs on a GPU machine that reaches no registry, in two parts
# under .gpu/ (git-ignored), each within the 64 MiB a call may carry:
#   .gpu/part1: the first half of SmolLM2's GGUF file
#   .gpu/part2: its second half, the `gguf` wheel transformers reads it with, the tokenizer
# Then two calls, the second right after the first (the machine stays warm 30 s):
#   1. carry .gpu/part1:  mkdir -p /root/pagoda-gpu && cp .gpu/part1/gguf.part* /root/pagoda-gpu/
#   2. carry .gpu/part2:  cp .gpu/part2/gguf.part* /root/pagoda-gpu/ && bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> "$(git rev-parse --git-path info/exclude)"
gguf=$(.venv/bin/python -c "import sys; sys.path.insert(0, 'tools'); import prepare_model; print(prepare_model.gguf_path())")
rm -rf .gpu && mkdir -p .gpu/part1 .gpu/part2/tokenizer
half=$(( ($(stat -c %s "$gguf") + 1) / 2 ))
split -b "$half" -d -a 1 "$gguf" .gpu/gguf.part
mv .gpu/gguf.part0 .gpu/part1/ && mv .gpu/gguf.part1 .gpu/part2/
cp models/smollm2-135m-instruct/{tokenizer.json,tokenizer_config.json,chat_template.jinja} \
   .gpu/part2/tokenizer/
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: -d .gpu/part2 \
    "gguf==$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("gguf"))')"
du -sh .gpu/part1 .gpu/part2
