"""Hugging Face tokenizer folder -> TokenizerFile (the `.t` contents), as the reference converter does.

Sources (FORMAT.md §4): a sentencepiece `tokenizer.model`, or `tokenizer.json` alone, either
byte-level BPE (GPT-2 byte alphabet: Llama 3, Qwen) or sentencepiece-style BPE with byte
fallback (Llama 2, TinyLlama). The original files are embedded after the vocabulary so our
runtime can tokenize exactly like Hugging Face (docs/FORMAT.md).
"""
from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from pathlib import Path

from dllama.errors import DllamaError
from dllama.formats import HEADER_LIMITS, EmbeddedKind, EmbeddedSource, TokenizerFile


class TokenizerConversionError(DllamaError, ValueError):
    """The tokenizer files cannot be turned into a `.t`."""


# tokenizer_config.json keys our runtime reads back from the extension (dllama/tokenizer/faithful.py, core.py)
EMBEDDED_CONFIG_KEYS = ("add_bos_token", "add_eos_token", "additional_special_tokens", "added_tokens_decoder",
                        "bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


SENTENCEPIECE_SPACE = "\u2581"
MAX_TOKEN_ID = HEADER_LIMITS["vocab_size"][1]  # a larger id would make a vocabulary no `.m` can hold
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable character -> the byte it stands for."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"),
                                                                                                       ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise TokenizerConversionError(f"{path} is not UTF-8 text; download it again") from None
    except json.JSONDecodeError as e:
        raise TokenizerConversionError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        raise TokenizerConversionError(f"{path} nests too deeply to be a tokenizer file") from None
    if not isinstance(value, dict):
        raise TokenizerConversionError(f"{path} holds a JSON {type(value).__name__}, not an object")
    return value


def _malformed(path: Path, what: str) -> TokenizerConversionError:
    return TokenizerConversionError(f"{path} has a malformed {what}; download it again")


def _is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MAX_TOKEN_ID


def _optional_json(path: Path) -> dict:
    return _read_json(path) if path.is_file() else {}


def chat_template_of(folder: Path, tokenizer_config: dict) -> str | None:
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if template is not None and not isinstance(template, str):
        raise _malformed(folder / "tokenizer_config.json", "chat_template (not text)")
    jinja_file = folder / "chat_template.jinja"
    if not template and jinja_file.is_file():  # transformers 5 keeps it beside the config
        template = jinja_file.read_text(encoding="utf-8")
    return template or None


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def convert_tokenizer(folder: str | os.PathLike, embed: bool = True) -> TokenizerFile:
    """Build the `.t` contents for a Hugging Face model folder."""
    folder = Path(folder)
    tokenizer_config = _optional_json(folder / "tokenizer_config.json")
    model_config = _optional_json(folder / "config.json")
    if (folder / "tokenizer.model").is_file():
        tf = _from_sentencepiece(folder / "tokenizer.model")
        kind = EmbeddedKind.SENTENCEPIECE
        source = (folder / "tokenizer.model").read_bytes()
        tf.add_bos = bool(tokenizer_config.get("add_bos_token", True))
    elif (folder / "tokenizer.json").is_file():
        source = (folder / "tokenizer.json").read_bytes()
        tokenizer_json = _read_json(folder / "tokenizer.json")
        tf = tokenizer_file_from_json(tokenizer_json, tokenizer_config, model_config, folder / "tokenizer.json")
        kind = EmbeddedKind.TOKENIZER_JSON
        tf.add_bos = bos_added(tokenizer_json, tokenizer_config)
    else:
        raise TokenizerConversionError(f"{folder} has neither tokenizer.model nor tokenizer.json; copy the model's "
                                       "tokenizer files there")
    tf.chat_template = chat_template_of(folder, tokenizer_config)
    if embed:
        tf.embedded = embedded_sources(kind, source, tokenizer_config)
    return tf


def embedded_sources(kind: EmbeddedKind, source: bytes, tokenizer_config: dict) -> list[EmbeddedSource]:
    """The extension sections: the tokenizer itself, then the tokenizer_config keys faithful mode reads
    (sorted, so a `.t` does not depend on which tool wrote the config's other keys)."""
    sections = [EmbeddedSource(kind, source)]
    kept = {key: tokenizer_config[key] for key in sorted(EMBEDDED_CONFIG_KEYS) if key in tokenizer_config}
    if kept:
        sections.append(EmbeddedSource(EmbeddedKind.TOKENIZER_CONFIG, json.dumps(kept).encode("utf-8")))
    return sections


def bos_added(tokenizer_json: dict, tokenizer_config: dict) -> bool:
    """The `.t` ADD_BOS flag. The reference converter writes add_bos_token, defaulting to true; when
    the config does not say, a tokenizer.json decides by its post-processor, as transformers does,
    so that the reference runtime does not put a bos before prompts Hugging Face leaves without."""
    if "add_bos_token" in tokenizer_config:
        return bool(tokenizer_config["add_bos_token"])
    return _adds_leading_special(tokenizer_json.get("post_processor"))


def _adds_leading_special(processor) -> bool:
    """Whether a tokenizer.json post-processor puts a special token before the text."""
    if not isinstance(processor, dict):
        return False
    kind = processor.get("type")
    if kind == "TemplateProcessing":
        single = processor.get("single") or []
        return bool(single) and isinstance(single[0], dict) and "SpecialToken" in single[0]
    if kind == "Sequence":
        processors = processor.get("processors")
        return isinstance(processors, list) and any(_adds_leading_special(p) for p in processors)
    return kind in ("BertProcessing", "RobertaProcessing")


def _from_sentencepiece(path: Path) -> TokenizerFile:
    import sentencepiece

    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
        raise TokenizerConversionError(f"{path} is not a readable sentencepiece model ({e})") from None
    tokens, scores = [], []
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        match = _BYTE_PIECE.match(piece) if sp.is_byte(i) else None
        tokens.append(bytes([int(match.group(1), 16)]) if match else piece.replace(SENTENCEPIECE_SPACE,
                                                                                   " ").encode("utf-8"))
        scores.append(sp.get_score(i))
    eos = sp.eos_id()
    return TokenizerFile(tokens=tokens, scores=scores, bos_id=sp.bos_id(), eos_ids=[eos] if eos >= 0 else [])


def _is_byte_level(tok: dict) -> bool:
    def has_byte_level(node) -> bool:
        if not isinstance(node, dict):
            return False
        if node.get("type") == "ByteLevel":
            return True
        return any(has_byte_level(n) for key in ("pretokenizers", "decoders")
                   for n in (node.get(key) if isinstance(node.get(key), list) else []))

    return has_byte_level(tok.get("pre_tokenizer")) or has_byte_level(tok.get("decoder"))


def tokenizer_file_from_json(tok: dict, tokenizer_config: dict, model_config: dict, path: Path) -> TokenizerFile:
    """A parsed tokenizer.json -> `.t` vocabulary as the reference converter builds it (scores -id)."""
    model = tok.get("model") or {}
    if not isinstance(model, dict):
        raise _malformed(path, "model (not an object)")
    vocab, added = _vocab(model, path), _added_tokens(tok, path)
    by_id: dict[int, str] = {i: piece for piece, i in vocab.items()}
    by_id.update({i: text for text, i in added.items()})
    size = max(by_id) + 1 if by_id else 0
    holes = [i for i in range(size) if i not in by_id]
    if holes:
        raise TokenizerConversionError(f"{path} has no token for id {holes[0]} ({len(holes)} ids missing); the "
                                       "vocabulary must be contiguous")
    byte_level = _is_byte_level(tok)
    byte_map = byte_level_decoder()
    added_ids = set(added.values())
    tokens, scores = [], []
    for i in range(size):
        piece = by_id[i]
        if i in added_ids:
            data = piece.encode("utf-8")
        elif byte_level:
            data = bytes(b for ch in piece for b in ([byte_map[ch]] if ch in byte_map else ch.encode("utf-8")))
        else:
            match = _BYTE_PIECE.match(piece) if model.get("byte_fallback") else None
            data = bytes([int(match.group(1), 16)]) if match else piece.replace(SENTENCEPIECE_SPACE,
                                                                                " ").encode("utf-8")
        tokens.append(data)
        scores.append(-float(i))
    return TokenizerFile(
        tokens=tokens, scores=scores,
        bos_id=_special_id("bos", model_config, tokenizer_config, added, vocab, path),
        eos_ids=_eos_ids(model_config, tokenizer_config, added, vocab, path),
    )


def _vocab(model: dict, path: Path) -> dict[str, int]:
    raw = model.get("vocab") or ({} if model.get("type") != "Unigram" else [])
    if model.get("type") == "Unigram":  # vocab is a list of [piece, score]
        if not (isinstance(raw, list) and len(raw) < MAX_TOKEN_ID
                and all(isinstance(e, list) and len(e) == 2 and isinstance(e[0], str) for e in raw)):
            raise _malformed(path, "Unigram vocab (not a list of [piece, score])")
        return {piece: i for i, (piece, _score) in enumerate(raw)}
    if not (isinstance(raw, dict) and all(_is_id(i) for i in raw.values())):
        raise _malformed(path, f"vocab (not an object of piece -> id below {MAX_TOKEN_ID})")
    return dict(raw)


def _added_tokens(tok: dict, path: Path) -> dict[str, int]:
    added = tok.get("added_tokens") or []
    if not (isinstance(added, list) and all(isinstance(t, dict) and isinstance(t.get("content"), str)
                                            and _is_id(t.get("id")) for t in added)):
        raise _malformed(path, f"added_tokens (not a list of {{content, id}} with ids below {MAX_TOKEN_ID})")
    return {t["content"]: t["id"] for t in added}


def _lookup(text: str | None, added: dict[str, int], vocab: dict[str, int]) -> int | None:
    if text is None:
        return None
    return added.get(text, vocab.get(text))


def _special_id(kind: str, model_config: dict, tokenizer_config: dict, added, vocab, path: Path) -> int:
    value = model_config.get(f"{kind}_token_id")
    if isinstance(value, list):
        value = value[0] if value else None
    if value is None:
        value = _lookup(_token_text(tokenizer_config.get(f"{kind}_token")), added, vocab)
    if value is None:
        raise TokenizerConversionError(
            f"no {kind} token: set {kind}_token_id in config.json or {kind}_token in tokenizer_config.json beside "
            f"{path.name}")
    if not _is_id(value):
        raise _malformed(path.parent / "config.json", f"{kind}_token_id {str(value)[:30]!r} (not a token id)")
    return value


def _eos_ids(model_config: dict, tokenizer_config: dict, added, vocab, path: Path) -> list[int]:
    value = model_config.get("eos_token_id")
    if value is None:
        return [_special_id("eos", model_config, tokenizer_config, added, vocab, path)]
    ids = value if isinstance(value, list) else [value]
    if not ids or not all(_is_id(v) for v in ids):
        raise _malformed(path.parent / "config.json", f"eos_token_id {str(value)[:30]!r} (not token ids)")
    return ids
