"""Grammar-constrained decoding: which tokens may come next so that the output follows a grammar.

llguidance (docs/API.md says why this engine) compiles a JSON schema or a Lark grammar against
the tokenizer's vocabulary; a GrammarConstraint then gives generate() a boolean mask over the
vocabulary before every token (disallowed logits become -inf in the sampler) and is advanced by
the token that was chosen. The end-of-sequence tokens are allowed only where the grammar accepts,
and once the grammar cannot be extended generation stops there (docs/API.md).

    vocab = GrammarVocabulary.of(tokenizer)                  # once per tokenizer (~0.3 s for 49k tokens)
    constraint = vocab.constraint(json_schema_grammar(schema))
    generate(engine, ids, max_tokens, constraint=constraint, ...)
"""
from __future__ import annotations

import json
import weakref
from typing import Any

import numpy as np

from dllama.errors import DllamaError

# Python's json.dumps separators, and no free whitespace: a small model left free to write
# whitespace between tokens can loop on newlines until max_tokens instead of closing the JSON.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(DllamaError, ValueError):
    """A schema or grammar the engine cannot compile, or a tokenizer it cannot use."""


def json_schema_grammar(schema: dict | bool) -> str:
    """The grammar of the JSON texts that validate against `schema` (JSON Schema, draft 2020-12 subset)."""
    from llguidance import LLMatcher

    if schema is False:
        raise GrammarError("the JSON schema false accepts no answer at all")
    try:
        text = json.dumps({} if schema is True else schema)  # the engine's options need an object schema
        grammar = LLMatcher.grammar_from_json_schema(text, overrides=JSON_LAYOUT)
    except (ValueError, TypeError, RecursionError) as e:
        raise GrammarError(f"the JSON schema cannot be compiled: {e}") from None
    failed, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if failed:
        raise GrammarError(f"the JSON schema cannot be compiled: {messages[0]}")
    return grammar


def lark_grammar(source: str) -> str:
    from llguidance import LLMatcher

    grammar = LLMatcher.grammar_from_lark(source)
    failed, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if failed:
        raise GrammarError(f"the grammar cannot be compiled: {messages[0]}")
    return grammar


class GrammarVocabulary:
    """The tokenizer's vocabulary as the grammar engine sees it (byte strings of every token, eos ids)."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_ids: list[int]):
        from llguidance import LLTokenizer

        try:
            self.llt = LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=list(eos_ids))
        except (ValueError, RuntimeError) as e:
            raise GrammarError(f"the grammar engine cannot read this tokenizer: {e}") from None
        self.vocab_size = vocab_size
        self.eos_ids = list(eos_ids)

    @classmethod
    def of(cls, tokenizer) -> "GrammarVocabulary":
        """From a dllama Tokenizer in faithful mode: the tokenizer.json embedded in its `.t`
        (or the reconstruction faithful mode runs on). Cached on the tokenizer."""
        cached = _VOCABULARIES.get(tokenizer)
        if cached is not None:
            return cached
        backend = getattr(tokenizer, "_backend", None)
        hf = getattr(backend, "tok", None)
        if hf is None or not hasattr(hf, "to_str"):
            raise GrammarError("structured output needs the Hugging Face tokenizer.json embedded in the .t "
                               "(faithful mode; a sentencepiece-only tokenizer is not supported yet): reconvert the "
                               "model from a checkpoint that has tokenizer.json")
        vocab = cls(hf.to_str(), tokenizer.vocab_size, tokenizer.eos_ids)
        _VOCABULARIES[tokenizer] = vocab
        return vocab

    def constraint(self, grammar: str) -> "GrammarConstraint":
        return GrammarConstraint(self, grammar)

    def check(self, grammar: str) -> None:
        """Raises GrammarError when the grammar does not compile against this vocabulary."""
        from llguidance import LLMatcher

        failed, messages = LLMatcher.validate_grammar_with_warnings(grammar, self.llt)
        if failed:
            raise GrammarError(f"the grammar cannot be compiled: {messages[0]}")


_VOCABULARIES: "weakref.WeakKeyDictionary[Any, GrammarVocabulary]" = weakref.WeakKeyDictionary()


class GrammarConstraint:
    """One generation's grammar state: allowed() before each token, advance(token) after it."""

    def __init__(self, vocab: GrammarVocabulary, grammar: str):
        from llguidance import LLMatcher

        self.vocab = vocab
        self.matcher = LLMatcher(vocab.llt, grammar, log_level=0)
        if self.matcher.is_error():
            raise GrammarError(f"the grammar cannot be compiled: {self.matcher.get_error()}")
        self._bits = np.zeros((vocab.vocab_size + 31) // 32, dtype=np.int32)

    def allowed(self, n_logits: int) -> np.ndarray:
        """Boolean mask of the tokens the grammar allows next, over n_logits entries (a model's
        output may have more rows than the tokenizer has tokens: those are never allowed)."""
        self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        if self.matcher.is_error():
            raise GrammarError(f"the grammar engine failed: {self.matcher.get_error()}")
        bits = np.unpackbits(self._bits.view(np.uint8), bitorder="little").view(bool)
        if n_logits <= self.vocab.vocab_size:
            return bits[:n_logits]
        mask = np.zeros(n_logits, dtype=bool)
        mask[:self.vocab.vocab_size] = bits[:self.vocab.vocab_size]
        return mask

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(int(token)):
            raise GrammarError(f"token {token} breaks the grammar: {self.matcher.get_error()}")

    @property
    def done(self) -> bool:
        """True when the grammar cannot be extended: only an end of sequence may follow."""
        return self.matcher.is_stopped()

    @property
    def accepting(self) -> bool:
        return self.matcher.is_accepting()

