"""What resuming a request on another replica costs: the re-prefill of prompt + sent tokens.

For each (prompt, sent) size a request resumes from `sent` tokens on a replica holding them in
its prefix cache (only the last partial block is computed), and one of the same size on a
replica that never saw it (every token prefilled again); the decode step that follows is the
yardstick. The figure is the time to the first resumed token, alone in the
engine. Prints a table and writes its section of bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from bench.results import markdown_table, update_section
from workers.engine.config import EngineConfig
from workers.engine.llm_engine import LLMEngine
from workers.engine.sampling_params import PriorOutput, SamplingParams

CASES = [(128, 32), (128, 256), (512, 256), (512, 1024)]


def time_to_first_token(engine: LLMEngine, request_id: str, prompt: list[int],
                        params: SamplingParams) -> float:
    engine.add_request(request_id, prompt, params)
    start = time.perf_counter()
    while not engine.step():
        pass
    elapsed = time.perf_counter() - start
    engine.abort(request_id)
    return elapsed


def random_tokens(engine: LLMEngine, count: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(100, engine.vocab_size - 100, (count,), generator=generator).tolist()


def run_case(engine: LLMEngine, prompt_len: int, sent: int, case: int, repeats: int) -> list:
    prompt = random_tokens(engine, prompt_len, case)
    tokens = random_tokens(engine, sent, 500 + case)
    params = SamplingParams(temperature=0, max_tokens=sent + 8, ignore_eos=True)
    resumed = dataclasses.replace(params, prior_output=PriorOutput(tokens, 0))
    # the replica that served the request so far holds prompt + sent in its prefix cache
    engine.add_request(f"seen-{case}", prompt + tokens, SamplingParams(max_tokens=1))
    while engine.has_unfinished():
        engine.step()
    warm = statistics.median(time_to_first_token(engine, f"warm-{case}-{i}", prompt, resumed)
                             for i in range(repeats))
    # a replica that never saw the request: tokens nobody sent before, all prefilled again
    cold = statistics.median(time_to_first_token(
        engine, f"cold-{case}-{i}", random_tokens(engine, prompt_len, 1000 + 10 * case + i),
        dataclasses.replace(params, prior_output=PriorOutput(
            random_tokens(engine, sent, 2000 + 10 * case + i), 0)))
        for i in range(repeats))
    engine.add_request(f"decode-{case}", prompt, resumed)
    steps = []
    while engine.has_unfinished():
        start = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - start)
    decode = statistics.median(steps[1:])
    return [prompt_len, sent, f"{cold * 1e3:.0f}", f"{warm * 1e3:.0f}",
            f"{decode * 1e3:.1f}", f"{cold / decode:.0f}", f"{warm / decode:.1f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="models/smollm2-135m-instruct")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num-threads", type=int, default=1, help="CPU threads, as deployed")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    config = EngineConfig(model=args.model, device=args.device, max_model_len=2048,
                          num_kv_blocks=512, num_threads=args.num_threads)
    engine = LLMEngine(config)
    rows = [run_case(engine, p, s, i, args.repeats) for i, (p, s) in enumerate(CASES)]
    headers = ["prompt tokens", "sent tokens", "re-prefill, cold (ms)",
               "re-prefill, prefix cached (ms)", "decode step (ms)", "cold / step",
               "cached / step"]
    table = markdown_table(headers, rows)
    print(table)
    update_section("Resume cost", f"""
`python -m bench.resume` ({args.model}, {args.device}, {args.num_threads} thread(s), one request
alone in the engine, median of {args.repeats}). A request resumed on another replica re-prefills
its prompt and the tokens already sent before its next token; on a replica whose prefix cache
holds them only the last partial block is computed.

{table}
""")


if __name__ == "__main__":
    main()
