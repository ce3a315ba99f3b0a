"""Constrained decoding with xgrammar: JSON-schema or EBNF grammars that mask the sampler's
logits."""
from __future__ import annotations

import json
import logging
import re
from typing import Any

import torch
import xgrammar as xgr

from workers.engine.errors import InvalidRequestError

logger = logging.getLogger("pagoda.engine")
CACHE_BYTES = 256 * 2**20  # compiled grammars kept for reuse

# xgrammar prefixes its messages with a time and its C++ source location
SOURCE_PREFIX = re.compile(r"^\s*(\[[0-9:]+\]\s*)?\S+\.(cc|h|cpp|py):\d+:\s*")
SOURCE_PATH = re.compile(r"\S+\.(cc|h|hpp|cpp|py)\b")


def schema_problem(error: Exception) -> str:
    """What the compiler found wrong with a schema, without where in the library it did."""
    first = (str(error).strip().splitlines() or [""])[0]
    reason = SOURCE_PREFIX.sub("", first).strip().rstrip(".")
    if not reason or SOURCE_PATH.search(reason) or len(reason) > 200:
        return "it uses a feature constrained decoding does not support"
    return reason


class GrammarCompiler:
    """Compiles JSON-schema and EBNF grammars for one tokenizer. xgrammar's compiler caches
    them and may be called from several threads at once."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> None:
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=stop_token_ids)
        self.compiler = xgr.GrammarCompiler(info, cache_limit_bytes=CACHE_BYTES)

    def compile(self, schema: dict | None = None, ebnf: str | None = None
                ) -> xgr.CompiledGrammar:
        """The grammar of a request constrained by a JSON schema or an EBNF grammar."""
        try:
            if ebnf is not None:
                return self.compiler.compile_grammar(ebnf)
            if schema == {"type": "object"}:
                return self.compiler.compile_builtin_json_grammar()
            return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
        except Exception as e:  # xgrammar raises several types for unsupported grammars
            if ebnf is not None:
                logger.info("grammar rejected by the grammar compiler: %s", e)
                raise InvalidRequestError(f"The grammar cannot be used: {schema_problem(e)}.",
                                          param="structured_outputs.grammar") from e
            logger.info("JSON schema rejected by the grammar compiler: %s", e)
            raise InvalidRequestError(f"The JSON schema cannot be used: {schema_problem(e)}.",
                                      param="response_format") from e


class Grammar:
    """The grammar state of one sequence."""

    def __init__(self, compiled: xgr.CompiledGrammar, vocab_size: int) -> None:
        self.matcher = xgr.GrammarMatcher(compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    def mask_logits(self, logits: torch.Tensor) -> None:
        """Set the logits of every token the grammar forbids next to -inf (in place)."""
        if self.matcher.is_terminated():
            return
        self.matcher.fill_next_token_bitmask(self.bitmask)
        row = logits.view(1, -1)
        xgr.apply_token_bitmask_inplace(row, self.bitmask.to(logits.device))

    def accept(self, token_id: int) -> bool:
        return self.matcher.is_terminated() or self.matcher.accept_token(token_id)

    @property
    def terminated(self) -> bool:
        return self.matcher.is_terminated()
