"""The Tokenizer other components use (docs/ARCHITECTURE.md): load a `.t`, encode, decode, stream, chat.

mode="faithful" tokenizes exactly like Hugging Face with the tokenizer embedded in the `.t`
(faithful.py), or with the best reconstruction from the vocabulary when none is embedded
(reconstruct.py; `exact` is False and a warning says so). mode="reference" runs the reference
C++ runtime's algorithm bit for bit (cpp_tokenizer.py, FORMAT.md §4.1), to predict what that
runtime feeds the model.
"""
from __future__ import annotations

import os
import warnings
from typing import Iterable

from dllama.errors import TokenizerError
from dllama.formats import EmbeddedKind, TokenizerFile, read_tokenizer
from dllama.tokenizer.chat import ChatTemplateError, render_chat
from dllama.tokenizer.cpp_tokenizer import ReferenceDecoder, ReferenceEncoder
from dllama.tokenizer.faithful import (
    Backend,
    HFTokenizersBackend,
    SpecialRules,
    embedded_backend,
    embedded_config,
    special_rules,
)
from dllama.tokenizer.reconstruct import reconstruct_tokenizer_json
from dllama.tokenizer.stream import ReferenceStreamDecoder, StreamDecoder

MODES = ("faithful", "reference")
OTHER_SPECIAL_TOKENS = ("unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class InexactTokenizerWarning(UserWarning):
    """Faithful mode runs on a reconstruction: the `.t` carries no embedded Hugging Face tokenizer."""


class Tokenizer:
    def __init__(self, tf: TokenizerFile, mode: str = "faithful", where: str = "tokenizer file"):
        if mode not in MODES:
            raise TokenizerError(f"unknown tokenizer mode {mode!r}: use 'faithful' or 'reference'")
        self.tf = tf
        self.mode = mode
        self.where = where
        self.config = embedded_config(tf)
        self.approximation: str | None = None  # what was assumed when faithful mode reconstructs
        self._backend: Backend | None = None
        self._rules: SpecialRules | None = None
        self._reference: ReferenceEncoder | None = None
        if mode == "faithful":
            self._backend = embedded_backend(tf, where)
            if self._backend is None:
                self._backend = self._reconstruction()
            self._rules = special_rules(tf, self._backend, self.config)
        else:
            self._reference = ReferenceEncoder(tf)

    # -- construction

    @classmethod
    def load(cls, path: str | os.PathLike, mode: str = "faithful") -> "Tokenizer":
        tokenizer = cls(read_tokenizer(path), mode, where=str(path))
        tokenizer._drop_parsed_json()
        return tokenizer

    @classmethod
    def from_file(cls, tf: TokenizerFile, mode: str = "faithful") -> "Tokenizer":
        return cls(tf, mode)

    def _reconstruction(self) -> Backend:
        text, family = reconstruct_tokenizer_json(self.tf)
        self.approximation = (f"{self.where} carries no embedded Hugging Face tokenizer: faithful mode guesses a "
                              f"{family} tokenizer from the vocabulary and may differ from the original; "
                              "reconvert with dllama-convert to embed it")
        warnings.warn(self.approximation, InexactTokenizerWarning, stacklevel=3)
        try:
            backend = HFTokenizersBackend(text, origin="a reconstruction from the .t vocabulary")
        except Exception as e:  # tokenizers raises plain Exception
            raise TokenizerError(f"{self.where} carries no embedded Hugging Face tokenizer and its vocabulary cannot "
                                 f"be rebuilt into one ({e}); reconvert it with dllama-convert") from None
        backend.reconstructed = True
        return backend

    def _drop_parsed_json(self) -> None:
        """Let go of the embedded tokenizer.json's text once `tokenizers` has parsed it: nothing reads it again
        (structured output asks the backend for its JSON), and it stayed beside the parsed tokenizer for the
        life of the process (3.4 MiB for SmolLM2, on a root that serves from a 1 GB board). Only for a file
        this Tokenizer read itself: a TokenizerFile handed to it stays whole."""
        if isinstance(self._backend, HFTokenizersBackend):
            self.tf.embedded = [e for e in self.tf.embedded if e.kind != EmbeddedKind.TOKENIZER_JSON]

    # -- facts about the vocabulary

    @property
    def exact(self) -> bool:
        """True when this tokenizer reproduces its reference exactly: faithful mode with the embedded
        Hugging Face tokenizer, or reference mode (the C++ algorithm is reproduced exactly)."""
        return self.approximation is None

    @property
    def bos_id(self) -> int:
        return self.tf.bos_id

    @property
    def eos_ids(self) -> list[int]:
        return list(self.tf.eos_ids)

    @property
    def vocab_size(self) -> int:
        return self.tf.vocab_size

    @property
    def add_bos(self) -> bool:
        """Whether encode() adds bos by default."""
        return self._rules.add_bos if self._rules else self.tf.add_bos

    @property
    def chat_template(self) -> str | None:
        return self.tf.chat_template

    def is_eos(self, token: int) -> bool:
        return token in self.tf.eos_ids

    def token_bytes(self, token: int) -> bytes:
        self._check_ids([token])
        return self.tf.tokens[token]

    # -- encoding and decoding

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; add_bos None follows the file (Hugging Face's rules in faithful mode)."""
        if self._reference is not None:
            return self._reference.encode(text, add_bos=self.tf.add_bos if add_bos is None else add_bos)
        rules = self._rules
        ids = self._backend.encode(text)
        return self._with_specials(ids, rules, add_bos)

    def encode_batch(self, texts: Iterable[str], add_bos: bool | None = None) -> list[list[int]]:
        texts = list(texts)
        if isinstance(self._backend, HFTokenizersBackend):
            return [self._with_specials(ids, self._rules, add_bos) for ids in self._backend.encode_batch(texts)]
        return [self.encode(t, add_bos) for t in texts]

    @staticmethod
    def _with_specials(ids: list[int], rules: SpecialRules, add_bos: bool | None) -> list[int]:
        bos = rules.add_bos if add_bos is None else add_bos
        if bos:
            ids = [rules.bos_id] + ids
        if rules.add_eos and add_bos is None:
            ids = ids + [rules.eos_id]
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`. A leading bos decodes to nothing (it is the one encode() adds); other
        special tokens decode to their text, as Hugging Face's decode(skip_special_tokens=False)."""
        ids = [int(i) for i in ids]
        self._check_ids(ids)
        if self.mode == "reference":
            decoder = ReferenceStreamDecoder(ReferenceDecoder(self.tf))
            return "".join(decoder.push(i) for i in ids)
        return self._decode_faithful(self._drop_leading_bos(ids))

    def _drop_leading_bos(self, ids: list[int]) -> list[int]:
        bos = self._rules.bos_id if self._rules else self.tf.bos_id
        return ids[1:] if ids and ids[0] == bos else ids

    def _decode_faithful(self, ids: list[int]) -> str:
        return self._backend.decode(ids) if ids else ""

    def stream_decoder(self):
        """An object with push(id) -> str and flush() -> str whose pieces join to decode(ids)."""
        if self.mode == "reference":
            return _CheckedStream(self, ReferenceStreamDecoder(ReferenceDecoder(self.tf)))
        return _CheckedStream(self, StreamDecoder(self._decode_faithful, skip_first=self._rules.bos_id))

    def _check_ids(self, ids: list[int]) -> None:
        for i in ids:
            if not 0 <= i < self.tf.vocab_size:
                raise TokenizerError(f"token id {i} is outside the vocabulary of {self.tf.vocab_size} tokens "
                                     f"in {self.where}; the model and tokenizer do not belong together")

    # -- chat

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        """The stored chat template rendered with Hugging Face's variables."""
        if not self.tf.chat_template:
            raise ChatTemplateError(f"{self.where} has no chat template; convert a model whose tokenizer_config.json "
                                    "has chat_template, or send plain completions")
        # transformers passes every special token of the tokenizer's map to the template
        specials = {key: self._special_text(key, None) for key in OTHER_SPECIAL_TOKENS if key in self.config}
        return render_chat(self.tf.chat_template, messages, add_generation_prompt,
                           bos_token=self._special_text("bos_token", self.tf.bos_id),
                           eos_token=self._special_text("eos_token", self.tf.eos_ids[0] if self.tf.eos_ids else None),
                           **(specials | extra))

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a rendered conversation. Like transformers' apply_chat_template, no bos is
        added: the template writes its own."""
        return self.encode(self.render_chat(messages, add_generation_prompt), add_bos=False)

    def _special_text(self, key: str, token: int | None) -> str:
        value = self.config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            return value
        if token is None or not 0 <= token < self.tf.vocab_size:
            return ""
        return self.tf.tokens[token].decode("utf-8", "replace")

    def __repr__(self) -> str:
        kind = "exact" if self.exact else "approximate"
        return f"Tokenizer({self.where!r}, mode={self.mode!r}, vocab_size={self.vocab_size}, {kind})"


class _CheckedStream:
    """A stream decoder that refuses ids outside the vocabulary with a clear error."""

    def __init__(self, tokenizer: Tokenizer, inner: StreamDecoder | ReferenceStreamDecoder):
        self._tokenizer = tokenizer
        self._inner = inner

    def push(self, token: int) -> str:
        self._tokenizer._check_ids([int(token)])
        return self._inner.push(token)

    def flush(self) -> str:
        return self._inner.flush()
