"""Write an HF-format Llama folder with random weights, for throughput benchmarks of big shapes.

Speed does not depend on weight values when EOS is ignored, so a random 1B or 8B model
measures what a real one would without shipping its weights.
"""
from __future__ import annotations

import argparse
import os
import shutil

import torch

SHAPES = {
    # two small layers, for checking benchmark scripts on a CPU
    "tiny": {"pagoda_random_like": "a tiny Llama", "hidden_size": 128, "intermediate_size": 256,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
    # Llama-3.2-1B and Llama-3.1-8B layer shapes; the vocabulary follows the tokenizer
    "llama-1b": {"pagoda_random_like": "Llama-3.2-1B", "hidden_size": 2048,
                 "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
                 "num_key_value_heads": 8},
    "llama-8b": {"pagoda_random_like": "Llama-3.1-8B", "hidden_size": 4096,
                 "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                 "num_key_value_heads": 8},
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-1b")
    parser.add_argument("--tokenizer", default="models/smollm2-135m-instruct")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    vocab = len(AutoTokenizer.from_pretrained(args.tokenizer))
    config = LlamaConfig(vocab_size=vocab, max_position_embeddings=4096, rope_theta=500000.0,
                         bos_token_id=1, eos_token_id=2, **SHAPES[args.shape])
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(args.out)
    for name in TOKENIZER_FILES:
        src = os.path.join(args.tokenizer, name)
        if os.path.exists(src):
            shutil.copy(src, args.out)
    print(f"wrote {args.out} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params)")


if __name__ == "__main__":
    main()
