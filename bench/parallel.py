"""What splitting a replica over ranks costs: `bench/engine.py --tp N --pp M`.

The same decode batches (1, 64 and 256 sequences, 8-token prompts) run on one rank and on
tp x pp ranks (gloo on CPU, NCCL on GPU); with PP, both with a micro-batch per stage in the
pipeline (the default) and with one step at a time. Per batch size: decode tokens/s, and the
driver's hand-off per step (flattening the plan is not counted, broadcasting it to the other
ranks is); per rank: parameter bytes. On a CPU the ranks share the same cores, so TP cannot be
faster here: the table shows what it costs.
"""
from __future__ import annotations

import multiprocessing
import os
import statistics
import time

import torch
import torch.distributed as dist

from bench.results import markdown_table, update_section
from workers.engine.config import EngineConfig
from workers.engine.distributed import init_parallel
from workers.engine.llm import LLM
from workers.engine.sampling_params import SamplingParams
from workers.engine.step_plan import StepPlan, receive_plan, send_plan
from workers.engine.worker import tcp_init_method

BATCHES = (1, 64, 256)
DECODE_STEPS = 16
CONTEXT_BLOCKS = 128  # decode plans in isolation: 2k-token contexts in blocks of 16
SENDS = 200


def decode_plan(batch: int) -> StepPlan:
    tables = [[(i * CONTEXT_BLOCKS + b) % 10000 for b in range(CONTEXT_BLOCKS)]
              for i in range(batch)]
    return StepPlan(list(range(batch)), [2047] * batch, list(range(batch)),
                    list(range(batch + 1)), [2048] * batch, tables, list(range(batch)), [])


def _receive_plans(rank: int, world: int, init_method: str) -> None:
    ctx = init_parallel(world, 1, rank, init_method, torch.device("cpu"))
    while receive_plan(ctx) is not None:
        pass
    dist.destroy_process_group()


def handoff_alone(world: int) -> dict[int, float]:
    """Median ms for the driver to send one decode plan to idle ranks, by batch size."""
    init_method = tcp_init_method()
    spawn = multiprocessing.get_context("spawn")
    procs = [spawn.Process(target=_receive_plans, args=(r, world, init_method), daemon=True)
             for r in range(1, world)]
    for p in procs:
        p.start()
    ctx = init_parallel(world, 1, 0, init_method, torch.device("cpu"))
    medians = {}
    for batch in BATCHES:
        plan, times = decode_plan(batch), []
        for _ in range(SENDS):
            start = time.perf_counter()
            send_plan(plan, ctx)
            times.append(time.perf_counter() - start)
        medians[batch] = statistics.median(times) * 1e3
    send_plan(None, ctx)
    dist.destroy_process_group()
    for p in procs:
        p.join()
    return medians


def run_batches(model: str, tp: int, pp: int, device: str,
                micro_batches: int | None = None) -> dict:
    # one matmul thread per rank: with more threads than free cores, every OpenMP barrier
    # waits on a preempted thread, which would measure the machine's load, not the split
    llm = LLM(EngineConfig(model=model, device=device, tensor_parallel_size=tp,
                           pipeline_parallel_size=pp, pipeline_batches=micro_batches,
                           max_num_seqs=max(BATCHES),
                           max_num_batched_tokens=4096,
                           num_kv_blocks=max(BATCHES) * 4 + 16, block_size=16,
                           num_threads=1))
    engine = llm.engine
    rows = {}
    try:
        for batch in BATCHES:
            params = SamplingParams(temperature=0, max_tokens=DECODE_STEPS + 1, ignore_eos=True)
            for i in range(batch):
                prompt = [(7 * i + j) % (engine.vocab_size - 3) + 3 for j in range(8)]
                engine.add_request(f"b{batch}-{i}", prompt, params)
            started: set[str] = set()
            while len(started) < batch:  # prefill (and the first token) of every sequence
                started.update(o.request_id for o in engine.step())
            handoff, tokens, start = [], 0, time.perf_counter()
            while engine.has_unfinished():
                tokens += len(engine.step())
                handoff.append(engine.runner.last_handoff_time)
            elapsed = time.perf_counter() - start
            rows[batch] = {"tok_s": tokens / elapsed,
                           "handoff_ms": statistics.median(handoff) * 1e3,
                           "step_ms": elapsed / len(handoff) * 1e3}
        return {"rows": rows, "weights": engine.runner.rank_weight_bytes}
    finally:
        llm.close()


def bench_parallel(model: str, tp: int, pp: int, device: str) -> str:
    alone = handoff_alone(tp * pp)
    single = run_batches(model, 1, 1, device)
    split = run_batches(model, tp, pp, device)
    serial = run_batches(model, tp, pp, device, micro_batches=1) if pp > 1 else None
    rows = []
    for batch in BATCHES:
        one, many = single["rows"][batch], split["rows"][batch]
        rows.append([batch, f"{one['tok_s']:.1f}", f"{many['tok_s']:.1f}"]
                    + ([f"{serial['rows'][batch]['tok_s']:.1f}"] if serial else [])
                    + [f"{one['step_ms']:.1f}", f"{many['step_ms']:.1f}",
                       f"{many['handoff_ms']:.3f}", f"{alone[batch]:.3f}"])
    split_name = f"TP={tp} PP={pp}" + (f", {pp} micro-batches" if serial else "")
    table = markdown_table(["decode batch", "tok/s 1 rank", f"tok/s {split_name}"]
                           + ([f"tok/s TP={tp} PP={pp}, one step at a time"] if serial else [])
                           + ["ms/step 1 rank", f"ms/step {split_name}",
                              "hand-off ms/step in the run", "hand-off ms, idle ranks"], rows)
    mib = [f"{b / 2**20:.1f}" for b in split["weights"]]
    notes = (f"\n\nModel `{os.path.basename(os.path.normpath(model))}` on {device}, "
             f"{os.cpu_count()} cores shared by every rank, one thread per rank (load average "
             f"{os.getloadavg()[0]:.1f} at the end), 8-token prompts, "
             f"{DECODE_STEPS} greedy decode steps measured per batch.\n\n"
             f"- parameter MiB per rank: 1 rank {single['weights'][0] / 2**20:.1f}; "
             f"TP={tp} PP={pp}: {', '.join(mib)}\n"
             + ("- with micro-batches a step launches one micro-batch and reads another's "
                "tokens: ms/step is per micro-batch\n" if serial else "")
             + "- hand-off: the driver's broadcast of the step plan (header + one int64 payload) "
             "over the gloo group, median per step; in the run it includes waiting for ranks "
             f"still finishing the previous step; alone: decode plans with {CONTEXT_BLOCKS}-block "
             f"tables sent {SENDS} times to ranks that only receive\n")
    section = f"Tensor/pipeline parallel ({device}, TP={tp} PP={pp})"
    print(f"## {section}\n\n{table}{notes}")
    update_section(section, table + notes)
    return table + notes
