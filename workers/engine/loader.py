"""Load HF-format safetensors checkpoints into our model, fusing q/k/v and gate/up.

Every rank of a replica split over devices reads only its own slices (`safe_open(...).get_slice`)
of the tensors of its pipeline stage, so no process ever holds the whole model. Sharded
checkpoints (`model-0000x-of-0000y.safetensors` with `model.safetensors.index.json`) are read
file by file.
"""
from __future__ import annotations

import glob
import json
import os

import torch
from safetensors import safe_open

from workers.engine.model import CausalLM
from workers.engine.parallel_layers import shard_kind

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


INDEX = "model.safetensors.index.json"


def checkpoint_files(folder: str) -> list[str]:
    index = os.path.join(folder, INDEX)
    if os.path.exists(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(folder, name) for name in names]
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


def targets(model: CausalLM, hf_name: str) -> list[tuple[str, int | None]]:
    """Our parameters an HF tensor fills on this rank; empty when another stage holds it."""
    name, shard = target(hf_name)
    if name in ("lm_head.weight", "embed_tokens.weight") and model.cfg.tie_word_embeddings:
        names = [n for n in ("embed_tokens.weight", "lm_head.weight")
                 if getattr(model, n.split(".")[0]) is not None]
        return [(n, None) for n in names]
    if name.startswith("layers.") and int(name.split(".")[1]) not in model.stage:
        return []
    if name in ("norm", "embed_tokens.weight", "lm_head.weight") and \
            getattr(model, name.split(".")[0]) is None:  # on another stage
        return []
    return [(name, shard)]


def read_shard(f, hf_name: str, name: str, part: int | None, model: CausalLM) -> torch.Tensor:
    """The rows or columns of `hf_name` that this tensor rank holds."""
    kind = shard_kind(name)
    if kind is None or model.ctx.tp_size == 1:
        return f.get_tensor(hf_name)
    dim, start, end = model.cfg.layout(model.ctx).rows(kind, part)
    piece = f.get_slice(hf_name)
    return piece[start:end] if dim == 0 else piece[:, start:end]


@torch.no_grad()
def load_weights(model: CausalLM, folder: str) -> None:
    params = dict(model.named_parameters())
    shard = model.cfg.layout(model.ctx)
    q, kv = shard.heads * model.cfg.head_dim, shard.kv_heads * model.cfg.head_dim
    offsets = {"self_attn.qkv_proj": [0, q, q + kv], "mlp.gate_up_proj": [0, shard.intermediate]}
    loaded = set()
    for path in checkpoint_files(folder):
        with safe_open(path, framework="pt") as f:
            for hf_name in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
                if "rotary_emb" in hf_name:
                    continue
                for name, part in targets(model, hf_name):
                    if name not in params:
                        raise KeyError(f"unexpected weight {hf_name} in {path}")
                    tensor = read_shard(f, hf_name, name, part, model)
                    param: torch.Tensor = params[name]
                    if part is not None:
                        start = offsets[next(k for k in offsets if k in name)][part]
                        param = param[start:start + tensor.shape[0]]
                    elif shard_kind(name) == "vocab":  # the last shard may end in padding
                        param = param[:tensor.shape[0]]
                    param.copy_(tensor)
                    loaded.add(name)
    missing = set(params) - loaded
    if missing:
        raise KeyError(f"weights missing from {folder}: {sorted(missing)[:5]}")
