"""The `.t` tokenizer file (FORMAT.md §4) and our extension after its vocabulary (docs/FORMAT.md)."""
from __future__ import annotations

import enum
import io
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from dllama.errors import FormatError

TOKENIZER_MAGIC = 0x567124
OLD_TOKENIZER_MAGIC = 0x567123


class TokKey(enum.IntEnum):
    VERSION = 0
    VOCAB_SIZE = 1
    MAX_TOKEN_LENGTH = 2
    BOS_ID = 3
    EOS_ID = 4
    PAD_ID = 5
    CHAT_EOS_ID = 6
    CHAT_TEMPLATE = 7
    CHAT_STOP = 8
    N_EOS_TOKENS = 9
    ADD_BOS = 10


def padded_vocabulary(model_vocab: int, tokenizer_vocab: int) -> bool:
    """A tokenizer smaller than the model's embedding, as in checkpoints that pad it (Qwen3: 151936
    rows, 151669 tokens): the extra rows are never produced and the reference runtime only notes it.
    A tokenizer larger than the embedding, or under half of it, belongs to another model."""
    return model_vocab // 2 <= tokenizer_vocab < model_vocab


EXTENSION_MAGIC = b"DLXT"
EXTENSION_VERSION = 1
# Bounds a reader believes (issue 28): the largest tokenizer.json on the hub (Gemma 3's) is 33 MB,
# a whole `.t` with it ~40 MB
MAX_EMBEDDED_BYTES = 128 << 20  # one embedded section, decompressed
MAX_TOKENIZER_FILE_BYTES = 512 << 20
MIN_TOKEN_RECORD = 9  # score, length and at least one byte


class EmbeddedKind(enum.IntEnum):
    """What an extension section after the vocabulary carries."""

    TOKENIZER_JSON = 1     # Hugging Face tokenizer.json (utf-8)
    SENTENCEPIECE = 2      # sentencepiece tokenizer.model (serialized ModelProto)
    TOKENIZER_CONFIG = 3   # tokenizer_config.json (utf-8), for special-token flags


@dataclass(frozen=True)
class EmbeddedSource:
    kind: EmbeddedKind
    data: bytes


@dataclass
class TokenizerFile:
    """Everything a `.t` holds. `tokens[i]` are raw bytes, `scores[i]` float32."""

    tokens: list[bytes]
    scores: list[float]
    bos_id: int
    eos_ids: list[int]
    chat_template: str | None = None
    add_bos: bool = True
    version: int = 1
    max_token_length: int | None = None
    embedded: list[EmbeddedSource] = field(default_factory=list)
    # keys the reference also reads but our converter does not write
    legacy_eos_id: int | None = None
    pad_id: int | None = None
    chat_eos_id: int | None = None

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def embedded_source(self, kind: EmbeddedKind) -> bytes | None:
        for section in self.embedded:
            if section.kind == kind:
                return section.data
        return None

    def to_bytes(self, with_extension: bool = True) -> bytes:
        buf = io.BytesIO()
        self.write(buf, with_extension=with_extension)
        return buf.getvalue()

    def write(self, f: BinaryIO, with_extension: bool = True) -> None:
        if len(self.scores) != len(self.tokens):
            raise FormatError(f"{len(self.tokens)} tokens but {len(self.scores)} scores")
        for i, tok in enumerate(self.tokens):
            if not tok:
                raise FormatError(f"token {i} is empty; the format needs at least one byte per token")
        template = self.chat_template.encode("utf-8") if self.chat_template else b""
        max_len = self.max_token_length or max(len(t) for t in self.tokens)
        pairs = [
            (TokKey.BOS_ID, self.bos_id), (TokKey.VERSION, self.version),
            (TokKey.VOCAB_SIZE, self.vocab_size), (TokKey.MAX_TOKEN_LENGTH, max_len),
        ]
        if template:
            pairs.append((TokKey.CHAT_TEMPLATE, len(template)))
        pairs += [(TokKey.N_EOS_TOKENS, len(self.eos_ids)), (TokKey.ADD_BOS, int(self.add_bos))]
        f.write(struct.pack("<2i", TOKENIZER_MAGIC, 8 + 8 * len(pairs)))
        f.write(struct.pack(f"<{2 * len(pairs)}i", *[int(v) for p in pairs for v in p]))
        f.write(template)
        f.write(struct.pack(f"<{len(self.eos_ids)}i", *self.eos_ids))
        records = bytearray()
        for tok, score in zip(self.tokens, self.scores):
            records += struct.pack("<fI", score, len(tok)) + tok
        f.write(records)
        if with_extension:
            for section in self.embedded:
                f.write(_extension_section(section))


def _extension_section(section: EmbeddedSource) -> bytes:
    packed = zlib.compress(section.data, 6)
    return (EXTENSION_MAGIC + struct.pack("<5I", EXTENSION_VERSION, int(section.kind), 1, len(section.data),
                                          len(packed))
            + struct.pack("<I", zlib.crc32(section.data)) + packed)


_EXT_HEADER = struct.Struct("<4s6I")  # magic, version, kind, compression, raw_len, stored_len, crc32


def _check_tokenizer_magic(data: bytes, where: str) -> None:
    if len(data) < 8:
        raise FormatError(f"{where} is truncated: {len(data)} bytes, too short for a header")
    magic = struct.unpack_from("<i", data)[0]
    if magic not in (TOKENIZER_MAGIC, OLD_TOKENIZER_MAGIC):
        raise FormatError(f"{where} is not a distributed-llama tokenizer: bad magic {magic & 0xFFFFFFFF:#x} (expected "
                          f"{TOKENIZER_MAGIC:#x})")


def parse_tokenizer(data: bytes, where: str = "tokenizer file") -> TokenizerFile:
    _check_tokenizer_magic(data, where)
    header_size = struct.unpack_from("<i", data, 4)[0]
    if header_size < 8 or (header_size - 8) % 8 or header_size > 8 + 8 * 64 or header_size > len(data):
        raise FormatError(f"{where} has an impossible or truncated header (size {header_size})")
    n_pairs = (header_size - 8) // 8
    values = struct.unpack_from(f"<{2 * n_pairs}i", data, 8)
    keys: dict[int, int] = {}
    for key, value in zip(values[0::2], values[1::2]):
        if key not in TokKey.__members__.values():
            raise FormatError(f"{where} has unknown header key {key}")
        keys[key] = value
    if keys.get(TokKey.VERSION) != 1:
        raise FormatError(f"{where} has tokenizer version {keys.get(TokKey.VERSION)}; only version 1 exists")
    vocab_size = keys.get(TokKey.VOCAB_SIZE, 0)
    if not 0 < vocab_size <= (len(data) - header_size) // MIN_TOKEN_RECORD:
        raise FormatError(f"{where} has vocab_size {vocab_size} in its header, impossible for a file of {len(data)} "
                          "bytes; the file is corrupt: convert the tokenizer again")
    pos = header_size
    template = None
    if TokKey.CHAT_TEMPLATE in keys:
        n = keys[TokKey.CHAT_TEMPLATE]
        if n < 0 or pos + n > len(data):
            raise FormatError(f"{where} is truncated inside its chat template")
        template = data[pos:pos + n].decode("utf-8", errors="replace")
        pos += n
    n_eos = keys.get(TokKey.N_EOS_TOKENS, 0)
    if n_eos < 0 or pos + 4 * n_eos > len(data):
        raise FormatError(f"{where} is truncated inside its eos list")
    eos_ids = list(struct.unpack_from(f"<{n_eos}i", data, pos))
    pos += 4 * n_eos
    tokens: list[bytes] = []
    scores: list[float] = []
    for i in range(vocab_size):
        if pos + 8 > len(data):
            raise FormatError(f"{where} is truncated: vocabulary ends after {i} of {vocab_size} tokens")
        score, length = struct.unpack_from("<fI", data, pos)
        pos += 8
        if length == 0:
            raise FormatError(f"{where} has token {i} of length 0; the file is corrupt")
        if pos + length > len(data):
            raise FormatError(f"{where} is truncated inside token {i} of {vocab_size}")
        tokens.append(bytes(data[pos:pos + length]))
        scores.append(score)
        pos += length
    bos_id = keys.get(TokKey.BOS_ID, -1)
    for name, tid in [("bos_id", bos_id)] + [("eos id", e) for e in eos_ids]:
        if not 0 <= tid < vocab_size:
            raise FormatError(f"{where} has {name} {tid} outside the vocabulary of {vocab_size} tokens")
    return TokenizerFile(
        tokens=tokens, scores=scores, bos_id=bos_id, eos_ids=eos_ids, chat_template=template,
        add_bos=bool(keys.get(TokKey.ADD_BOS, 1)), version=keys[TokKey.VERSION],
        max_token_length=keys.get(TokKey.MAX_TOKEN_LENGTH), embedded=_parse_extension(data, pos, where),
        legacy_eos_id=keys.get(TokKey.EOS_ID), pad_id=keys.get(TokKey.PAD_ID), chat_eos_id=keys.get(TokKey.CHAT_EOS_ID),
    )


def vocabulary_end(data: bytes) -> int:
    """Offset where the reference reader stops: the extension (if any) starts here."""
    tf = parse_tokenizer(data)
    return len(tf.to_bytes(with_extension=False))


def _parse_extension(data: bytes, pos: int, where: str) -> list[EmbeddedSource]:
    sections = []
    while pos < len(data):
        if len(data) - pos < _EXT_HEADER.size:
            raise FormatError(f"{where} has {len(data) - pos} stray bytes after the vocabulary")
        magic, version, kind, compression, raw_len, stored_len, crc = _EXT_HEADER.unpack_from(data, pos)
        if magic != EXTENSION_MAGIC:
            raise FormatError(f"{where} has unknown data after the vocabulary (no {EXTENSION_MAGIC!r} extension magic)")
        if version != EXTENSION_VERSION:
            raise FormatError(f"{where} has extension version {version}; this dllama reads version {EXTENSION_VERSION}")
        pos += _EXT_HEADER.size
        if pos + stored_len > len(data):
            raise FormatError(f"{where} is truncated inside its embedded tokenizer")
        if raw_len > MAX_EMBEDDED_BYTES:
            raise FormatError(f"{where} says its embedded tokenizer expands to {raw_len} bytes, more than the "
                              f"{MAX_EMBEDDED_BYTES >> 20} MiB any tokenizer needs; the file is corrupt")
        raw = _section_bytes(bytes(data[pos:pos + stored_len]), compression, raw_len, where)
        pos += stored_len
        if len(raw) != raw_len or zlib.crc32(raw) != crc:
            raise FormatError(f"{where} has a corrupt embedded tokenizer (length or checksum mismatch)")
        try:
            sections.append(EmbeddedSource(EmbeddedKind(kind), raw))
        except ValueError:
            pass  # a newer kind we cannot use: skip it, as the reference skips all of them
    return sections


def _section_bytes(stored: bytes, compression: int, raw_len: int, where: str) -> bytes:
    """A section's data, decompressed to at most raw_len + 1 bytes: a zip bomb stops there."""
    if compression == 0:
        return stored
    if compression != 1:
        raise FormatError(f"{where} has an embedded tokenizer with unknown compression {compression}")
    inflate = zlib.decompressobj()
    try:
        raw = inflate.decompress(stored, raw_len + 1)
    except zlib.error:
        raise FormatError(f"{where} has a corrupt embedded tokenizer (its zlib stream is broken)") from None
    if not inflate.eof:
        raise FormatError(f"{where} has a corrupt embedded tokenizer (it expands beyond its stated {raw_len} bytes "
                          "or ends early)")
    return raw


def read_tokenizer(path: str | os.PathLike) -> TokenizerFile:
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise FormatError(f"tokenizer file {path} does not exist") from None
    with open(path, "rb") as f:
        head = f.read(8)
        _check_tokenizer_magic(head, str(path))
        if size > MAX_TOKENIZER_FILE_BYTES:
            raise FormatError(f"tokenizer file {path} is {size} bytes, more than any tokenizer needs; is it a model "
                              "file?")
        data = head + f.read()
    return parse_tokenizer(data, where=str(path))
