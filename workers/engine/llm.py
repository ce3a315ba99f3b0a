"""Offline batch generation: `LLM(config).generate(prompts, params)`."""
from __future__ import annotations

from dataclasses import dataclass, field

from workers.engine.config import EngineConfig
from workers.engine.llm_engine import LLMEngine
from workers.engine.sampling_params import SamplingParams


@dataclass
class Completion:
    request_id: str
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None
    cached_tokens: int = 0


class LLM:
    def __init__(self, config: EngineConfig | None = None, **kwargs) -> None:
        self.engine = LLMEngine(config or EngineConfig(**kwargs))
        self.tokenizer = self.engine.tokenizer
        self._counter = 0

    def close(self) -> None:
        """Stop the engine's worker ranks (an engine split over devices has some)."""
        self.engine.close()

    def generate(self, prompts: list[str] | list[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[Completion]:
        """Run every prompt to completion with continuous batching; results in prompt order."""
        params = params or SamplingParams()
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        results: dict[str, Completion] = {}
        order = []
        for prompt, p in zip(prompts, params_list, strict=True):
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            request_id = f"offline-{self._counter}"
            self._counter += 1
            self.engine.add_request(request_id, ids, p)
            results[request_id] = Completion(request_id, ids)
            order.append(request_id)
        while self.engine.has_unfinished():
            outputs = self.engine.step()
            if self.engine.failed:  # offline, one failed request fails the call
                for request_id in order:
                    self.engine.abort(request_id)
                raise self.engine.failed[0][1]
            for out in outputs:
                done = results[out.request_id]
                done.text += out.text
                done.token_ids += out.token_ids
                done.logprobs += out.logprobs or []
                if out.finish_reason:
                    done.finish_reason = out.finish_reason
                    done.cached_tokens = out.cached_tokens
        return [results[r] for r in order]
