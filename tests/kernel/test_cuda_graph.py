"""Decode steps replayed from CUDA graphs equal eager steps, whole or split into pipeline stages;
on CPU the runner stays off."""
from __future__ import annotations

import pytest
import torch
from kernel_inputs import DEVICE, ON_GPU, random_block_tables

from kernels.rope_cache import build_rope_cache
from workers.engine.attention import AttentionMetadata
from workers.engine.cuda_graph import CudaGraphRunner, GraphShape
from workers.engine.distributed import ParallelContext
from workers.engine.model import CausalLM, ModelConfig
from workers.engine.triton_backend import TritonBackend

BLOCK_SIZE, NUM_BLOCKS, MAX_MODEL_LEN = 16, 96, 256


class TinyDecoder(torch.nn.Module):
    """Two Llama-style layers on the Triton backend: every op a decode step runs."""

    def __init__(self, hidden: int = 128, heads: int = 4, kv_heads: int = 2, head_dim: int = 64):
        super().__init__()
        self.backend = TritonBackend()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.embed = torch.nn.Embedding(100, hidden)
        self.qkv = torch.nn.ModuleList(
            torch.nn.Linear(hidden, (heads + 2 * kv_heads) * head_dim) for _ in range(2))
        self.o = torch.nn.ModuleList(torch.nn.Linear(heads * head_dim, hidden) for _ in range(2))
        self.up = torch.nn.ModuleList(torch.nn.Linear(hidden, 512) for _ in range(2))
        self.down = torch.nn.ModuleList(torch.nn.Linear(256, hidden) for _ in range(2))
        self.norm = torch.nn.Parameter(torch.rand(5, hidden) + 0.5)
        self.register_buffer("cos_sin", build_rope_cache(head_dim, MAX_MODEL_LEN, 1e4, None))

    def forward(self, input_ids, positions, kv_caches, meta):
        x, residual = self.embed(input_ids), None
        for i, (k_cache, v_cache) in enumerate(kv_caches):
            h, residual = self.backend.rms_norm(x, self.norm[2 * i], 1e-5, residual)
            q, k, v = self.qkv[i](h).view(len(input_ids), -1, self.head_dim).split(
                [self.heads, self.kv_heads, self.kv_heads], dim=1)
            q, k = self.backend.rope(positions, q, k, self.cos_sin)
            self.backend.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
            attn = self.backend.attention(q, k_cache, v_cache, meta, self.head_dim ** -0.5)
            h, residual = self.backend.rms_norm(self.o[i](attn.flatten(1)), self.norm[2 * i + 1],
                                                1e-5, residual)
            x = self.down[i](self.backend.silu_mul(self.up[i](h)))
        return self.backend.rms_norm(x, self.norm[4], 1e-5, residual)[0]


def decode_batch(seq_lens: list[int]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    tables = random_block_tables(seq_lens, BLOCK_SIZE, NUM_BLOCKS)
    slots = [t[(n - 1) // BLOCK_SIZE] * BLOCK_SIZE + (n - 1) % BLOCK_SIZE
             for t, n in zip(tables.tolist(), seq_lens)]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, device=DEVICE),
        query_start_loc=torch.arange(len(seq_lens) + 1, dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE), block_tables=tables,
        query_start_loc_cpu=list(range(len(seq_lens) + 1)), query_lens_cpu=[1] * len(seq_lens),
        seq_lens_cpu=seq_lens, max_query_len=1, max_seq_len=max(seq_lens))
    input_ids = torch.randint(0, 100, (len(seq_lens),), device=DEVICE)
    positions = torch.tensor(seq_lens, device=DEVICE) - 1
    return input_ids, positions, meta


def test_buckets():
    assert GraphShape(20, 16, 256).buckets == [1, 2, 4, 8, 16, 20]
    assert GraphShape(3, 16, 256).buckets == [1, 2, 3]
    assert GraphShape(32, 16, 256).buckets == [1, 2, 4, 8, 16, 24, 32]


def test_every_batch_size_has_a_bucket_with_little_padding():
    shape = GraphShape(256, 16, 256)
    assert shape.buckets[:5] == [1, 2, 4, 8, 16] and shape.buckets[-1] == 256
    for n in range(1, 257):
        size = shape.bucket(n)
        assert size in shape.buckets and n <= size
        assert size - n <= (n - 1 if n <= 8 else 7)  # powers of two, then steps of 8
    for n in (0, 257):
        with pytest.raises(ValueError):
            shape.bucket(n)


def test_stage_pads_rows_to_the_bucket():
    """A batch of 3 after one of 6: rows 3..4 of the 4-row bucket read no key and write to
    the pad slot, whatever the previous batch left there."""
    runner = CudaGraphRunner(lambda *args: None, [], GraphShape(8, 16, 256), "cpu", pad_slot=-1)
    for lens in ([40, 17, 3, 60, 33, 9], [5, 70, 20]):
        input_ids, positions, meta = decode_batch(lens)
        size = runner.stage(input_ids, positions, meta)
    assert size == 4
    assert runner.inputs.input_ids[:3].tolist() == input_ids.tolist()
    assert runner.inputs.positions[:3].tolist() == positions.tolist()
    assert runner.inputs.slot_mapping[:4].tolist() == meta.slot_mapping.tolist() + [-1]
    assert runner.seq_lens[:4].tolist() == [5, 70, 20, 0]
    width = meta.block_tables.shape[1]
    assert torch.equal(runner.block_tables[:3, :width], meta.block_tables.cpu())


def test_a_later_stage_stages_the_previous_stages_hidden_states():
    runner = CudaGraphRunner(lambda *args: None, [], GraphShape(8, 16, 256), "cpu",
                             stage_input=(4, torch.float32))
    input_ids, positions, meta = decode_batch([5, 70, 20])
    hidden, residual = torch.randn(3, 4), torch.randn(3, 4)
    assert runner.stage(input_ids, positions, meta, (hidden, residual)) == 4
    assert runner.inputs.intermediate is not None
    assert torch.equal(runner.inputs.intermediate[0][:3], hidden)
    assert torch.equal(runner.inputs.intermediate[1][:3], residual)
    with pytest.raises(ValueError, match="previous stage"):
        runner.stage(input_ids, positions, meta)
    first = CudaGraphRunner(lambda *args: None, [], GraphShape(8, 16, 256), "cpu")
    with pytest.raises(ValueError, match="previous stage"):
        first.stage(input_ids, positions, meta, (hidden, residual))


def test_runner_is_disabled_on_cpu():
    runner = CudaGraphRunner(lambda *args: None, [], GraphShape(8, 16, 256), "cpu")
    runner.capture()
    _, _, meta = decode_batch([5])
    assert not runner.enabled and not runner.can_run(meta)
    with pytest.raises(ValueError):
        runner.run(torch.zeros(1), torch.zeros(1), meta)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_replay_matches_eager(dtype):
    model = TinyDecoder().to(DEVICE, dtype)
    shape = (NUM_BLOCKS, BLOCK_SIZE, model.kv_heads, model.head_dim)
    kv_caches = [(torch.randn(shape, dtype=dtype, device=DEVICE),
                  torch.randn(shape, dtype=dtype, device=DEVICE)) for _ in range(2)]
    runner = CudaGraphRunner(model, kv_caches, GraphShape(20, MAX_MODEL_LEN // BLOCK_SIZE,
                                                          MAX_MODEL_LEN), DEVICE)
    with torch.inference_mode():
        untouched = [(k.clone(), v.clone()) for k, v in kv_caches]
        runner.capture()
        # capture writes no KV slot: padded rows use slot -1
        assert all(torch.equal(a, b) for pair, ref in zip(kv_caches, untouched)
                   for a, b in zip(pair, ref))
        check_replays(model, runner.run, kv_caches)


def check_replays(eager_step, replay, kv_caches) -> None:
    """Padded buckets (3 -> 4, 17 -> 20), a full bucket, then a small batch after a big one:
    each replay gives the eager step's hidden states and writes its keys and values."""
    for n in (3, 17, 20, 1, 3):
        seq_lens = torch.randint(1, 4 * BLOCK_SIZE, (n,)).tolist()
        input_ids, positions, meta = decode_batch(seq_lens)
        eager_caches = [(k.clone(), v.clone()) for k, v in kv_caches]
        eager = eager_step(input_ids, positions, eager_caches, meta)
        replayed = replay(input_ids, positions, meta)
        assert isinstance(replayed, torch.Tensor) and replayed.shape == eager.shape
        torch.testing.assert_close(replayed, eager, atol=3e-2, rtol=3e-2)
        for (k, v), (k_ref, v_ref) in zip(kv_caches, eager_caches):
            torch.testing.assert_close(k, k_ref, atol=3e-2, rtol=3e-2)
            torch.testing.assert_close(v, v_ref, atol=3e-2, rtol=3e-2)


def tiny_llama(num_layers: int) -> ModelConfig:
    return ModelConfig(model_type="llama", vocab_size=100, hidden_size=128, intermediate_size=256,
                       num_layers=num_layers, num_heads=4, num_kv_heads=2, head_dim=32,
                       rms_norm_eps=1e-5, rope_theta=1e4, rope_scaling=None,
                       max_position_embeddings=MAX_MODEL_LEN, tie_word_embeddings=False,
                       qkv_bias=False, sliding_window=None)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_pipeline_stages_replay_what_the_whole_model_computes():
    """Two stages, each replaying its own graphs, the second from the first's (hidden,
    residual): the whole model's eager hidden states and KV writes."""
    cfg, backend, dtype = tiny_llama(4), TritonBackend(), torch.bfloat16
    torch.manual_seed(0)
    with torch.device(DEVICE):
        whole = CausalLM(cfg, backend)
        stages = [CausalLM(cfg, backend, ParallelContext(1, 2, rank)) for rank in (0, 1)]
    for stage in stages:  # each stage holds the whole model's weights of its layers
        stage.load_state_dict({k: v for k, v in whole.state_dict().items()
                               if k in stage.state_dict()})
    for model in (whole, *stages):
        model.to(dtype).eval()
        model.rope_cache = model.rope_cache.float()
    shape = (NUM_BLOCKS, BLOCK_SIZE, cfg.num_kv_heads, cfg.head_dim)
    kv_caches = [(torch.randn(shape, dtype=dtype, device=DEVICE),
                  torch.randn(shape, dtype=dtype, device=DEVICE)) for _ in range(4)]
    graph_shape = GraphShape(20, MAX_MODEL_LEN // BLOCK_SIZE, MAX_MODEL_LEN)
    first = CudaGraphRunner(stages[0], kv_caches[:2], graph_shape, DEVICE)
    last = CudaGraphRunner(stages[1], kv_caches[2:], graph_shape, DEVICE,
                           stage_input=(cfg.hidden_size, dtype))
    with torch.inference_mode():
        first.capture()
        last.capture()

        def through_both_stages(input_ids, positions, meta):
            intermediate = first.run(input_ids, positions, meta)
            assert isinstance(intermediate, tuple) and len(intermediate) == 2
            return last.run(input_ids, positions, meta, intermediate)

        check_replays(whole, through_both_stages, kv_caches)
    assert first.replays == last.replays == 5
