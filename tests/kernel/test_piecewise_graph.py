"""Steps with a prefill, run as pieces between the attention calls: the eager forward's hidden
states and K/V writes. On a GPU the pieces replay CUDA graphs; elsewhere the same pieces run
eagerly on the same static buffers (everything but the capture)."""
from __future__ import annotations

import pytest
import torch
from kernel_inputs import DEVICE, ON_GPU, random_block_tables

from workers.engine.attention import AttentionMetadata
from workers.engine.distributed import ParallelContext
from workers.engine.model import CausalLM, ModelConfig
from workers.engine.piecewise_graph import PiecewiseGraphRunner, held_bytes, token_buckets
from workers.engine.triton_backend import TritonBackend

BLOCK_SIZE, NUM_BLOCKS, MAX_MODEL_LEN = 16, 64, 256
DTYPE = torch.bfloat16 if ON_GPU else torch.float32


def tiny_llama() -> ModelConfig:
    return ModelConfig(model_type="llama", vocab_size=100, hidden_size=128, intermediate_size=256,
                       num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32, rms_norm_eps=1e-5,
                       rope_theta=1e4, rope_scaling=None, max_position_embeddings=MAX_MODEL_LEN,
                       tie_word_embeddings=False, qkv_bias=False, sliding_window=None)


def models(stages: int) -> list[CausalLM]:
    """The whole model, then its pipeline stages holding the same weights."""
    cfg, backend = tiny_llama(), TritonBackend()
    with torch.device(DEVICE):
        whole = CausalLM(cfg, backend)
        parts = [CausalLM(cfg, backend, ParallelContext(1, stages, rank))
                 for rank in range(stages)] if stages > 1 else []
    for part in parts:
        part.load_state_dict({k: v for k, v in whole.state_dict().items()
                              if k in part.state_dict()})
    for model in (whole, *parts):
        model.to(DTYPE).eval()
        model.rope_cache = model.rope_cache.float()
    return [whole, *parts]


def mixed_batch(query_lens: list[int], seq_lens: list[int]):
    """Sequences with `query_lens` new tokens at the end of `seq_lens` tokens of context."""
    tables = random_block_tables(seq_lens, BLOCK_SIZE, NUM_BLOCKS)
    positions = [p for q, s in zip(query_lens, seq_lens) for p in range(s - q, s)]
    rows = [i for i, q in enumerate(query_lens) for _ in range(q)]
    slots = [tables[i, p // BLOCK_SIZE].item() * BLOCK_SIZE + p % BLOCK_SIZE
             for i, p in zip(rows, positions)]
    starts = [0]
    for q in query_lens:
        starts.append(starts[-1] + q)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, device=DEVICE),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE), block_tables=tables,
        query_start_loc_cpu=starts, query_lens_cpu=query_lens, seq_lens_cpu=seq_lens,
        max_query_len=max(query_lens), max_seq_len=max(seq_lens))
    input_ids = torch.randint(0, 100, (len(positions),), device=DEVICE)
    return input_ids, torch.tensor(positions, device=DEVICE), meta


def kv_caches(layers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    cfg = tiny_llama()
    shape = (NUM_BLOCKS, BLOCK_SIZE, cfg.num_kv_heads, cfg.head_dim)
    return [(torch.randn(shape, dtype=DTYPE, device=DEVICE),
             torch.randn(shape, dtype=DTYPE, device=DEVICE)) for _ in range(layers)]


# a prefill chunk among decodes (11 -> 16), prompts alone (40 -> 64), a 16-token bucket filled
# exactly, then a small step after a big one
STEPS = [([5, 1, 1, 4], [30, 17, 60, 4]), ([24, 16], [24, 50]), ([15, 1], [15, 33]),
         ([2, 1], [9, 80])]
TOLERANCE = {"atol": 3e-2, "rtol": 3e-2} if ON_GPU else {"atol": 1e-5, "rtol": 1e-5}


def check_steps(eager, run, caches) -> None:
    for query_lens, seq_lens in STEPS:
        input_ids, positions, meta = mixed_batch(query_lens, seq_lens)
        eager_caches = [(k.clone(), v.clone()) for k, v in caches]
        expected = eager(input_ids, positions, eager_caches, meta)
        got = run(input_ids, positions, meta)
        assert isinstance(got, torch.Tensor) and got.shape == expected.shape
        torch.testing.assert_close(got, expected, **TOLERANCE)
        for (k, v), (k_ref, v_ref) in zip(caches, eager_caches):
            torch.testing.assert_close(k, k_ref, **TOLERANCE)
            torch.testing.assert_close(v, v_ref, **TOLERANCE)


def test_buckets_end_at_the_token_budget():
    assert token_buckets(2048) == [16, 32, 64, 128, 256, 384, 512]
    assert token_buckets(100) == [16, 32, 64, 100]
    assert token_buckets(512)[-1] == 512 and token_buckets(8)[-1] == 8


def test_pieces_give_the_eager_forward():
    whole, = models(1)
    caches = kv_caches(4)
    runner = PiecewiseGraphRunner(whole, caches, 64, DEVICE, DTYPE, graphs=ON_GPU)
    untouched = [(k.clone(), v.clone()) for k, v in caches]
    with torch.inference_mode():
        runner.capture()
        # capture writes no KV slot: padded tokens use slot -1
        assert all(torch.equal(a, b) for pair, ref in zip(caches, untouched)
                   for a, b in zip(pair, ref))
        check_steps(whole, runner.run, caches)
        assert runner.replays == len(STEPS)
        decode = mixed_batch([1, 1], [5, 9])[2]
        too_long = mixed_batch([65], [65])[2]
        assert not runner.can_run(decode) and not runner.can_run(too_long)


def test_pipeline_stages_run_as_pieces_from_what_they_receive():
    whole, first, last = models(2)
    caches = kv_caches(4)
    hidden = (tiny_llama().hidden_size, DTYPE)
    runners = [PiecewiseGraphRunner(first, caches[:2], 64, DEVICE, DTYPE, graphs=ON_GPU),
               PiecewiseGraphRunner(last, caches[2:], 64, DEVICE, DTYPE, graphs=ON_GPU,
                                    stage_input=hidden)]

    def through_both_stages(input_ids, positions, meta):
        intermediate = runners[0].run(input_ids, positions, meta)
        assert isinstance(intermediate, tuple) and len(intermediate) == 2
        return runners[1].run(input_ids, positions, meta, intermediate)

    with torch.inference_mode():
        for runner in runners:
            runner.capture()
        check_steps(whole, through_both_stages, caches)


def test_staging_pads_slots_and_checks_the_stage_inputs():
    whole, = models(1)
    runner = PiecewiseGraphRunner(whole, kv_caches(4), 64, DEVICE, DTYPE, graphs=False)
    for query_lens, seq_lens in ([[20, 1], [20, 7]], [[5, 1, 1], [5, 9, 3]]):
        input_ids, positions, meta = mixed_batch(query_lens, seq_lens)
        size = runner.stage(input_ids, positions, meta)
    assert size == 16
    assert runner.inputs.slot_mapping[:16].tolist() == meta.slot_mapping.tolist() + [-1] * 9
    assert runner.inputs.input_ids[:7].tolist() == input_ids.tolist()
    with pytest.raises(ValueError, match="previous stage"):
        runner.stage(input_ids, positions, meta, (torch.zeros(7, 128),) * 2)
    with pytest.raises(ValueError, match="no piecewise bucket"):
        runner.bucket(65)


def test_held_bytes_are_every_layers_queries_and_residual():
    whole, = models(1)
    assert held_bytes(whole, 512, torch.bfloat16) == 4 * 512 * (4 * 32 + 128) * 2


def test_off_without_a_gpu_unless_asked_to_run_the_pieces_eagerly():
    whole, = models(1)
    _, _, meta = mixed_batch([5, 1], [5, 9])
    assert PiecewiseGraphRunner(whole, kv_caches(4), 64, DEVICE, DTYPE).can_run(meta) == ON_GPU
    assert PiecewiseGraphRunner(whole, kv_caches(4), 64, DEVICE, DTYPE,
                                enabled=False).can_run(meta) is False
