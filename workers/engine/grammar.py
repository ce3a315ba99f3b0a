"""Constrained decoding with xgrammar: JSON-schema or EBNF grammars that mask the sampler's
logits."""
from __future__ import annotations

import json
import logging
import re

import torch
import xgrammar as xgr

from workers.engine.errors import InvalidRequestError

logger = logging.getLogger("pagoda.engine")

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
    """Compiles and caches JSON-schema and EBNF grammars for one tokenizer."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int]) -> None:
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=stop_token_ids)
        self.compiler = xgr.GrammarCompiler(info)
        self.vocab_size = vocab_size
        self._cache: dict[str, xgr.CompiledGrammar] = {}

    def _compile(self, schema: dict | None, ebnf: str | None) -> xgr.CompiledGrammar:
        # the cache key only: a schema's fields keep their order
        key = json.dumps(schema, sort_keys=True) if ebnf is None else f"ebnf:{ebnf}"
        if key not in self._cache:
            if len(self._cache) >= 128:
                self._cache.pop(next(iter(self._cache)))
            if ebnf is not None:
                self._cache[key] = self.compiler.compile_grammar(ebnf)
            elif schema == {"type": "object"}:
                self._cache[key] = self.compiler.compile_builtin_json_grammar()
            else:
                self._cache[key] = self.compiler.compile_json_schema(json.dumps(schema),
                                                                     any_whitespace=False)
        return self._cache[key]

    def matcher(self, schema: dict | None = None, ebnf: str | None = None) -> Grammar:
        """The grammar state of a sequence constrained by a JSON schema or an EBNF grammar."""
        try:
            compiled = self._compile(schema, ebnf)
        except Exception as e:  # xgrammar raises several types for unsupported grammars
            if ebnf is not None:
                logger.info("grammar rejected by the grammar compiler: %s", e)
                raise InvalidRequestError(f"The grammar cannot be used: {schema_problem(e)}.",
                                          param="structured_outputs.grammar") from e
            logger.info("JSON schema rejected by the grammar compiler: %s", e)
            raise InvalidRequestError(f"The JSON schema cannot be used: {schema_problem(e)}.",
                                      param="response_format") from e
        return Grammar(xgr.GrammarMatcher(compiled), self.vocab_size)


class Grammar:
    """The grammar state of one sequence."""

    def __init__(self, matcher: xgr.GrammarMatcher, vocab_size: int) -> None:
        self.matcher = matcher
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
