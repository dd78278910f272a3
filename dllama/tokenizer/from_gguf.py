"""GGUF tokenizer metadata (`tokenizer.ggml.*`) -> `.t` contents with an embedded tokenizer.json.

The tokenizer.json is built the way transformers builds it when it loads a GGUF
(`GGUFTokenizerSkeleton` and its converters), through the `tokenizers` library itself, so the
`.t` of a GGUF equals the `.t` of the Hugging Face folder transformers saves from that GGUF:
- "gpt2" (byte-level BPE: SmolLM2, Llama 3, Qwen): vocab and merges as stored, CONTROL and
  USER_DEFINED tokens as added special tokens, the pre-tokenizer named by `tokenizer.ggml.pre`;
- "llama" (sentencepiece BPE with byte fallback: Llama 2, TinyLlama): merges rebuilt from the
  scores as transformers' SentencePieceExtractor does, sentencepiece's normalizer and decoder.
"""
from __future__ import annotations

import json
from pathlib import Path

from dllama.formats import EmbeddedKind, TokenizerFile
from dllama.tokenizer.from_hf import (
    SENTENCEPIECE_SPACE,
    TokenizerConversionError,
    embedded_sources,
    tokenizer_file_from_json,
)

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # llama.cpp token types
SPECIAL_TYPES = (CONTROL, USER_DEFINED, UNKNOWN)

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> the split regex before byte-level encoding (None: GPT-2's own regex)
PRE_TOKENIZER_PATTERNS = {
    "default": None, "gpt2": None, "smollm": None, "gpt-2": None,
    "llama3": LLAMA3_PATTERN, "llama-bpe": LLAMA3_PATTERN, "smaug-bpe": LLAMA3_PATTERN,
    "qwen2": QWEN2_PATTERN, "qwen35": QWEN2_PATTERN,
}


class GGUFTokenizer:
    """The `tokenizer.ggml.*` metadata of one GGUF file."""

    def __init__(self, checkpoint):
        self.where = checkpoint.path
        _check_metadata_types(checkpoint)
        self.model = checkpoint.value("tokenizer.ggml.model")
        self.tokens = checkpoint.value("tokenizer.ggml.tokens")
        if not self.model or not self.tokens:
            raise TokenizerConversionError(f"{self.where} has no tokenizer (tokenizer.ggml.model / tokens are "
                                           "missing); "
                                           "convert the tokenizer from the original model with `dllama-convert "
                                           "tokenizer`")
        if self.model not in ("gpt2", "llama"):
            raise TokenizerConversionError(f"{self.where} has a {self.model!r} tokenizer; dllama converts gpt2 "
                                           "(byte-level BPE) "
                                           "and llama (sentencepiece) tokenizers")
        n = len(self.tokens)
        self.types = list(checkpoint.value("tokenizer.ggml.token_type") or [NORMAL] * n)
        self.scores = list(checkpoint.value("tokenizer.ggml.scores") or [0.0] * n)
        self.merges = list(checkpoint.value("tokenizer.ggml.merges") or [])
        self.pre = checkpoint.value("tokenizer.ggml.pre") or "default"
        self.bos_id = checkpoint.value("tokenizer.ggml.bos_token_id")
        self.eos_id = checkpoint.value("tokenizer.ggml.eos_token_id")
        self.unk_id = checkpoint.value("tokenizer.ggml.unknown_token_id")
        self.pad_id = checkpoint.value("tokenizer.ggml.padding_token_id")
        self.add_bos = checkpoint.value("tokenizer.ggml.add_bos_token", self.model == "llama")
        self.chat_template = checkpoint.value("tokenizer.chat_template")
        self._json: str | None = None
        if len(self.types) != n or len(self.scores) != n:
            raise TokenizerConversionError(f"{self.where} has {n} tokens but {len(self.types)} token types and "
                                           f"{len(self.scores)} scores; the tokenizer metadata is corrupt")
        for what, token_id in (("bos", self.bos_id), ("eos", self.eos_id), ("unknown", self.unk_id)):
            if (token_id is None and what != "unknown") or token_id is not None and not 0 <= token_id < n:
                raise TokenizerConversionError(f"{self.where} has no valid {what} token "
                                               f"(tokenizer.ggml.{what}_token_id "
                                               f"is {token_id}); the tokenizer metadata is incomplete")
        if self.model == "gpt2" and not self.merges:
            raise TokenizerConversionError(f"{self.where} has a gpt2 tokenizer without tokenizer.ggml.merges; "
                                           "the tokenizer metadata is incomplete")

    def tokenizer_json(self) -> str:
        """Built once (building SmolLM2's takes ~0.5 s and ~50 MB): the `.t` and the validator share it."""
        if self._json is None:
            try:
                tok = self._byte_level_bpe() if self.model == "gpt2" else self._sentencepiece_bpe()
            except Exception as e:  # tokenizers raises plain Exception (a merge of unknown tokens, ...)
                if isinstance(e, TokenizerConversionError):
                    raise
                raise TokenizerConversionError(f"{self.where} has tokenizer metadata the tokenizers library refuses "
                                               f"({e}); the file is corrupt") from None
            self._json = tok.to_str(pretty=True)
        return self._json

    def tokenizer_config(self) -> dict:
        """The special-token texts transformers writes to tokenizer_config.json for this GGUF."""
        config = {}
        for key, token_id in (("bos_token", self.bos_id), ("eos_token", self.eos_id), ("unk_token", self.unk_id),
                              ("pad_token", self.pad_id)):
            if token_id is not None and 0 <= token_id < len(self.tokens):
                config[key] = self.tokens[token_id]
        return config

    def _special_tokens(self):
        from tokenizers import AddedToken

        return [AddedToken(t, special=True, normalized=False)
                for t, kind in zip(self.tokens, self.types) if kind in SPECIAL_TYPES]

    def _post_processor(self):
        from tokenizers import processors

        if not self.add_bos:
            return processors.TemplateProcessing(single="$A", pair="$A $B:1", special_tokens=[])
        bos = self.tokens[self.bos_id]
        return processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                             special_tokens=[(bos, self.bos_id)])

    def _byte_level_bpe(self):
        from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
        from tokenizers.models import BPE

        if self.pre not in PRE_TOKENIZER_PATTERNS:
            raise TokenizerConversionError(f"{self.where} names the pre-tokenizer {self.pre!r}, which dllama does not "
                                           "know; "
                                           f"known: {', '.join(sorted(PRE_TOKENIZER_PATTERNS))}")
        merges = [tuple(m.split(" ", 1)) for m in self.merges]
        tok = Tokenizer(BPE(vocab={t: i for i, t in enumerate(self.tokens)}, merges=merges, dropout=None,
                            unk_token=None,
                            continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False, byte_fallback=False,
                            ignore_merges=False))
        pattern = PRE_TOKENIZER_PATTERNS[self.pre]
        if pattern is None:
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
        else:
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
            ])
        tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
        tok.post_processor = self._post_processor()
        tok.add_special_tokens(self._special_tokens())
        return tok

    def _sentencepiece_bpe(self):
        from tokenizers import Tokenizer, decoders, normalizers
        from tokenizers.models import BPE

        vocab = {t: i for i, t in enumerate(self.tokens)}
        unk = self.tokens[self.unk_id] if self.unk_id is not None else None
        tok = Tokenizer(BPE(vocab=vocab, merges=sentencepiece_merges(self.tokens, self.scores, self.types),
                            unk_token=unk,
                            fuse_unk=True, byte_fallback=True, dropout=None))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend(SENTENCEPIECE_SPACE),
                                               normalizers.Replace(" ", SENTENCEPIECE_SPACE)])
        tok.decoder = decoders.Sequence([decoders.Replace(SENTENCEPIECE_SPACE, " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
        tok.post_processor = self._post_processor()
        tok.add_special_tokens(self._special_tokens())
        return tok

    def tokenizer_file(self, embed: bool = True) -> TokenizerFile:
        """The `.t` contents: the vocabulary as the reference converter would read the equivalent
        tokenizer.json (gpt2) or tokenizer.model (llama, with its scores)."""
        tokenizer_json = self.tokenizer_json()
        config = self.tokenizer_config()
        model_config = {"bos_token_id": self.bos_id, "eos_token_id": self.eos_id}
        tf = tokenizer_file_from_json(json.loads(tokenizer_json), config, model_config, Path(self.where))
        if self.model == "llama":
            tf.tokens = [self._sentencepiece_bytes(i) for i in range(len(self.tokens))]
            tf.scores = [float(s) for s in self.scores]
        tf.add_bos = bool(self.add_bos)
        tf.chat_template = self.chat_template or None
        if embed:
            tf.embedded = embedded_sources(EmbeddedKind.TOKENIZER_JSON, tokenizer_json.encode("utf-8"), config)
        return tf

    def _sentencepiece_bytes(self, i: int) -> bytes:
        piece = self.tokens[i]
        if self.types[i] == BYTE and len(piece) == 6 and piece.startswith("<0x"):
            return bytes([int(piece[3:5], 16)])
        return piece.replace(SENTENCEPIECE_SPACE, " ").encode("utf-8")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _list_of(v, ok) -> bool:
    return isinstance(v, list) and all(map(ok, v))


# tokenizer.ggml.* key -> (what it must be, the test): a value of another type is a corrupt file
_METADATA_TYPES = {
    "tokenizer.ggml.model": ("a name", lambda v: isinstance(v, str)),
    "tokenizer.ggml.pre": ("a name", lambda v: isinstance(v, str)),
    "tokenizer.ggml.tokens": ("a list of strings", lambda v: _list_of(v, lambda t: isinstance(t, str))),
    "tokenizer.ggml.token_type": ("a list of integers", lambda v: _list_of(v, _is_int)),
    "tokenizer.ggml.scores": ("a list of numbers", lambda v: _list_of(v, lambda x: isinstance(x, (int, float))
                                                                      and not isinstance(x, bool))),
    "tokenizer.ggml.merges": ("a list of strings", lambda v: _list_of(v, lambda m: isinstance(m, str))),
    "tokenizer.ggml.bos_token_id": ("a token id", _is_int),
    "tokenizer.ggml.eos_token_id": ("a token id", _is_int),
    "tokenizer.ggml.unknown_token_id": ("a token id", _is_int),
    "tokenizer.ggml.padding_token_id": ("a token id", _is_int),
    "tokenizer.ggml.add_bos_token": ("true or false", lambda v: isinstance(v, bool)),
    "tokenizer.chat_template": ("a string", lambda v: isinstance(v, str)),
}


def _check_metadata_types(checkpoint) -> None:
    for key, (wanted, ok) in _METADATA_TYPES.items():
        value = checkpoint.value(key)
        if value is not None and not ok(value):
            raise TokenizerConversionError(f"{checkpoint.path} has the metadata {key} of the wrong type (not "
                                           f"{wanted}); the file is corrupt")


def sentencepiece_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges from a sentencepiece vocabulary, ordered by the merged piece's score (transformers'
    SentencePieceExtractor): every split of a piece into two pieces of the vocabulary is a merge."""
    vocab = {t: i for i, t in enumerate(tokens) if types[i] in (NORMAL, UNKNOWN, UNUSED) or types[i] == BYTE}
    merges = []
    for piece, piece_id in vocab.items():
        local = [(piece[:k], piece[k:], scores[piece_id]) for k in range(1, len(piece))
                 if piece[:k] in vocab and piece[k:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges += local
    merges.sort(key=lambda m: m[2], reverse=True)
    return [(left, right) for left, right, _ in merges]
