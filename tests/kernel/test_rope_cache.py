"""The cos/sin cache, including Llama-3 scaling, against transformers' rotary embedding."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from kernels.rope_cache import build_rope_cache, rope_inv_freq

LLAMA31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192}


def hf_config(head_dim: int, base: float, scaling: dict | None) -> LlamaConfig:
    params = {"rope_type": "default", "rope_theta": base} | (scaling or {})
    return LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                       max_position_embeddings=131072, rope_parameters=params)


def test_llama3_inv_freq_matches_transformers():
    ours = rope_inv_freq(128, 500000.0, LLAMA31)
    theirs, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](hf_config(128, 500000.0, LLAMA31),
                                                             "cpu")
    assert attention_factor == 1.0
    torch.testing.assert_close(ours, theirs, atol=0, rtol=1e-6)
    # all three bands occur: kept, blended and slowed frequencies
    plain = rope_inv_freq(128, 500000.0, None)
    ratio = plain / ours
    assert (ratio == 1).any() and (ratio == 8).any() and ((ratio > 1) & (ratio < 8)).any()


@pytest.mark.parametrize("head_dim,base,scaling", [
    (128, 500000.0, LLAMA31),
    (64, 10000.0, {"rope_type": "linear", "factor": 4.0}),
    (64, 100000.0, None),
])
def test_cache_matches_transformers_rotary_embedding(head_dim, base, scaling):
    positions = torch.tensor([[0, 1, 2, 100, 4095, 8191, 8192, 20000]])
    cache = build_rope_cache(head_dim, 20001, base, scaling)
    cos, sin = LlamaRotaryEmbedding(hf_config(head_dim, base, scaling))(
        torch.zeros(1, dtype=torch.float32), positions)
    half = head_dim // 2
    torch.testing.assert_close(cache[positions[0], :half], cos[0, :, :half], atol=1e-5, rtol=0)
    torch.testing.assert_close(cache[positions[0], half:], sin[0, :, :half], atol=1e-5, rtol=0)


def test_legacy_type_key_and_errors():
    legacy = {k: v for k, v in LLAMA31.items() if k != "rope_type"} | {"type": "llama3"}
    assert torch.equal(rope_inv_freq(64, 1e4, legacy), rope_inv_freq(64, 1e4, LLAMA31))
    with pytest.raises(ValueError, match="unsupported"):
        build_rope_cache(64, 8, 1e4, {"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="low_freq_factor"):
        build_rope_cache(64, 8, 1e4, {"rope_type": "llama3", "factor": 8.0})
