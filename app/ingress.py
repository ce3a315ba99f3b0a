"""What every endpoint needs: the engine client, tokenizer, chat template, limits, metrics."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from app.chat import ChatTemplate
from app.engine_client import EngineClient
from app.errors import model_not_found
from app.logprobs import TokenTexts
from app.metrics import Metrics
from app.params import Limits, prompt_chars_bound
from app.parsers.registry import ParserChoice, choose_parsers
from app.settings import Settings

logger = logging.getLogger("pagoda.api")


@dataclass
class Ingress:
    client: EngineClient
    settings: Settings
    tokenizer: Any
    template: ChatTemplate
    texts: TokenTexts
    metrics: Metrics
    model_name: str
    limits: Limits
    parsers: ParserChoice

    @classmethod
    def create(cls, client: EngineClient, settings: Settings) -> Ingress:
        config = client.config
        tokenizer = client.tokenizer
        name = config.model_name
        vocab_size = config.hf_config.get("vocab_size") or len(tokenizer)
        parsers = choose_parsers(config.hf_config.get("model_type"), tokenizer.chat_template,
                                 settings.tool_parser, settings.reasoning_parser)
        logger.info("model %s: tool parser %s, reasoning parser %s (%s)", name,
                    parsers.tool or "none (forced calls only)", parsers.reasoning or "none",
                    parsers.reason)
        return cls(
            client=client, settings=settings, tokenizer=tokenizer,
            template=ChatTemplate(tokenizer), texts=TokenTexts(tokenizer),
            metrics=Metrics(name, client.stats), model_name=name,
            limits=Limits(config.context_len, vocab_size, settings.max_n,
                          prompt_chars_bound(config.context_len, tokenizer), client.max_choices),
            parsers=parsers,
        )

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise model_not_found(name)

    def log_prompt(self, request_id: str, prompt: Any) -> None:
        if self.settings.log_prompts:
            logger.info("request %s prompt: %r", request_id, prompt)
