"""Synthetic request sets for the serving benchmark: no download, reproducible from a seed.

`sharegpt_like`: single requests whose prompt and output lengths follow log-normal spreads like
ShareGPT's (many short, a long tail), scaled down to a small CPU model. `conversations`:
multi-turn chats, each with its own long system prompt that every later turn repeats, the
shared-prefix traffic prefix-affinity routing is for.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

WORDS = (  # noqa: SIM905 (a list literal of 73 words reads worse)
    "river mountain lantern harbour engine signal garden copper winter meadow orbit canyon "
    "archive compass thunder velvet marble falcon glacier pepper ribbon saddle temple violet "
    "anchor basket candle dragon ember forest gravel hollow island jasmine kettle ladder "
    "mirror needle oyster pillow quartz rocket shadow timber umbrella valley wagon yonder "
    "zephyr acorn bridge cactus dollar feather goblet hammer igloo jacket kernel lemon magnet "
    "nickel olive parrot quiver raven spindle tunnel uniform vessel walnut yarn zipper"
).split()


@dataclass
class BenchRequest:
    prompt_token_ids: list[int]
    max_tokens: int  # EOS ignored, so every system generates exactly this many


@dataclass
class Conversation:
    system: str
    user_turns: list[str]


def words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(count))


def lognormal_int(rng: random.Random, median: float, sigma: float, low: int, high: int) -> int:
    return max(low, min(high, round(rng.lognormvariate(math.log(median), sigma))))


def sharegpt_like(tokenizer, num: int, max_tokens: int, seed: int,
                  prompt_median: int = 96, max_prompt: int = 768) -> list[BenchRequest]:
    """Prompts of word salad cut to exact token lengths; every prompt starts differently."""
    rng = random.Random(seed)
    requests = []
    for _ in range(num):
        length = lognormal_int(rng, prompt_median, 0.9, 8, max_prompt)
        ids = tokenizer.encode(words(rng, length + 8), add_special_tokens=False)[:length]
        output = lognormal_int(rng, max_tokens / 2.5, 0.7, 4, max_tokens)
        requests.append(BenchRequest(ids, output))
    return requests


def conversations(num: int, turns: int, seed: int, system_words: int = 220,
                  user_words: int = 24) -> list[Conversation]:
    rng = random.Random(seed)
    return [Conversation(system=f"Conversation {i}. " + words(rng, system_words),
                         user_turns=[words(rng, user_words) for _ in range(turns)])
            for i in range(num)]


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
