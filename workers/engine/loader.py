"""Load HF-format safetensors checkpoints into our model, fusing q/k/v and gate/up."""
from __future__ import annotations

import glob
import os

import torch
from safetensors import safe_open

from workers.engine.model import CausalLM

# HF name suffix -> (our name suffix, shard index within the fused tensor)
FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}
RENAMED = {"input_layernorm.weight": "input_layernorm",
           "post_attention_layernorm.weight": "post_attention_layernorm"}


def checkpoint_files(folder: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {folder}")
    return files


def target(name: str) -> tuple[str, int | None]:
    """Map an HF parameter name to (our parameter name, fused shard index or None)."""
    name = name.removeprefix("model.")
    if name == "norm.weight":
        return "norm", None
    for hf, (ours, shard) in FUSED.items():
        if f".{hf}." in name:
            return name.replace(hf, ours), shard
    for hf, ours in RENAMED.items():
        if name.endswith(hf):
            return name.removesuffix(hf) + ours, None
    return name, None


@torch.no_grad()
def load_weights(model: CausalLM, folder: str) -> None:
    params = dict(model.named_parameters())
    cfg = model.cfg
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    offsets = {"self_attn.qkv_proj": [0, q, q + kv], "mlp.gate_up_proj": [0, cfg.intermediate_size]}
    loaded = set()
    for path in checkpoint_files(folder):
        with safe_open(path, framework="pt") as f:
            for hf_name in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
                if "rotary_emb" in hf_name:
                    continue
                name, shard = target(hf_name)
                if name == "lm_head.weight" and model.lm_head is None:
                    name = "embed_tokens.weight"  # tied: either copy holds the same values
                if name not in params:
                    raise KeyError(f"unexpected weight {hf_name} in {path}")
                tensor = f.get_tensor(hf_name)
                param = params[name]
                if shard is None:
                    param.copy_(tensor)
                else:
                    fused = next(k for k in offsets if k in name)
                    start = offsets[fused][shard]
                    param[start:start + tensor.shape[0]].copy_(tensor)
                loaded.add((name, shard))
    missing = {n for n in params if not any(n == name for name, _ in loaded)}
    if missing:
        raise KeyError(f"weights missing from {folder}: {sorted(missing)[:5]}")
