"""The best tokenizer.json we can rebuild from a `.t` that carries no embedded tokenizer.

A `.t` keeps only token bytes and scores, so what the original did around them is guessed:
- a block of 256 single-byte tokens in byte order means sentencepiece with byte fallback
  (Llama 2 / TinyLlama): BPE when the scores fall with the id, Unigram otherwise, with the
  "▁" dummy prefix and space replacement of Llama 2's tokenizer.json;
- all 256 bytes as tokens in another order is byte-level BPE (GPT-2 alphabet), its split regex
  guessed from tokens only one regex can produce (_split_regex);
- anything else is sentencepiece-style without byte fallback (unknown characters -> <unk>).
Merges come from the ranks the way transformers rebuilds tiktoken vocabularies: every split of
a token into two tokens is a merge, ordered by the rank of the result. The result is a
tokenizers.Tokenizer; `Tokenizer.exact` is False and a warning says so.
"""
from __future__ import annotations

import json
import re

from dllama.formats import TokenizerFile
from dllama.tokenizer.from_hf import SENTENCEPIECE_SPACE, byte_level_decoder

GPT2_SPLIT = None  # ByteLevel's own regex
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPECIAL_SHAPE = re.compile(rb"^<\|[^\s|]+\|>$|^<[/a-z_]+>$|^\[[A-Z_]+\]$")


def byte_fallback_start(tf: TokenizerFile) -> int | None:
    """Id of the first of 256 consecutive single-byte tokens b"\\x00".."\\xff", if any."""
    for start, tok in enumerate(tf.tokens):
        if tok == b"\x00" and start + 256 <= tf.vocab_size:
            if all(tf.tokens[start + j] == bytes([j]) for j in range(256)):
                return start
    return None


def special_ids(tf: TokenizerFile, below: int = 0) -> list[int]:
    ids = set(range(below)) | {tf.bos_id} | set(tf.eos_ids)
    ids |= {i for i, tok in enumerate(tf.tokens) if _SPECIAL_SHAPE.match(tok)}
    return sorted(i for i in ids if 0 <= i < tf.vocab_size)


def derive_merges(vocab: dict[str, int], rank: dict[str, float]) -> list[list[str]]:
    """All (left, right) with left, right and left+right in the vocabulary, by the result's rank."""
    merges = []
    for token in vocab:
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                merges.append((rank[token], rank[left], rank[right], left, right))
    merges.sort()
    return [[left, right] for *_, left, right in merges]


def _added(tf: TokenizerFile, ids: list[int]) -> list[dict]:
    return [{"id": i, "content": tf.tokens[i].decode("utf-8", "replace"), "single_word": False, "lstrip": False,
             "rstrip": False, "normalized": False, "special": True} for i in ids]


def _split_regex(tokens: list[bytes]) -> str | None:
    """The pre-tokenizer regex, judged from tokens only one of them can produce: GPT-2's keeps
    digit runs whole with a leading space and lets spaces follow a newline; Llama 3's groups
    digits by three; Qwen's takes them one by one."""
    if any(re.search(rb"\n[ \t]|^ [0-9]|[0-9]{4}", tok) for tok in tokens):
        return GPT2_SPLIT
    longest = max((len(m) for tok in tokens for m in re.findall(rb"[0-9]+", tok)), default=0)
    if longest <= 1:
        return QWEN_SPLIT
    return LLAMA3_SPLIT


def byte_level_json(tf: TokenizerFile) -> dict:
    specials = special_ids(tf)
    skip = set(specials)
    to_char = {b: ch for ch, b in byte_level_decoder().items()}
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tf.tokens):
        if i not in skip:
            vocab.setdefault("".join(to_char[b] for b in tok), i)
    rank = {piece: float(i) for piece, i in vocab.items()}
    split = _split_regex([t for i, t in enumerate(tf.tokens) if i not in skip])
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": split is None}
    pre = byte_level if split is None else {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": split}, "behavior": "Isolated", "invert": False}, byte_level]}
    model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
             "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
             "vocab": vocab, "merges": derive_merges(vocab, rank)}
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": _added(tf, specials),
            "normalizer": None, "pre_tokenizer": pre, "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": model}


def _sentencepiece_piece(tok: bytes) -> str | None:
    try:
        return tok.decode("utf-8").replace(" ", SENTENCEPIECE_SPACE)
    except UnicodeDecodeError:
        return None  # not a whole piece of text: no merge can reach it


def has_every_byte(tf: TokenizerFile) -> bool:
    """Byte-level BPE keeps all 256 bytes as tokens (in GPT-2's order, not byte order)."""
    return len({tok for tok in tf.tokens if len(tok) == 1}) == 256


def sentencepiece_json(tf: TokenizerFile, byte_start: int | None) -> dict:
    """byte_start None: no byte fallback (unknown characters become <unk>)."""
    fallback = byte_start is not None
    byte_start = byte_start if fallback else 0
    specials = special_ids(tf, below=byte_start)
    skip = set(specials)
    pieces: dict[str, int] = {}
    for i, tok in enumerate(tf.tokens):
        if fallback and byte_start <= i < byte_start + 256:
            pieces[f"<0x{i - byte_start:02X}>"] = i
        elif i not in skip:
            piece = _sentencepiece_piece(tok)
            if piece is not None:
                pieces.setdefault(piece, i)
    unk = next((i for i in specials if tf.tokens[i] == b"<unk>"), None)
    unk_text = None if unk is None else "<unk>"
    normal = [i for i in range(byte_start + 256 if fallback else 0, tf.vocab_size) if i not in skip]
    # sentencepiece BPE scores are -rank (whole numbers); unigram scores are log probabilities
    # (also sorted, so only their fractions tell them apart)
    ranked = all(float(tf.scores[i]).is_integer() for i in normal)
    ranked = ranked and all(tf.scores[a] >= tf.scores[b] for a, b in zip(normal, normal[1:]))
    if ranked:
        rank = {piece: -tf.scores[i] for piece, i in pieces.items()}
        vocab = dict(pieces) | {tf.tokens[i].decode("utf-8", "replace"): i for i in specials}
        model = {"type": "BPE", "dropout": None, "unk_token": unk_text, "continuing_subword_prefix": None,
                 "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": fallback, "ignore_merges": False,
                 "vocab": vocab, "merges": derive_merges(pieces, rank)}
    else:
        by_id = {i: piece for piece, i in pieces.items()}
        by_id.update({i: tf.tokens[i].decode("utf-8", "replace") for i in specials})
        entries = [[by_id.get(i, f"<unused{i}>"), float(tf.scores[i])] for i in range(tf.vocab_size)]
        model = {"type": "Unigram", "unk_id": unk, "vocab": entries, "byte_fallback": fallback}
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": _added(tf, specials),
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": SENTENCEPIECE_SPACE},
                {"type": "Replace", "pattern": {"String": " "}, "content": SENTENCEPIECE_SPACE}]},
            "pre_tokenizer": None, "post_processor": None,
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": SENTENCEPIECE_SPACE}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
            "model": model}


def reconstruct_tokenizer_json(tf: TokenizerFile) -> tuple[str, str]:
    """(tokenizer.json text, which family was assumed)."""
    start = byte_fallback_start(tf)
    if start is not None:
        return json.dumps(sentencepiece_json(tf, start)), "sentencepiece-style BPE/Unigram with byte fallback"
    if has_every_byte(tf):
        return json.dumps(byte_level_json(tf)), "byte-level BPE"
    return json.dumps(sentencepiece_json(tf, None)), "sentencepiece-style BPE without byte fallback"
