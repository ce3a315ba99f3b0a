"""Our Llama-family model code matches HF transformers on small random Qwen2 / Mistral / Llama-3."""
from __future__ import annotations

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from workers.engine.block_manager import BlockManager
from workers.engine.config import EngineConfig
from workers.engine.model_runner import ModelRunner
from workers.engine.sampling_params import SamplingParams
from workers.engine.scheduler import Scheduler
from workers.engine.sequence import Sequence

SMALL = {"vocab_size": 300, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}

CASES = {
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL, tie_word_embeddings=True)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**SMALL, sliding_window=None)),
    "llama3": lambda: LlamaForCausalLM(LlamaConfig(**SMALL, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64, "rope_theta": 500000.0})),
}


# On a GPU the Triton backend with CUDA-graph decode is checked too (CI has only the CPU).
BACKENDS = ["torch"] + (["triton"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_match_hf_through_prefill_and_decode(tmp_path, name, backend):
    torch.manual_seed(0)
    hf = CASES[name]().eval()
    if name == "qwen2":  # random biases so the q/k/v bias path is really exercised
        for layer in hf.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    hf.save_pretrained(tmp_path)
    runner = ModelRunner(EngineConfig(model=str(tmp_path), num_kv_blocks=32, block_size=4,
                                      max_num_batched_tokens=64, max_num_seqs=4,
                                      dtype="float32", attention_backend=backend))
    hf = hf.to(runner.device)
    bm = BlockManager(runner.num_blocks, 4)
    sched = Scheduler(bm, 4, 64)
    prompts = [torch.randint(0, 300, (n,)).tolist() for n in (11, 5, 17)]
    seqs = [Sequence(str(i), p, SamplingParams()) for i, p in enumerate(prompts)]
    for s in seqs:
        sched.add(s)
    for _ in range(3):  # one mixed prefill, then two batched decode steps
        batch = sched.schedule()
        logits = runner.execute(batch).sample
        with torch.no_grad():
            for row, s in enumerate(batch.seqs):
                ref = hf(torch.tensor([s.token_ids], device=runner.device)).logits[0, -1]
                torch.testing.assert_close(logits[row], ref, rtol=1e-4, atol=1e-4)
        for s, n in zip(batch.seqs, batch.num_new_tokens):
            s.num_computed_tokens += n
            s.token_ids.append(int(torch.randint(0, 300, ())))
