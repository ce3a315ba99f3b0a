"""How many KV blocks the engine allocates.

`num_kv_blocks` wins when set, then `kv_cache_memory_gb`. Otherwise, on CUDA, as vLLM's
`gpu_memory_utilization`: the engine may hold that share of the device's total memory, and
the KV cache gets what is left of it once the weights are loaded (everything the device holds
at that point counts, other processes too), a profiled step at `max_num_batched_tokens` has
shown its peak activation memory, and room is kept for the CUDA graphs (decode and mixed
steps). Off CUDA the cache gets CPU_KV_CACHE_GB.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from workers.engine.config import CPU_KV_CACHE_GB, EngineConfig
from workers.engine.piecewise_graph import held_bytes, token_buckets
from workers.engine.step_plan import StepPlan

log = logging.getLogger("pagoda.engine")
GRAPH_SLACK_BYTES = 256 * 2**20  # cuBLAS workspaces and kernel launch state of graph capture


@dataclass(frozen=True)
class DeviceMemory:
    total: int  # bytes of the device
    free: int  # bytes free after the weights and the profiled step
    peak_activation: int  # bytes a step at max_num_batched_tokens allocated beyond its KV


def kv_cache_bytes(memory: DeviceMemory, utilization: float, graph_reserve: int) -> int:
    """Bytes the KV cache may take: utilization * total, less what the device already holds,
    a step's activations and the CUDA graphs' pool; never more than is free."""
    used = memory.total - memory.free
    budget = int(utilization * memory.total) - used - memory.peak_activation - graph_reserve
    return max(0, min(budget, memory.free - memory.peak_activation - graph_reserve))


def graph_reserve_bytes(peak_activation: int, profiled_tokens: int, max_num_seqs: int,
                        cuda_graphs: bool, piecewise_tokens: int = 0,
                        piecewise_held: int = 0) -> int:
    """Two pools, each sized by its largest bucket's share of the profiled step's
    activations: the decode graphs' (max_num_seqs tokens) and the mixed steps' piecewise
    graphs' (piecewise_tokens), which also keep every stretch's outputs (piecewise_held);
    plus fixed slack."""
    if not cuda_graphs:
        return 0

    def share(tokens: int) -> int:
        return peak_activation * min(tokens, profiled_tokens) // profiled_tokens

    return share(max_num_seqs) + share(piecewise_tokens) + piecewise_held + GRAPH_SLACK_BYTES


def blocks_for_bytes(nbytes: float, block_bytes: int) -> int:
    return int(nbytes // block_bytes)


def configured_blocks(config: EngineConfig, block_bytes: int, on_cuda: bool) -> int | None:
    """The block count the config fixes; None when it is to be sized from device memory."""
    if config.num_kv_blocks:
        return config.num_kv_blocks
    if config.kv_cache_memory_gb is None and on_cuda:
        return None
    gb = CPU_KV_CACHE_GB if config.kv_cache_memory_gb is None else config.kv_cache_memory_gb
    return max(1, blocks_for_bytes(gb * 2**30, block_bytes))


def profile_plan(num_tokens: int, num_seqs: int, max_model_len: int,
                 block_size: int) -> tuple[StepPlan, int]:
    """(plan, blocks it needs): a prefill of num_tokens split over num_seqs sequences that all
    sample, the largest step the scheduler can form, on blocks 0..blocks-1."""
    num_seqs = max(1, min(num_seqs, num_tokens))
    lengths = [min(max_model_len, num_tokens // num_seqs + (i < num_tokens % num_seqs))
               for i in range(num_seqs)]
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    starts = [0]
    tables: list[list[int]] = []
    next_block = 0
    for n in lengths:
        blocks = list(range(next_block, next_block + -(-n // block_size)))
        next_block += len(blocks)
        tables.append(blocks)
        input_ids += [0] * n
        positions += range(n)
        slots += [blocks[p // block_size] * block_size + p % block_size for p in range(n)]
        starts.append(starts[-1] + n)
    width = max(len(t) for t in tables)
    tables = [t + [0] * (width - len(t)) for t in tables]
    sample_rows = [s - 1 for s in starts[1:]]
    return StepPlan(input_ids, positions, slots, starts, lengths, tables, sample_rows,
                    []), next_block


def log_choice(num_blocks: int, block_size: int, block_bytes: int, how: str) -> None:
    log.info("KV cache: %d blocks of %d tokens (%.2f GiB, %d tokens): %s", num_blocks,
             block_size, num_blocks * block_bytes / 2**30, num_blocks * block_size, how)


def blocks_from_free_memory(runner, block_bytes: int, graphs: bool) -> tuple[int, str]:
    """(blocks, why) for a CUDA ModelRunner whose weights are loaded: profile the largest step
    on a throw-away cache, then size from what is free. Every rank of a replica runs the
    profile step together (its collectives pair up as in a real step), then all take the
    smallest block count."""
    c, dev = runner.config, runner.device
    plan, runner.num_blocks = profile_plan(c.max_num_batched_tokens, c.max_num_seqs,
                                           c.context_len, c.block_size)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    runner.kv_caches = runner._allocate_kv()
    profile_kv = torch.cuda.memory_allocated(dev) - base
    runner.run(plan)
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev) - base - profile_kv
    runner.kv_caches = []
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(dev)
    tokens = token_buckets(c.max_num_batched_tokens)[-1]
    reserve = graph_reserve_bytes(peak, plan.num_tokens, c.max_num_seqs, graphs, tokens,
                                  held_bytes(runner.model, tokens, runner.dtype))
    nbytes = kv_cache_bytes(DeviceMemory(total, free, peak), c.gpu_memory_utilization, reserve)
    blocks = blocks_for_bytes(nbytes, block_bytes)
    if runner.ctx.world_size > 1:
        least = torch.tensor([blocks])
        dist.all_reduce(least, dist.ReduceOp.MIN, group=runner.ctx.cpu_group)
        blocks = int(least.item())
    in_use = f"{(total - free) / 2**30:.1f} GiB in use of {total / 2**30:.1f} GiB"
    if blocks < 1:
        raise ValueError(f"gpu_memory_utilization {c.gpu_memory_utilization} leaves no memory "
                         f"for the KV cache ({in_use}, {peak / 2**30:.2f} GiB per step): raise "
                         "it or lower max_num_batched_tokens")
    return blocks, (f"gpu_memory_utilization {c.gpu_memory_utilization}, {in_use} after the "
                    f"weights, {peak / 2**30:.2f} GiB peak activations of a "
                    f"{plan.num_tokens}-token step, {reserve / 2**30:.2f} GiB kept for CUDA graphs")
