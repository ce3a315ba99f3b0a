#!/usr/bin/env bash
# Packs what bench/gpu_check.sh needs on a GPU machine that reaches no registry, in two parts
# under .gpu/ (git-ignored), each within the 64 MiB a call may carry:
#   .gpu/part1: the first half of SmolLM2's GGUF file
#   .gpu/part2: its second half
#   both: SmolLM2's tokenizer, and as wheels what the GPU image lacks: the `gguf` reader
#         transformers converts with, and pydantic (the engine's config models)
# Then two calls, the second right after the first (the machine stays warm 30 s); the first
# one's stages need no SmolLM2 and show early whether the engine runs there at all:
#   1. carry .gpu/part1:  mkdir -p /root/pagoda-gpu && cp .gpu/part1/gguf.part* /root/pagoda-gpu/ \
#                         && bash bench/gpu_check.sh --only info,random_1b,engine_1b_none,kernel_tests
#   2. carry .gpu/part2:  cp .gpu/part2/gguf.part* /root/pagoda-gpu/ \
#                         && bash bench/gpu_check.sh --skip info,engine_1b_none,kernel_tests
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> "$(git rev-parse --git-path info/exclude)"
gguf=$(.venv/bin/python -c "import sys; sys.path.insert(0, 'tools'); import prepare_model; print(prepare_model.gguf_path())")
rm -rf .gpu && mkdir -p .gpu/part1/tokenizer .gpu/part2/tokenizer
half=$(( ($(stat -c %s "$gguf") + 1) / 2 ))
split -b "$half" -d -a 1 "$gguf" .gpu/gguf.part
mv .gpu/gguf.part0 .gpu/part1/ && mv .gpu/gguf.part1 .gpu/part2/
for part in part1 part2; do  # the random models take their vocabulary from it
    cp models/smollm2-135m-instruct/{tokenizer.json,tokenizer_config.json,chat_template.jinja} \
       .gpu/$part/tokenizer/
done
# the versions installed here, built for the GPU image's Python 3.12
pins=$(.venv/bin/python -c 'import importlib.metadata as m; print(" ".join(
    f"{n}=={m.version(n)}" for n in ("gguf", "pydantic", "pydantic_core", "annotated_types",
                                     "typing_inspection", "typing_extensions")))')
# shellcheck disable=SC2086
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .gpu/wheels $pins
cp .gpu/wheels/*.whl .gpu/part1/ && mv .gpu/wheels/*.whl .gpu/part2/ && rmdir .gpu/wheels
du -sh .gpu/part1 .gpu/part2
