"""Faithful tokenization: exactly what Hugging Face does, from the tokenizer embedded in the `.t`.

Two backends wrap the libraries transformers itself wraps: `tokenizers` for an embedded
tokenizer.json, sentencepiece for an embedded tokenizer.model. Both encode without special
tokens; the Tokenizer facade adds bos/eos by the file's rules.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Protocol

from dllama.errors import TokenizerError
from dllama.formats import EmbeddedKind, TokenizerFile


class EmbeddedTokenizerError(TokenizerError):
    """The tokenizer embedded in a `.t` cannot be used."""


class Backend(Protocol):
    origin: str

    def encode(self, text: str) -> list[int]:
        """Ids of `text` with special tokens written in it recognised, no bos/eos added."""

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`, special tokens included as their text."""


@dataclass(frozen=True)
class SpecialRules:
    """What Hugging Face adds around a text, in the order transformers decides it."""

    add_bos: bool
    add_eos: bool
    bos_id: int | None
    eos_id: int | None


class HFTokenizersBackend:
    """An embedded tokenizer.json through `tokenizers` (what PreTrainedTokenizerFast wraps)."""

    def __init__(self, tokenizer_json: str, origin: str = "the embedded tokenizer.json"):
        from tokenizers import Tokenizer as HFTokenizer

        self.tok = HFTokenizer.from_str(tokenizer_json)
        self.origin = origin
        self.reconstructed = False

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def post_processor_specials(self) -> tuple[int | None, int | None]:
        """(id the post-processor puts first, id it puts last), None where it adds nothing."""
        plain = self.tok.encode("a", add_special_tokens=False)
        full = self.tok.encode("a", add_special_tokens=True)
        ids, core = full.ids, plain.ids
        if ids == core or not core:
            return None, None
        start = ids.index(core[0]) if core[0] in ids else 0
        first = ids[0] if start > 0 else None
        end = start + len(core)
        last = ids[-1] if end < len(ids) else None
        return first, last


class SentencePieceBackend:
    """An embedded tokenizer.model through sentencepiece, as transformers' LlamaTokenizer
    (legacy) uses it: special tokens written in the text are split out first, each piece of
    text between them is encoded on its own (with sentencepiece's dummy prefix)."""

    def __init__(self, model_proto: bytes, extra_specials: list[str] = (),
                 origin: str = "the embedded tokenizer.model"):
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
        self.origin = origin
        n = self.sp.get_piece_size()
        specials = {self.sp.id_to_piece(i): i for i in range(n) if self.sp.is_control(i) or self.sp.is_unknown(i)}
        for text in extra_specials:
            tid = self.sp.piece_to_id(text)
            if text and (tid != self.sp.unk_id() or text == self.sp.id_to_piece(tid)):
                specials[text] = tid
        self.specials = specials
        self.special_ids = set(specials.values())
        # longest first, so "<s>" never cuts "<s_long>" short (transformers' trie does the same)
        alternatives = sorted(specials, key=len, reverse=True)
        self._splitter = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")") if alternatives else None

    def encode(self, text: str) -> list[int]:
        if self._splitter is None:
            return list(self.sp.encode(text))
        ids: list[int] = []
        for i, part in enumerate(self._splitter.split(text)):
            if i % 2:
                ids.append(self.specials[part])
            elif part:
                ids += self.sp.encode(part)
        return ids

    def decode(self, ids: list[int]) -> str:
        out, run = [], []
        for tid in ids:
            if tid in self.special_ids:
                if run:
                    out.append(self.sp.decode(run))
                    run = []
                out.append(self.sp.id_to_piece(tid))
            else:
                run.append(tid)
        if run:
            out.append(self.sp.decode(run))
        return "".join(out)


def embedded_config(tf: TokenizerFile) -> dict:
    raw = tf.embedded_source(EmbeddedKind.TOKENIZER_CONFIG)
    if raw is None:
        return {}
    try:
        config = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return config if isinstance(config, dict) else {}


def config_special_texts(config: dict) -> list[str]:
    """Special tokens tokenizer_config.json declares (additional_special_tokens, added_tokens_decoder)."""
    texts = []
    additional, decoder = config.get("additional_special_tokens"), config.get("added_tokens_decoder")
    for value in additional if isinstance(additional, list) else []:
        texts.append(value.get("content") if isinstance(value, dict) else value)
    for value in (decoder if isinstance(decoder, dict) else {}).values():
        if isinstance(value, dict) and value.get("content"):
            texts.append(value["content"])
    return [t for t in texts if isinstance(t, str)]


def embedded_backend(tf: TokenizerFile, where: str = "tokenizer file") -> Backend | None:
    """The backend for the tokenizer embedded in `tf`, or None when it carries none."""
    js = tf.embedded_source(EmbeddedKind.TOKENIZER_JSON)
    sp = tf.embedded_source(EmbeddedKind.SENTENCEPIECE)
    try:
        if js is not None:
            backend, size = HFTokenizersBackend(js.decode("utf-8")), None
            size = backend.tok.get_vocab_size(with_added_tokens=True)
        elif sp is not None:
            backend = SentencePieceBackend(sp, config_special_texts(embedded_config(tf)))
            size = backend.sp.get_piece_size()
        else:
            return None
    except Exception as e:  # tokenizers raises plain Exception, sentencepiece RuntimeError
        raise EmbeddedTokenizerError(f"{where} embeds a tokenizer that cannot be loaded ({e}); "
                                     "reconvert it with dllama-convert") from None
    if size != tf.vocab_size:
        raise EmbeddedTokenizerError(f"{where} embeds a tokenizer of {size} tokens but its vocabulary has "
                                     f"{tf.vocab_size}; the extension belongs to another tokenizer: reconvert it")
    return backend


def special_rules(tf: TokenizerFile, backend: Backend, config: dict) -> SpecialRules:
    """bos/eos as transformers adds them: tokenizer_config's add_bos_token / add_eos_token when
    present (transformers rebuilds the post-processor from them), otherwise what the
    tokenizer.json post-processor adds; for sentencepiece without a config, the `.t`'s add_bos."""
    first = last = None
    if getattr(backend, "reconstructed", False):  # no post-processor to ask: the `.t` decides
        return SpecialRules(add_bos=tf.add_bos, add_eos=False, bos_id=tf.bos_id, eos_id=None)
    if isinstance(backend, HFTokenizersBackend):
        first, last = backend.post_processor_specials()
    bos_id = first if first is not None else tf.bos_id
    eos_id = last if last is not None else (tf.eos_ids[0] if tf.eos_ids else None)
    if "add_bos_token" in config:
        add_bos = bool(config["add_bos_token"])
    elif isinstance(backend, HFTokenizersBackend):
        add_bos = first is not None
    else:
        add_bos = tf.add_bos
    if "add_eos_token" in config:
        add_eos = bool(config["add_eos_token"])
    else:
        add_eos = last is not None
    return SpecialRules(add_bos=add_bos and bos_id is not None, add_eos=add_eos and eos_id is not None,
                        bos_id=bos_id, eos_id=eos_id)
