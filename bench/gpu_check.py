"""The GPU measurements of the engine, as one run that fits a short lease (about 6 minutes for
the engine tables and tests; each profile stage may take up to 2 more).

    OUT=/some/dir python bench/gpu_check.py              # on the GPU machine (bench/gpu_check.sh)
    OUT=/tmp/check python bench/gpu_check.py --dry-run   # the same stages, tiny, on a CPU

Stages run in order of importance, each under its own time limit and all under one deadline;
a stage that fails or runs out of time is recorded and the next one starts. Written under $OUT:
summary.md (each stage's status, seconds and output tail), logs.txt (every stage's whole
output) and results.json: each stage's JSON by stage name (engine_{1b,8b}_{none,fp8} and
engine_*_none_sync: bench/engine.py, _sync without overlapped steps; profile_{1b,8b}[_fp8]:
bench/gpu_profile.py; triton_bf16), one file since a lease returns at most 8.

The real SmolLM2 comes from the model folder given (`--smollm2`) or, failing that, is converted
from its GGUF file reassembled from parts (`--gguf-parts`, see bench/gpu_pack.sh); without it
the stages that need it are skipped. The random 1B/8B models need only its tokenizer.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Stage:
    name: str
    command: list[str]
    limit_s: int
    needs_smollm2: bool = False


def stages(args, work: str, out: str, smollm2: str) -> list[Stage]:
    py = sys.executable
    dry = args.dry_run
    shapes = ["tiny"] if dry else ["llama-1b", "llama-8b"]
    engine = ["--no-hf", "--no-results"]
    engine += ["--requests", "4", "--max-tokens", "8", "--dtypes", "float32"] if dry else []
    info = Stage("info", [py, "-c", "import torch, triton; print('torch', torch.__version__, "
                          "'triton', triton.__version__, 'cuda', torch.cuda.is_available(), "
                          "torch.cuda.get_device_name(0) if torch.cuda.is_available() else "
                          "'cpu')"], 30)
    runs: list[list[Stage]] = []
    profiles: list[Stage] = []  # after every engine table: those are the figures the issues ask
    for shape in shapes:
        model = os.path.join(work, shape)
        tag = shape.removeprefix("llama-")
        # a model written by an earlier call on the same machine is kept
        write = ["true"] if os.path.exists(os.path.join(model, "config.json")) else \
            [py, "bench/random_model.py", "--shape", shape, "--tokenizer", args.tokenizer,
             "--out", model]
        runs.append([Stage(f"random_{tag}", write, 150)])
        # one process each: a failure loses one table; "sync" runs without overlapped steps
        for quantization, overlap, kv in [("none", "auto", "auto"), ("none", "off", "auto"),
                                          ("fp8", "auto", "auto"), ("fp8", "auto", "fp8")]:
            name = f"engine_{tag}_{quantization}" + ("_sync" if overlap == "off" else "") + \
                ("_kv8" if kv == "fp8" else "")
            runs[-1].append(Stage(name, [py, "bench/engine.py", "--model", model, *engine,
                                         "--quantization", quantization, "--async-scheduling",
                                         overlap, "--kv-cache-dtype", kv,
                                         "--json", os.path.join(out, f"{name}.json")],
                                  # fp8 first times its matmuls (and compiles Triton's)
                                  (200 if tag == "8b" else 120) + 30 * (quantization == "fp8")))
        steady = ["--batch", "4", "--context", "32", "--steps", "3"] if dry else []
        for quantization in ("none", "fp8"):
            name = f"profile_{tag}" + ("_fp8" if quantization == "fp8" else "")
            profiles.append(Stage(name, [py, "bench/gpu_profile.py", "--model", model, *steady,
                                         "--quantization", quantization, "--json",
                                         os.path.join(out, f"{name}.json")], 120))
    tokens = "2" if dry else "32"
    pytest = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs"]
    collect = ["--collect-only"] if dry else []
    on_smollm2 = "tests/kernel/test_engine_triton.py"  # runs with the core tests
    kernel_tests = Stage("kernel_tests", pytest + (["tests/kernel/test_cuda_graph.py"] if dry
                                                   else ["tests/kernel", "--ignore", on_smollm2]),
                         200)
    # first what needs no SmolLM2 (a lease's first call carries only half of it): the first
    # engine table and the kernel tests; then the rest of the tables, the profiles (the 8B's
    # first) and the other tests
    tables = [stage for run in runs for stage in run]  # random_1b, engine_1b_none, ...
    return [info, *tables[:2], kernel_tests, *tables[2:], *reversed(profiles),
            # FP8 weights, then an FP8 KV cache, each against bf16
            Stage("fp8_accuracy", pytest + ["-s", "tests/core/test_fp8_accuracy.py", *collect],
                  240, True),
            Stage("core_tests", pytest + ["tests/core/test_fp8.py", "tests/core/test_kv_memory.py",
                                          "tests/core/test_fp8_kv_engine.py",
                                          "tests/core/test_async_scheduling.py",
                                          "tests/core/test_input_staging.py", on_smollm2,
                                          *collect],
                  150, True),
            Stage("triton_bf16", [py, "bench/triton_greedy.py", "--model", smollm2, "--dtype",
                                  "bfloat16", "--max-tokens", tokens, "--json",
                                  os.path.join(out, "triton_bf16.json")], 120, True)]


def prepare_smollm2(args, work: str) -> str | None:
    """A SmolLM2 folder: the one given, or one converted from reassembled GGUF parts."""
    if os.path.exists(os.path.join(args.smollm2, "model.safetensors")):
        return args.smollm2
    parts = sorted(glob.glob(os.path.join(args.gguf_parts, "gguf.part*")))
    if not parts:
        return None
    gguf = os.path.join(work, "smollm2.gguf")
    with open(gguf, "wb") as f:
        for part in parts:
            with open(part, "rb") as p:
                f.write(p.read())
    folder = os.path.join(work, "smollm2")
    subprocess.run([sys.executable, "tools/prepare_model.py", "--gguf", gguf, "--out", folder],
                   check=True, cwd=ROOT, env=os.environ)
    return folder


def install_wheels(pattern: str, work: str) -> None:
    """Installs the carried wheels (what the GPU image lacks; no registry is reachable there)."""
    wheels = {os.path.basename(w): w for w in sorted(glob.glob(pattern))}
    if not wheels:
        return
    site = os.path.join(work, "site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                    "--upgrade", "--target", site, *wheels.values()], check=True)
    os.environ["PYTHONPATH"] = os.pathsep.join([ROOT, site])


def stage_results(folder: str) -> dict:
    """Each stage's JSON in folder, by stage name."""
    results = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        with open(path) as f:
            results[os.path.basename(path).removesuffix(".json")] = json.load(f)
    return results


def collect_json(folder: str, out: str) -> None:
    """Every stage's JSON so far into out/results.json."""
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(stage_results(folder), f, indent=1)


def run_stage(stage: Stage, seconds: float, log) -> tuple[str, float, str]:
    start = time.perf_counter()
    try:
        done = subprocess.run(stage.command, cwd=ROOT, env=os.environ, capture_output=True,
                              text=True, timeout=seconds)
        output, status = done.stdout + done.stderr, "ok" if done.returncode == 0 \
            else f"failed (exit {done.returncode})"
    except subprocess.TimeoutExpired as e:  # its output may come back as bytes
        output = "".join(x.decode(errors="replace") if isinstance(x, bytes) else x or ""
                         for x in (e.stdout, e.stderr))
        status = f"timed out after {seconds:.0f} s"
    log.write(f"\n===== {stage.name}: {status}\n$ {' '.join(stage.command)}\n{output}\n")
    log.flush()
    return status, time.perf_counter() - start, output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes, CPU-friendly")
    parser.add_argument("--budget-s", type=float, default=480, help="all stages together")
    parser.add_argument("--smollm2", default="models/smollm2-135m-instruct")
    parser.add_argument("--tokenizer", default="models/smollm2-135m-instruct")
    parser.add_argument("--gguf-parts", default="/root/pagoda-gpu")
    parser.add_argument("--wheels", default=".gpu/part*/*.whl", help="a glob")
    parser.add_argument("--only", default="", help="comma-separated stage names to run")
    parser.add_argument("--skip", default="", help="comma-separated stage names to leave out")
    parser.add_argument("--work", default="/tmp/pagoda-gpu-work", help="models go here")
    args = parser.parse_args()
    out = os.environ.get("OUT") or sys.exit("set OUT to the folder for the results")
    jsons = os.path.join(args.work, "json")  # kept on the machine from call to call
    os.makedirs(jsons, exist_ok=True)
    os.makedirs(out, exist_ok=True)
    os.makedirs(args.work, exist_ok=True)
    os.environ["PYTHONPATH"] = ROOT
    if not args.dry_run:
        install_wheels(args.wheels, args.work)
    os.environ["PYTHONUNBUFFERED"] = "1"
    if args.dry_run:  # Triton kernels run in its interpreter where there is no GPU
        os.environ.setdefault("TRITON_INTERPRET", "1")
    deadline = time.perf_counter() + args.budget_s
    summary = ["# GPU check", "", f"dry run: {args.dry_run}", ""]
    only, skip = set(filter(None, args.only.split(","))), set(args.skip.split(","))

    def chosen(smollm2: str) -> list[Stage]:
        return [stage for stage in stages(args, args.work, jsons, smollm2)
                if (not only or stage.name in only) and stage.name not in skip]

    with open(os.path.join(out, "logs.txt"), "w") as log:
        smollm2 = None
        try:
            if any(stage.needs_smollm2 for stage in chosen(args.smollm2)):
                smollm2 = prepare_smollm2(args, args.work)
        except subprocess.CalledProcessError as e:
            log.write(f"SmolLM2 could not be prepared: {e}\n")
        summary.append(f"SmolLM2: {smollm2 or 'missing: its stages are skipped'}\n")
        if smollm2:
            os.environ["PAGODA_MODEL"] = smollm2
        for stage in chosen(smollm2 or args.smollm2):
            left = deadline - time.perf_counter()
            if stage.needs_smollm2 and not smollm2:
                status, took, output = "skipped: no SmolLM2", 0.0, ""
            elif left < 10:
                status, took, output = "skipped: out of time", 0.0, ""
            else:
                status, took, output = run_stage(stage, min(stage.limit_s, left), log)
            print(f"{stage.name}: {status} ({took:.0f} s)", flush=True)
            summary += [f"## {stage.name}: {status} ({took:.0f} s)", "", "```",
                        output[-4000:].strip(), "```", ""]
            collect_json(jsons, out)
            with open(os.path.join(out, "summary.md"), "w") as f:
                f.write("\n".join(summary) + "\n")


if __name__ == "__main__":
    main()
