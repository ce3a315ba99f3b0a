"""KV cache sizing: the arithmetic of gpu_memory_utilization, what the config fixes, and the
profile step that measures a step's activations (run here on the CPU)."""
from __future__ import annotations

import pytest
import torch

from workers.engine.config import CPU_KV_CACHE_GB, EngineConfig
from workers.engine.kv_memory import (
    GRAPH_SLACK_BYTES,
    DeviceMemory,
    blocks_for_bytes,
    configured_blocks,
    graph_reserve_bytes,
    kv_cache_bytes,
    profile_plan,
)
from workers.engine.model_runner import ModelRunner

GiB = 2**30


def test_budget_is_the_share_of_total_less_what_is_held():
    # an H200 with an 8B model in bf16: 16 GiB of weights plus 1 GiB of context in use
    memory = DeviceMemory(total=140 * GiB, free=123 * GiB, peak_activation=3 * GiB)
    got = kv_cache_bytes(memory, 0.9, graph_reserve=1 * GiB)
    assert got == int(0.9 * 140 * GiB) - 17 * GiB - 3 * GiB - 1 * GiB
    assert kv_cache_bytes(memory, 1.0, 0) == 120 * GiB  # capped by what is free


def test_budget_counts_other_processes_and_never_goes_negative():
    alone = DeviceMemory(total=80 * GiB, free=60 * GiB, peak_activation=2 * GiB)
    shared = DeviceMemory(total=80 * GiB, free=30 * GiB, peak_activation=2 * GiB)
    assert kv_cache_bytes(shared, 0.9, 0) == kv_cache_bytes(alone, 0.9, 0) - 30 * GiB
    assert kv_cache_bytes(DeviceMemory(80 * GiB, 10 * GiB, GiB), 0.5, 0) == 0


def test_graph_reserve_scales_with_the_largest_bucket():
    assert graph_reserve_bytes(4 * GiB, 8192, 256, cuda_graphs=False) == 0
    assert graph_reserve_bytes(4 * GiB, 8192, 256, True) == GiB // 8 + GRAPH_SLACK_BYTES
    assert graph_reserve_bytes(GiB, 64, 256, True) == GiB + GRAPH_SLACK_BYTES
    # mixed steps' piecewise graphs: a second pool, and the outputs each stretch keeps
    assert graph_reserve_bytes(4 * GiB, 8192, 256, True, 512, 3 * GiB) == \
        GiB // 8 + GiB // 4 + 3 * GiB + GRAPH_SLACK_BYTES


def test_blocks_for_bytes_rounds_down():
    assert blocks_for_bytes(10 * 2**20, 2**20) == 10
    assert blocks_for_bytes(10 * 2**20 - 1, 2**20) == 9


def test_configured_blocks(model_dir):
    block = 2**20
    assert configured_blocks(EngineConfig(model=model_dir, num_kv_blocks=7), block, True) == 7
    sized = EngineConfig(model=model_dir, kv_cache_memory_gb=0.5)
    assert configured_blocks(sized, block, on_cuda=True) == 512
    default = EngineConfig(model=model_dir)
    assert configured_blocks(default, block, on_cuda=True) is None  # sized from free memory
    assert configured_blocks(default, block, on_cuda=False) == CPU_KV_CACHE_GB * 1024


def test_profile_plan_is_the_largest_step():
    plan, blocks = profile_plan(num_tokens=100, num_seqs=8, max_model_len=64, block_size=4)
    assert plan.num_tokens == 100 and plan.query_lens == [13] * 4 + [12] * 4
    assert plan.sample_rows == [s - 1 for s in plan.query_start_loc[1:]]
    assert len(set(plan.slot_mapping)) == 100 and max(plan.slot_mapping) < blocks * 4
    assert blocks == 4 * 4 + 4 * 3
    # one sequence cannot pass max_model_len
    plan, _ = profile_plan(num_tokens=100, num_seqs=1, max_model_len=64, block_size=4)
    assert plan.query_lens == [64]


def test_profile_step_runs_on_a_runner(model_dir):
    """The profile step is a valid batch: every rank's model runs it like any other step."""
    config = EngineConfig(model=model_dir, max_model_len=256, num_kv_blocks=64, max_num_seqs=4,
                          max_num_batched_tokens=96, dtype="float32", block_size=16)
    runner = ModelRunner(config)
    plan, blocks = profile_plan(96, 4, config.context_len, config.block_size)
    assert blocks <= config.num_kv_blocks
    logits = runner.run(plan)
    assert logits.sample.shape == (4, runner.model_config.vocab_size)
    assert torch.isfinite(logits.sample).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="sizing from free memory is CUDA's")
def test_cuda_sizes_from_free_memory(model_dir):
    config = EngineConfig(model=model_dir, gpu_memory_utilization=0.3, max_num_seqs=8)
    runner = ModelRunner(config)
    free, total = torch.cuda.mem_get_info()
    assert runner.num_blocks > 0
    # the engine holds at most its share, and stays near it
    held = total - free
    assert held <= 0.3 * total + GiB and held >= 0.2 * total
