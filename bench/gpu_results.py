"""Writes the GPU engine sections of bench/RESULTS.md from a GPU check's results folder.

    python bench/gpu_results.py /work/.device/N    # the folder bench/gpu_check.py wrote ($OUT)

Each shape gets one table: overlapped steps (the default on CUDA), plain steps, and FP8
weights with overlapped steps, all from the same run of the check; where the check profiled
it, where a steady decode step's device time goes (bf16 and FP8 weights); and the FP8 matmuls
the engine timed at load to pick one per weight shape.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from datetime import date

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.gpu_check import stage_results
from bench.results import markdown_table, update_section
from bench.roofline import COLUMNS_NOTE

LIKE = {"1b": "Llama-3.2-1B", "8b": "Llama-3.1-8B"}
VARIANTS = [("none", "overlapped steps"), ("none_sync", "plain steps"),
            ("fp8", "overlapped steps"), ("fp8_kv8", "overlapped steps")]


def machine(folder: str) -> str:
    """'NVIDIA H200, torch 2.11.0+cu130, <date>' from the check's info stage."""
    with open(os.path.join(folder, "summary.md")) as f:
        found = re.search(r"^torch (\S+) triton \S+ cuda True (.+)$", f.read(), re.MULTILINE)
    if not found:
        sys.exit(f"{folder}/summary.md has no GPU info stage")
    when = date.fromtimestamp(os.path.getmtime(os.path.join(folder, "summary.md")))
    return f"{found.group(2)}, torch {found.group(1)}, {when.isoformat()}"


def results(folder: str) -> dict:
    """The check's results.json, or (older checks) one JSON file per stage."""
    path = os.path.join(folder, "results.json")
    if not os.path.exists(path):
        return stage_results(folder)
    with open(path) as f:
        return json.load(f)


def section(found_by_stage: dict, tag: str) -> str | None:
    rows, limits = [], []
    for suffix, steps in VARIANTS:
        found = found_by_stage.get(f"engine_{tag}_{suffix}")
        if not found:
            continue
        (key, r), = found.items()
        dtype, quantization = key.split("/")
        kv = ", fp8 KV" if r.get("kv_cache_dtype") == "fp8" else ""
        rows.append([f"Pagoda engine ({r['backend']} attention), {steps}", dtype,
                     quantization + kv,
                     f"{r['tok_s']:.0f}", f"{r['roofline_tok_s']:.0f}", f"{r['of_roofline']:.0%}",
                     f"{r['device_idle']:.1%}", f"{r['outside_forward']:.1%}", r["preemptions"],
                     f"{r['graph_steps']}/{r['decode_steps']}", r.get("piecewise_steps", ""),
                     r["num_kv_blocks"]])
        limits.append(f"{quantization}{kv}, {steps}: matmul peak {r['peak'] / 1e12:.0f} "
                      f"TFLOP/s, copy bandwidth {r['bandwidth'] / 1e12:.2f} TB/s")
    if not rows:
        return None
    table = markdown_table(["system", "dtype", "weights", "output tok/s", "roofline tok/s",
                            "of roofline", "device idle", "outside forward", "preemptions",
                            "decode steps in CUDA graphs", "mixed steps in piecewise graphs",
                            "KV blocks"], rows)
    return (f"{table}\n\n64 requests, prompts of 16-512 tokens, 128 output tokens each (EOS "
            f"ignored), greedy, after a warm-up pass. Random weights with the layer shapes of "
            f"{LIKE[tag]} (`bench/random_model.py`); with EOS ignored, speed does not depend on "
            f"weight values. {COLUMNS_NOTE} Limits measured in the same process: "
            f"{'; '.join(limits)}. Written by `bench/gpu_results.py` from `bench/gpu_check.sh`.\n")


def profile_section(found_by_stage: dict, tag: str, top: int = 12) -> str | None:
    """The kernels of a steady decode step, by device time, for each weight format profiled."""
    parts = []
    for suffix, weights in (("", "bf16"), ("_fp8", "fp8")):
        r = found_by_stage.get(f"profile_{tag}{suffix}")
        if not r:
            continue
        parts.append(
            f"**{weights} weights**, batch {r['batch']} x context {r['context']}: "
            f"{r['graph_step_ms']:.3f} ms per step replayed from CUDA graphs, "
            f"{r['eager_step_ms']:.3f} ms eager; {r['launches_per_step']:.0f} kernel launches "
            f"and {r['profiled_us_per_step'] / 1e3:.3f} ms of kernel time per eager step.\n\n"
            + markdown_table(["kernel", "calls/step", "us/step", "share"], [
                [k["name"].replace("|", "/"), f"{k['calls_per_step']:.1f}",
                 f"{k['us_per_step']:.1f}", f"{k['share']:.1%}"] for k in r["kernels"][:top]]))
    if not parts:
        return None
    return "\n\n".join(parts) + (f"\n\nRandom weights with the layer shapes of {LIKE[tag]}; "
                                  "`bench/gpu_profile.py` (torch.profiler over eager steps), "
                                  "written by `bench/gpu_results.py`.\n")


def fp8_matmul_section(found_by_stage: dict, tag: str) -> str | None:
    """Each FP8 matmul's device time per call, as the engine measured them at load to pick one
    per weight shape and row class (`workers/engine/fp8_matmul_choice.py`)."""
    found = found_by_stage.get(f"engine_{tag}_fp8")
    choices = next(iter(found.values())).get("fp8_matmuls") if found else None
    if not choices:
        return None
    names = list(next(iter(choices[0]["micros"].values())))
    rows = []
    for choice in choices:
        for count, micros in choice["micros"].items():
            rows.append([f"{choice['out_features']}x{choice['in_features']} "
                         f"(x{choice['layers']})", count,
                         *("failed" if micros[n] is None else f"{micros[n]:.1f}" for n in names),
                         choice["picked"][count]])
    return (markdown_table(["weight (out x in)", "rows", *(f"{n} (us)" for n in names),
                            "picked"], rows)
            + f"\n\nRandom weights with the layer shapes of {LIKE[tag]}, E4M3. Device time per "
            "call, replayed from a CUDA graph that walks every layer of the shape in turn; "
            "`scaled_mm` is `torch._scaled_mm` with row-wise scales, `cublas` its tensor-wise "
            "matmul with unit scales then scaled, `triton_NxK` `kernels/fp8_matmul.py` with "
            "tiles N outputs wide and K deep. Written by `bench/gpu_results.py`.\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folder")
    folder = parser.parse_args().folder
    stamp, found_by_stage = machine(folder), results(folder)
    for tag in LIKE:
        body = section(found_by_stage, tag)
        if body:
            update_section(f"Engine (cuda, llama-{tag}-random)", body, stamp)
            print(body)
        body = profile_section(found_by_stage, tag)
        if body:
            update_section(f"Decode step kernels (cuda, llama-{tag}-random)", body, stamp)
            print(body)
        body = fp8_matmul_section(found_by_stage, tag)
        if body:
            update_section(f"FP8 matmuls (cuda, llama-{tag}-random)", body, stamp)
            print(body)


if __name__ == "__main__":
    main()
