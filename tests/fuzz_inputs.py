"""Corrupted real files against every reader (issue 28): structure-aware mutations, each run in a
forked child with a memory cap and a deadline.

The bases are real files: the conformance fixtures' `.m`, `.t` (with and without the embedded
tokenizer), safetensors, config.json, tokenizer.json and a sharded index made from them, a small
GGUF written from tiny-llama as llama.cpp writes one (gguf_helpers.py), and SmolLM2's GGUF header
region (its metadata: 49k tokens, merges, chat template; the tensor data left as a sparse hole).
Mutations know each format's fields (header keys, counts, lengths, offsets, value types,
safetensors entries, config keys) and also truncate, append and flip bits. Hypothesis draws them
(derandomized: CI runs the same cases every time).

Each (case, reader) runs in a child forked from a process that imported everything once: the
child caps its address space at what it already maps + MEMORY_CAP, runs the command line's own
entry point with stderr to a file, and reports by exit status; the parent kills it at the
deadline. Outcomes:
    error       exit != 0 and exactly one `error:` line on stderr, naming the mutated file
    check       dllama-validate's report: exit 1 with a FAIL verdict (its answer to a broken file)
    accepted    exit 0; a mutation whose result is still a well-formed file may be accepted
    BAD: accepted-bad (exit 0 on a file that must be refused), traceback, hang, over-memory
         (MemoryError under the cap, or killed by a signal), unclear (no single `error:` line naming the file)

    python tests/fuzz_inputs.py --jobs 2 [--json out.json]   # the run docs/ROBUSTNESS.md quotes
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import select
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
import zlib
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFORMANCE = ROOT / "tests" / "fixtures" / "conformance"
SMOLLM2_CONFIG_FILES = ROOT / "tests" / "fixtures" / "smollm2"

MEMORY_CAP = 1 << 30  # what a reader may allocate beyond what the forked child already maps
DEADLINE_S = 60.0  # per run; a healthy run takes well under 2 s (a shared, noisy 2-core machine)
EXIT_OVER_MEMORY, EXIT_TRACEBACK = 97, 98
BAD_OUTCOMES = ("accepted-bad", "traceback", "hang", "over-memory", "unclear")

# cases per base, about 600 in all: the suite's size (issue 28 asks for at least 500)
QUOTAS = {"m_llama_q40": 90, "m_qwen3_f32": 60, "t_plain": 45, "t_embedded": 60, "safetensors": 75,
          "config": 60, "index": 25, "tokenizer_json": 20, "tokenizer_config": 10, "gguf": 110, "smollm2": 40}

# the readers each kind of input goes through
READERS = {
    "m": ("plan", "run", "validate", "worker"),
    "t": ("run", "validate"),
    "hf": ("convert-hf",),
    "gguf": ("convert-gguf",),
    "smollm2": ("plan-conversion",),  # up to the first output byte: its tensors are a hole here
}


# --------------------------------------------------------------------------------------------
# Blobs and edits: a file's bytes plus a hole of zeros (SmolLM2's tensor data is never read here)

@dataclass
class Blob:
    data: bytearray
    hole: int = 0  # zero bytes after data

    @property
    def size(self) -> int:
        return len(self.data) + self.hole

    def write(self, path: Path) -> None:
        with open(path, "wb") as f:
            f.write(self.data)
            f.truncate(self.size)


@dataclass(frozen=True)
class Case:
    base: str         # key of QUOTAS
    label: str        # what was changed, e.g. "n_layers=2147483647"
    edits: tuple      # ("put", offset, bytes) | ("truncate", size) | ("append", bytes) | ("flip", bit)
    must_refuse: bool  # False: the result may still be a well-formed file
    target: str = ""  # for folder bases: the file the edits apply to (others are the base's)


def apply(blob: Blob, edits: tuple) -> Blob:
    out = Blob(bytearray(blob.data), blob.hole)
    for edit in edits:
        op = edit[0]
        if op == "put":
            _, offset, raw = edit
            out.data[offset:offset + len(raw)] = raw
        elif op == "truncate":
            n = edit[1]
            if n <= len(out.data):
                out.data, out.hole = out.data[:n], 0
            else:
                out.hole = n - len(out.data)
        elif op == "append":
            out.data += bytes(out.hole) + edit[1]
            out.hole = 0
        elif op == "flip":
            bit = edit[1]
            if bit // 8 < len(out.data):
                out.data[bit // 8] ^= 1 << (bit % 8)
        elif op == "replace":  # whole content (JSON mutations)
            out.data, out.hole = bytearray(edit[1]), 0
    return out


# --------------------------------------------------------------------------------------------
# Structure maps, parsed here independently of dllama's readers

I32_ABSURD = (0, -1, 1, -(2**31), 2**31 - 1, 1 << 20, 1 << 30)


@dataclass
class Field:
    name: str
    offset: int
    fmt: str          # struct format of the stored value
    value: int
    refuse_any_change: bool = False  # the value decides sizes or structure: any other value is a broken file
    refuse_values: tuple = ()        # values that must be refused wherever they appear


M_SIZE_KEYS = {2: "dim", 3: "hidden_dim", 4: "n_layers", 5: "n_heads", 6: "n_kv_heads", 7: "n_experts",
               9: "vocab_size", 13: "weights_float_type", 19: "head_dim", 21: "moe_hidden_dim"}
M_POSITIVE_KEYS = {**M_SIZE_KEYS, 10: "max_seq_len"}


def m_fields(data: bytes) -> list[Field]:
    magic, header_size = struct.unpack_from("<2i", data)
    fields = [Field("magic", 0, "<i", magic, True), Field("header_size", 4, "<i", header_size, True)]
    for i in range((header_size - 8) // 8):
        key, value = struct.unpack_from("<2i", data, 8 + 8 * i)
        name = M_POSITIVE_KEYS.get(key, f"key{key}")
        fields.append(Field(f"key#{i}", 8 + 8 * i, "<i", key, refuse_values=(-1, 99, 2**31 - 1)))
        absurd = (0, -1, -(2**31), 2**31 - 1, 1 << 30) if key in M_POSITIVE_KEYS else ()
        fields.append(Field(name, 12 + 8 * i, "<i", value, key in M_SIZE_KEYS, absurd))
    return fields


def t_fields(data: bytes) -> tuple[list[Field], list[int]]:
    """Header pairs and extension section fields of a `.t`; and the offsets where a cut leaves a whole file."""
    header_size = struct.unpack_from("<i", data, 4)[0]
    fields = [Field("magic", 0, "<i", struct.unpack_from("<i", data)[0], True),
              Field("header_size", 4, "<i", header_size, True)]
    keys = {}
    for i in range((header_size - 8) // 8):
        key, value = struct.unpack_from("<2i", data, 8 + 8 * i)
        keys[key] = value
        names = {0: "version", 1: "vocab_size", 2: "max_token_length", 3: "bos_id", 7: "chat_template_len",
                 9: "n_eos", 10: "add_bos"}
        name = names.get(key, f"key{key}")
        refuse_change = key in (0, 1)
        absurd = {1: (0, -1, 2**31 - 1, 1 << 24), 3: (-1, 2**31 - 1, 1 << 20), 7: (-1, 2**31 - 1, 1 << 30),
                  9: (-1, 2**31 - 1, 1 << 28)}.get(key, ())
        fields.append(Field(name, 12 + 8 * i, "<i", value, refuse_change, absurd))
        fields.append(Field(f"key#{i}", 8 + 8 * i, "<i", key, refuse_values=(-5, 11, 1000)))
    pos = header_size + keys.get(7, 0) + 4 * keys.get(9, 0)
    for _ in range(keys[1]):
        pos += 8 + struct.unpack_from("<I", data, pos + 4)[0]
    whole = [pos]
    token0_length = header_size + keys.get(7, 0) + 4 * keys.get(9, 0) + 4
    fields.append(Field("token0.length", token0_length, "<I", struct.unpack_from("<I", data, token0_length)[0],
                        refuse_values=(0, 2**32 - 1, 1 << 30)))
    section = 0
    while pos + 28 <= len(data):
        _magic, version, kind, compression, raw_len, stored_len, crc = struct.unpack_from("<4s6I", data, pos)
        p = f"section{section}."
        fields += [Field(p + "magic", pos, "<I", struct.unpack_from("<I", data, pos)[0], True),
                   Field(p + "version", pos + 4, "<I", version, True),
                   Field(p + "kind", pos + 8, "<I", kind),
                   Field(p + "compression", pos + 12, "<I", compression, True),
                   Field(p + "raw_len", pos + 16, "<I", raw_len, True),
                   Field(p + "stored_len", pos + 20, "<I", stored_len, True),
                   Field(p + "crc32", pos + 24, "<I", crc, True)]
        pos += 28 + stored_len
        whole.append(pos)
        section += 1
    return fields, whole


def gguf_fields(data: bytes) -> tuple[list[Field], int, list[tuple[int, int]]]:
    """GGUF header, metadata and tensor-info fields; the data start; each tensor's (offset field, size)."""
    fields = [Field("magic", 0, "<I", struct.unpack_from("<I", data)[0], True),
              Field("version", 4, "<I", struct.unpack_from("<I", data, 4)[0], refuse_values=(0, 1, 4, 2**32 - 1))]
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    fields += [Field("n_tensors", 8, "<Q", n_tensors, True), Field("n_kv", 16, "<Q", n_kv, True)]
    pos = 24
    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "B", 10: "Q", 11: "q", 12: "d"}
    alignment = 32

    def string(at: int) -> tuple[str, int]:
        n = struct.unpack_from("<Q", data, at)[0]
        return data[at + 8:at + 8 + n].decode("utf-8", "replace"), at + 8 + n

    def skip_value(vtype: int, at: int) -> int:
        if vtype == 8:
            return string(at)[1]
        if vtype == 9:
            item, count = struct.unpack_from("<IQ", data, at)
            at += 12
            if item in scalar:
                return at + count * struct.calcsize(scalar[item])
            for _ in range(count):
                at = skip_value(item, at)
            return at
        return at + struct.calcsize(scalar[vtype])

    size_keys = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count",
                 "attention.head_count_kv", "context_length")
    for _ in range(n_kv):
        key_at = pos
        key, pos = string(pos)
        vtype = struct.unpack_from("<I", data, pos)[0]
        fields.append(Field(f"{key}:type", pos, "<I", vtype, refuse_values=(13, 99, 2**32 - 1)))
        fields.append(Field(f"{key}:key_len", key_at, "<Q", len(key.encode()), refuse_values=(2**63, 2**40)))
        pos += 4
        if vtype in scalar:
            short = key.split(".", 1)[-1]
            value = struct.unpack_from("<" + scalar[vtype], data, pos)[0]
            absurd = {"general.alignment": (0, 3, 1 << 30), "tokenizer.ggml.bos_token_id": (2**31 - 1, 10**6),
                      "tokenizer.ggml.eos_token_id": (2**31 - 1, 10**6)}.get(key, ())
            if short in size_keys:
                absurd = (0, 2**32 - 1, 10**9)
            if key == "general.alignment":
                alignment = value
            if isinstance(value, int):  # block_count: any other value drops or misses a layer
                fields.append(Field(key, pos, "<" + scalar[vtype], value, short == "block_count", absurd))
        elif vtype == 8:
            fields.append(Field(f"{key}:len", pos, "<Q", struct.unpack_from("<Q", data, pos)[0],
                                refuse_values=(2**63, 2**40)))
        elif vtype == 9:
            item, count = struct.unpack_from("<IQ", data, pos)
            fields.append(Field(f"{key}:count", pos + 4, "<Q", count, key in ("tokenizer.ggml.tokens",),
                                (2**63, 2**40, 2**32)))
            fields.append(Field(f"{key}:item_type", pos, "<I", item, key == "tokenizer.ggml.tokens", (13, 9)))
        pos = skip_value(vtype, pos)
    tensors = []
    for _ in range(n_tensors):
        name, pos = string(pos)
        n_dims = struct.unpack_from("<I", data, pos)[0]
        fields.append(Field(f"{name}:n_dims", pos, "<I", n_dims, True, (0, 5, 2**32 - 1)))
        pos += 4
        for d in range(n_dims):
            fields.append(Field(f"{name}:dim{d}", pos, "<Q", struct.unpack_from("<Q", data, pos)[0], True,
                                (0, 2**63, 2**40)))
            pos += 8
        qtype = struct.unpack_from("<I", data, pos)[0]
        fields.append(Field(f"{name}:type", pos, "<I", qtype, False, (99, 2**31)))
        fields.append(Field(f"{name}:offset", pos + 4, "<Q", struct.unpack_from("<Q", data, pos + 4)[0], True,
                            (2**63, 2**40)))
        tensors.append((pos + 4, n_dims))
        pos += 12
    data_start = -(-pos // alignment) * alignment
    return fields, data_start, tensors


# --------------------------------------------------------------------------------------------
# The bases, prepared once in a work folder

@dataclass
class Base:
    key: str
    kind: str                      # READERS key
    blob: Blob                     # the file mutated
    fields: list[Field] = field(default_factory=list)
    whole_cuts: tuple = ()         # truncation sizes that leave a well-formed file
    data_from: int = 0             # first byte of tensor data (flips before it are header flips)
    folder: Path | None = None     # folder bases: the unmutated folder; target names the mutated file
    target: str = ""
    json_value: object = None      # JSON bases: the parsed document
    partner: Path | None = None    # .m <-> .t of the same model for run and validate


def prepare_bases(work: Path, smollm2_gguf: Path | None) -> dict[str, Base]:
    from dllama.converter.convert import convert

    sys.path.insert(0, str(ROOT / "tests"))
    from gguf_helpers import gguf_from_hf_folder, write_gguf_like

    llama, qwen3 = CONFORMANCE / "tiny-llama", CONFORMANCE / "tiny-qwen3"
    bases: dict[str, Base] = {}

    def blob(path: Path) -> Blob:
        return Blob(bytearray(path.read_bytes()))

    plain_t = llama / "expected.t"
    embedded = work / "embedded"
    convert(llama, None, embedded, name="tiny-llama")
    embedded_t = embedded / "dllama_tokenizer_tiny-llama.t"
    for key, path, partner in (("m_llama_q40", llama / "expected_q40.m", plain_t),
                               ("m_qwen3_f32", qwen3 / "expected_f32.m", qwen3 / "expected.t")):
        b = blob(path)
        bases[key] = Base(key, "m", b, m_fields(bytes(b.data)), data_from=struct.unpack_from("<i", b.data, 4)[0],
                          partner=partner)
    for key, path in (("t_plain", plain_t), ("t_embedded", embedded_t)):
        b = blob(path)
        fields, whole = t_fields(bytes(b.data))
        bases[key] = Base(key, "t", b, fields, whole_cuts=tuple(whole), data_from=whole[0],
                          partner=llama / "expected_q40.m")

    folder = work / "tiny-llama"
    shutil.copytree(llama, folder, ignore=shutil.ignore_patterns("expected*", "*.npz"))
    st = blob(folder / "model.safetensors")
    n = struct.unpack_from("<Q", st.data)[0]
    bases["safetensors"] = Base("safetensors", "hf", st, folder=folder, target="model.safetensors",
                                json_value=json.loads(st.data[8:8 + n]), data_from=8 + n)
    for key, name in (("config", "config.json"), ("tokenizer_json", "tokenizer.json"),
                      ("tokenizer_config", "tokenizer_config.json")):
        b = blob(folder / name)
        bases[key] = Base(key, "hf", b, folder=folder, target=name, json_value=json.loads(b.data))
    sharded = work / "tiny-llama-sharded"
    index = write_shards(folder, sharded)
    bases["index"] = Base("index", "hf", blob(index), folder=sharded, target=index.name,
                          json_value=json.loads(index.read_bytes()))

    gguf_path = work / "tiny-llama.gguf"
    gguf_from_hf_folder(folder, gguf_path)
    aligned = write_gguf_like(gguf_path, work / "tiny-llama-aligned.gguf", alignment=64)  # general.alignment stated
    g = blob(aligned)
    fields, data_start, _ = gguf_fields(bytes(g.data))
    bases["gguf"] = Base("gguf", "gguf", g, fields, data_from=data_start)
    if smollm2_gguf is not None:
        head = smollm2_gguf.open("rb").read(8 << 20)
        fields, data_start, _ = gguf_fields(head)
        region = Blob(bytearray(head[:data_start]), smollm2_gguf.stat().st_size - data_start)
        bases["smollm2"] = Base("smollm2", "smollm2", region, fields, data_from=data_start)
    return bases


def write_shards(folder: Path, target: Path) -> Path:
    """tiny-llama's model.safetensors as two shards and their index, as transformers saves big models."""
    shutil.copytree(folder, target, ignore=shutil.ignore_patterns("*.safetensors"))
    raw = (folder / "model.safetensors").read_bytes()
    n = struct.unpack_from("<Q", raw)[0]
    meta = json.loads(raw[8:8 + n])
    meta.pop("__metadata__", None)
    names = sorted(meta, key=lambda k: meta[k]["data_offsets"][0])
    weight_map = {}
    for i, part in enumerate((names[:len(names) // 2], names[len(names) // 2:])):
        shard = f"model-{i + 1:05d}-of-00002.safetensors"
        header, data, at = {}, bytearray(), 0
        for name in part:
            begin, end = meta[name]["data_offsets"]
            header[name] = {**meta[name], "data_offsets": [at, at + end - begin]}
            data += raw[8 + n + begin:8 + n + end]
            at += end - begin
            weight_map[name] = shard
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        (target / shard).write_bytes(struct.pack("<Q", len(text)) + text + data)
    index = target / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": len(raw) - 8 - n}, "weight_map": weight_map}))
    return index


# --------------------------------------------------------------------------------------------
# Mutations as hypothesis strategies

def case_strategy(base: Base):
    from hypothesis import strategies as st

    size = base.blob.size
    options = [
        st.integers(0, size - 1).map(lambda n: Case(base.key, f"truncate to {n}", (("truncate", n),),
                                                    n not in base.whole_cuts, base.target)),
        st.integers(0, 8 * min(len(base.blob.data), base.data_from or len(base.blob.data)) - 1).map(
            lambda bit: Case(base.key, f"flip header bit {bit}", (("flip", bit),), False, base.target)),
    ]
    if not base.blob.hole:  # (SmolLM2's region: appending would write its 100 MB hole)
        options.append(st.binary(min_size=1, max_size=64).map(
            lambda b: Case(base.key, f"append {len(b)} bytes", (("append", b),), base.kind != "gguf", base.target)))
    if base.data_from and base.data_from < len(base.blob.data):
        options.append(st.integers(8 * base.data_from, 8 * len(base.blob.data) - 1).map(
            lambda bit: Case(base.key, f"flip data bit {bit}", (("flip", bit),), False, base.target)))
    if base.data_from and base.kind in ("hf",) and base.key == "safetensors":
        # a weight set to inf or NaN (bf16): the converter must refuse it, not write a model that answers NaN
        options.append(st.tuples(st.integers(0, (len(base.blob.data) - base.data_from) // 2 - 1),
                                 st.sampled_from((b"\x80\x7f", b"\xc0\x7f", b"\x80\xff"))).map(
            lambda t: Case(base.key, f"bf16 value {t[0]} = {t[1].hex()}",
                           (("put", base.data_from + 2 * t[0], t[1]),), True, base.target)))
    if base.fields:
        options.append(st.sampled_from(base.fields).flatmap(lambda f: field_edit(base, f)))
    if base.json_value is not None:
        options.append(json_mutation(base))
    if base.key in ("t_embedded",):
        options.append(st.sampled_from(("bomb-honest", "bomb-lying", "garbage-json")).map(
            lambda how: embedded_section_case(base, how)))
    return st.one_of(options)


def field_edit(base: Base, f: Field):
    from hypothesis import strategies as st

    bits = 8 * struct.calcsize(f.fmt)
    signed = f.fmt[-1].islower() and f.fmt[-1] not in ("f", "d")
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    candidates = tuple(v for v in (*f.refuse_values, *I32_ABSURD, f.value + 1, f.value - 1, 2 * f.value)
                       if low <= v <= high and v != f.value)
    value = st.sampled_from(candidates) | st.integers(low, high).filter(lambda v: v != f.value)

    def case(v: int) -> Case:
        refuse = f.refuse_any_change or v in f.refuse_values
        return Case(base.key, f"{f.name}={v}", (("put", f.offset, struct.pack(f.fmt, v)),), refuse, base.target)

    return value.map(case)


def json_mutation(base: Base):
    """A config / index / tokenizer.json / safetensors header with one value replaced (or the document)."""
    from hypothesis import strategies as st

    doc = base.json_value
    bad_values = st.sampled_from((None, "2", 2.5, -1, 0, 10**9, 1e9, [], {}, True, "x", [1, 2], -(2**63)))
    paths = json_paths(doc)

    def case(path_value) -> Case:
        path, value = path_value
        new = set_path(doc, path, value)
        old = get_path(doc, path)
        refuse = path_refuses(base.key, path, value) and not (type(old) is type(value) and old == value)
        return Case(base.key, f"{'.'.join(map(str, path)) or '(document)'}={json.dumps(value)[:30]}",
                    (("replace", encode_json_base(base, new)),), refuse, base.target)

    whole = st.sampled_from(([], "x", 5, None)).map(
        lambda v: Case(base.key, f"(document)={json.dumps(v)}", (("replace", encode_json_base(base, v)),), True,
                       base.target))
    return st.tuples(st.sampled_from(paths), bad_values).map(case) | whole


def json_paths(doc, prefix=(), depth=0) -> list[tuple]:
    out = []
    if isinstance(doc, dict) and depth < 3:
        for k, v in doc.items():
            out.append(prefix + (k,))
            if k not in ("vocab", "merges"):  # the vocabulary itself: a few paths, not 384
                out += json_paths(v, prefix + (k,), depth + 1)
    elif isinstance(doc, list) and depth < 3:
        for i in range(min(len(doc), 3)):
            out.append(prefix + (i,))
            out += json_paths(doc[i], prefix + (i,), depth + 1)
    return out


def get_path(doc, path: tuple):
    for key in path:
        doc = doc[key]
    return doc


def set_path(doc, path: tuple, value):
    if not path:
        return value
    copy = dict(doc) if isinstance(doc, dict) else list(doc)
    copy[path[0]] = set_path(doc[path[0]], path[1:], value)
    return copy


# config keys whose every other value breaks the conversion (shapes, layer count, token ids)
CONFIG_SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "vocab_size", "model_type", "head_dim")


def path_refuses(key: str, path: tuple, value) -> bool:
    """Whether a value at path must be refused (otherwise it may be accepted: an unused key, a legal value)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if key == "config":
        name = path[0]
        if len(path) > 1:
            return False
        if name == "head_dim":
            return value is not None  # absent: hidden_size / heads, the same here
        if name in CONFIG_SHAPE_KEYS or name == "max_position_embeddings":
            return True  # every value of the pool is of the wrong type, out of range or another shape
        if name == "rms_norm_eps":
            return value is not None
        if name == "rope_theta":
            return value is not None and not (number and value >= 1)
        if name in ("bos_token_id", "eos_token_id"):
            return not (value is None or isinstance(value, bool) or number and 0 <= value < 384)
        return False
    if key == "safetensors":
        return path[0] != "__metadata__"
    if key == "index":
        return path[:1] == ("weight_map",)
    return False  # tokenizer files: a value the converter does not read may be accepted


def encode_json_base(base: Base, value) -> bytes:
    text = json.dumps(value).encode()
    if base.key != "safetensors":
        return text
    return struct.pack("<Q", len(text)) + text + bytes(base.blob.data[base.data_from:])


def embedded_section_case(base: Base, how: str) -> Case:
    """The embedded tokenizer replaced: a zip bomb telling its size, one lying about it, valid garbage."""
    start = base.whole_cuts[0]
    if how == "garbage-json":
        raw = b'{"model": {"type": "BPE", "vocab": 5}}'
        packed, raw_len = zlib.compress(raw), len(raw)
    else:
        packed = zip_bomb()
        raw_len = (1 << 30) if how == "bomb-honest" else 4096
        raw = b""
    crc = zlib.crc32(raw) if raw else 0
    section = b"DLXT" + struct.pack("<6I", 1, 1, 1, raw_len, len(packed), crc) + packed
    return Case(base.key, f"embedded section: {how}", (("truncate", start), ("append", section)), True, base.target)


_BOMB: bytes | None = None


def zip_bomb() -> bytes:
    """256 MiB of zeros, deflated to 1 MB."""
    global _BOMB
    if _BOMB is None:
        deflate = zlib.compressobj(1)
        chunk = bytes(1 << 24)
        _BOMB = b"".join(deflate.compress(chunk) for _ in range(16)) + deflate.flush()
    return _BOMB


def generate_cases(bases: dict[str, Base], quotas: dict[str, int]) -> list[Case]:
    from hypothesis import HealthCheck, Phase, given, settings

    cases: list[Case] = []
    for key, quota in quotas.items():
        if key not in bases:
            continue
        seen: dict[tuple, Case] = {}

        @settings(max_examples=2 * quota, derandomize=True, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck), deadline=None)
        @given(case=case_strategy(bases[key]))
        def collect(case: Case) -> None:
            if len(seen) < quota:
                seen.setdefault((case.label, case.edits), case)

        collect()
        cases += list(seen.values())
    return cases


# --------------------------------------------------------------------------------------------
# Running every reader on a case, in a forked child

@dataclass
class Run:
    case: Case
    reader: str
    inputs: dict          # what the reader opens
    mutated: Path         # the file the case changed
    out: Path             # a folder it may write to


def materialize(case: Case, base: Base, where: Path) -> dict:
    """The case's files on disk: the mutated file, and the folder or partner file beside it."""
    where.mkdir(parents=True)
    mutated_blob = apply(base.blob, case.edits)
    if base.folder is not None:
        folder = where / base.folder.name
        folder.mkdir()
        for item in base.folder.iterdir():
            if item.name != base.target:
                os.link(item, folder / item.name)
        mutated = folder / base.target
        mutated_blob.write(mutated)
        return {"folder": folder, "mutated": mutated}
    suffix = {"m": ".m", "t": ".t", "gguf": ".gguf", "smollm2": ".gguf"}[base.kind]
    mutated = where / f"case{suffix}"
    mutated_blob.write(mutated)
    inputs = {"mutated": mutated}
    if base.kind == "m":
        inputs.update(model=mutated, tokenizer=base.partner)
    elif base.kind == "t":
        inputs.update(model=base.partner, tokenizer=mutated)
    return inputs


def reader_call(reader: str, inputs: dict, out: Path):
    """(typer app, argv) or a function: the reader as the user reaches it."""
    from dllama.cli import dllama_convert, dllama_run, dllama_validate

    convert_cli, run_cli, validate_cli = (_command(m) for m in (dllama_convert, dllama_run, dllama_validate))
    m, t = str(inputs.get("model")), str(inputs.get("tokenizer"))
    mutated = str(inputs["mutated"])
    if reader == "plan":
        return run_cli, ["plan", "--model", m, "--nodes", "2"]
    if reader == "run":
        return run_cli, ["--model", m, "--tokenizer", t, "--prompt", "Hello", "--steps", "2", "--threads",
                                "1", "--max-seq-len", "32", "--temperature", "0"]
    if reader == "validate":
        return validate_cli, [m, t, "--quiet", "--threads", "1", "--corpus-limit", "2"]
    if reader in FUNCTION_READERS:
        return None, FUNCTION_READERS[reader]
    if reader == "convert-hf":
        return convert_cli, ["hf", str(inputs["folder"]), "-q", "q40", "-o", str(out)]
    if reader == "convert-gguf":
        return convert_cli, ["gguf", mutated, "-q", "q40", "-o", str(out)]
    if reader == "convert-tokenizer":
        return convert_cli, ["tokenizer", mutated, "-o", str(out)]
    raise ValueError(reader)


_COMMANDS: dict = {}


def _command(module):
    """The click command typer builds from a module's app, built once (it costs 0.1 s per call)."""
    import typer

    if module not in _COMMANDS:
        _COMMANDS[module] = typer.main.get_command(module.app)
    return _COMMANDS[module]


def worker_check(inputs: dict, out: Path) -> None:
    """`dllama-run worker --model M` up to where it would listen: its start-up check of the file."""
    from dllama.cli.edge import edge
    from dllama.cli.run_cluster import _start_worker

    with edge():
        worker = _start_worker("127.0.0.1", 0, Path(inputs["model"]), 1)
        worker.listener.close()


def plan_conversion(inputs: dict, out: Path) -> None:
    """`dllama-convert gguf` up to the first output byte (SmolLM2's tensors are a hole here)."""
    from dllama.cli.edge import edge
    from dllama.converter.convert import prepare_conversion
    from dllama.formats import FloatType

    with edge():
        prepare_conversion(Path(inputs["mutated"]), FloatType.Q40, "case", out)


# readers reached through a function rather than a command line (name -> f(inputs, out))
FUNCTION_READERS = {"worker": worker_check, "plan-conversion": plan_conversion}


def _address_space() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def child(run: Run, stderr_path: Path, stdout_path: Path) -> None:
    """In the forked child: limits, then the reader; never returns."""
    code = EXIT_TRACEBACK
    try:
        os.setsid()
        err = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        outfd = os.open(stdout_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(outfd, 1)
        os.dup2(err, 2)
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # (under pytest these are capture objects)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        limit = _address_space() + MEMORY_CAP
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        import typer

        app, argv = reader_call(run.reader, run.inputs, run.out)
        try:
            if app is None:
                argv(run.inputs, run.out)
            else:
                app.main(args=argv, prog_name="dllama", standalone_mode=True)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except typer.Exit as e:  # edge()'s fail() outside a command line
            code = e.exit_code
        except MemoryError:
            traceback.print_exc()
            code = EXIT_OVER_MEMORY
    except BaseException:
        traceback.print_exc()
        code = EXIT_TRACEBACK
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


@dataclass
class Result:
    base: str
    label: str
    reader: str
    outcome: str
    must_refuse: bool
    exit: int | None
    seconds: float
    detail: str = ""


def classify(run: Run, status: int | None, timed_out: bool, stderr: str, stdout: str, seconds: float) -> Result:
    def result(outcome: str, detail: str = "") -> Result:
        code = os.waitstatus_to_exitcode(status) if status is not None else None
        return Result(run.case.base, run.case.label, run.reader, outcome, run.case.must_refuse, code, seconds,
                      detail[:300])

    if timed_out:
        return result("hang")
    if os.WIFSIGNALED(status):
        return result("over-memory", f"killed by signal {os.WTERMSIG(status)}")
    code = os.WEXITSTATUS(status)
    if code == EXIT_OVER_MEMORY or "MemoryError" in stderr:
        return result("over-memory", stderr.strip().splitlines()[-1] if stderr.strip() else "")
    if code == EXIT_TRACEBACK or "Traceback (most recent call last)" in stderr:
        return result("traceback", stderr.strip().splitlines()[-1] if stderr.strip() else "")
    if code == 0:
        return result("accepted-bad" if run.case.must_refuse else "accepted")
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    if run.reader == "validate" and code == 1 and not errors and "verdict: FAIL" in stdout:
        return result("check", next((line for line in stdout.splitlines() if " FAIL " in line), ""))
    names = {run.mutated.name, run.mutated.parent.name} if run.mutated.parent.name != "case" else {run.mutated.name}
    if len(errors) == 1 and any(name in errors[0] for name in names):
        return result("error", errors[0])
    return result("unclear", " | ".join(errors) or stderr.strip()[-300:])


def run_all(runs: list[Run], jobs: int, deadline_s: float = DEADLINE_S, scratch: Path | None = None,
            progress=None) -> list[Result]:
    """Each run in its own forked child, `jobs` at a time."""
    scratch = scratch or Path(tempfile.mkdtemp(prefix="fuzz-io-"))
    pending = collections.deque(enumerate(runs))
    running: dict[int, tuple] = {}  # pidfd -> (index, pid, started, stderr path, stdout path)
    results: list[Result | None] = [None] * len(runs)
    while pending or running:
        while pending and len(running) < jobs:
            i, run = pending.popleft()
            err, out = scratch / f"{i}.err", scratch / f"{i}.out"
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                child(run, err, out)
            running[os.pidfd_open(pid)] = (i, pid, time.monotonic(), err, out)
        nearest = min(started for _, _, started, _, _ in running.values()) + deadline_s
        ready, _, _ = select.select(list(running), [], [], max(0.0, nearest - time.monotonic()))
        now = time.monotonic()
        for fd in list(running):
            i, pid, started, err, out = running[fd]
            timed_out = fd not in ready and now - started >= deadline_s
            if fd not in ready and not timed_out:
                continue
            if timed_out:
                os.killpg(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            os.close(fd)
            del running[fd]
            stderr = err.read_text(errors="replace") if err.exists() else ""
            stdout = out.read_text(errors="replace") if out.exists() else ""
            results[i] = classify(runs[i], None if timed_out else status, timed_out, stderr, stdout, now - started)
            if progress:
                progress(results[i])
    return [r for r in results if r is not None]


def warm_up() -> None:
    """Import every reader's modules once, so that each forked child starts with them (no threads yet:
    numba's OpenMP pool and the runtime's team must start in the child)."""
    from numba.core.registry import cpu_target

    import dllama.cli.dllama_convert  # noqa: F401
    import dllama.cli.dllama_run  # noqa: F401
    import dllama.cli.dllama_validate  # noqa: F401
    import dllama.converter.encoders  # noqa: F401
    import dllama.runtime.distributed.worker  # noqa: F401
    import dllama.tokenizer.faithful  # noqa: F401
    import dllama.validate.validator  # noqa: F401
    from dllama.runtime import dispatch

    dispatch.implementation()
    cpu_target.target_context.refresh()  # numba's lazy imports (1.5 s, scipy's among them), without running code
    empty = Path(tempfile.mkdtemp(prefix="fuzz-warm-"))
    try:  # each command once on empty files: its lazy imports and typer's command building happen here
        for name, blank in (("m", b""), ("t", b""), ("gguf", b""), ("folder", None)):
            (empty / name).mkdir() if blank is None else (empty / name).write_bytes(blank)
        inputs = {"model": empty / "m", "tokenizer": empty / "t", "mutated": empty / "gguf", "folder": empty / "folder"}
        saved = os.dup(2)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
        try:
            for reader in ("plan", "run", "validate", "convert-hf", "convert-gguf"):
                command, argv = reader_call(reader, inputs, empty / "out")
                try:
                    command.main(args=argv, prog_name="dllama", standalone_mode=True)
                except SystemExit:
                    pass
        finally:
            os.dup2(saved, 2)
    finally:
        shutil.rmtree(empty, ignore_errors=True)


def build_runs(cases: list[Case], bases: dict[str, Base], work: Path) -> list[Run]:
    runs = []
    for n, case in enumerate(cases):
        base = bases[case.base]
        inputs = materialize(case, base, work / f"case{n:04d}")
        for reader in READERS[base.kind]:
            runs.append(Run(case, reader, inputs, inputs["mutated"], work / f"case{n:04d}" / f"out-{reader}"))
    return runs


def fuzz(jobs: int = 2, quotas: dict[str, int] | None = None, smollm2_gguf: Path | None = None,
         progress=None, deadline_s: float = DEADLINE_S) -> tuple[list[Case], list[Result]]:
    work = Path(tempfile.mkdtemp(prefix="fuzz-inputs-"))
    try:
        t0 = time.monotonic()
        bases = prepare_bases(work / "bases", smollm2_gguf)
        t1 = time.monotonic()
        cases = generate_cases(bases, quotas or QUOTAS)
        t2 = time.monotonic()
        runs = build_runs(cases, bases, work / "cases")
        warm_up()
        print(f"bases {t1 - t0:.1f} s, cases {t2 - t1:.1f} s, files {time.monotonic() - t2:.1f} s", file=sys.stderr)
        return cases, run_all(runs, jobs, deadline_s, scratch=work, progress=progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def summary(cases: list[Case], results: list[Result]) -> dict:
    by_reader: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for r in results:
        by_reader[r.reader][r.outcome] += 1
    by_base = collections.Counter(c.base for c in cases)
    outcomes_by_base: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for r in results:
        outcomes_by_base[r.base][r.outcome] += 1
    return {"cases": len(cases), "runs": len(results), "cases_by_base": dict(by_base),
            "must_refuse_by_base": dict(collections.Counter(c.base for c in cases if c.must_refuse)),
            "outcomes_by_base": {k: dict(v) for k, v in outcomes_by_base.items()},
            "outcomes": dict(collections.Counter(r.outcome for r in results)),
            "by_reader": {k: dict(v) for k, v in by_reader.items()},
            "must_refuse_cases": sum(c.must_refuse for c in cases),
            "accepted": sorted({f"{r.base}: {r.label}" for r in results if r.outcome == "accepted"}),
            "bad": [r.__dict__ for r in results if r.outcome in BAD_OUTCOMES]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the summary and every bad result here")
    parser.add_argument("--smollm2", type=Path, help="SmolLM2's GGUF (default: the samples cache)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every base's quota")
    parser.add_argument("--deadline", type=float, default=DEADLINE_S, help="seconds before a run counts as a hang")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from dllama.samples import cached

    smollm2 = args.smollm2 or cached()
    quotas = {k: max(1, round(v * args.scale)) for k, v in QUOTAS.items()}
    started = time.monotonic()
    cases, results = fuzz(args.jobs, quotas, smollm2, deadline_s=args.deadline)
    report = summary(cases, results)
    report["seconds"] = round(time.monotonic() - started, 1)
    text = json.dumps(report, indent=1)
    if args.json:
        args.json.write_text(text)
    print(json.dumps({k: v for k, v in report.items() if k not in ("bad", "accepted")}, indent=1))
    for bad in report["bad"][:40]:
        print(f"BAD {bad['outcome']:<13} {bad['reader']:<17} {bad['base']:<16} {bad['label']:<40} {bad['detail']}")
    sys.exit(1 if report["bad"] else 0)


if __name__ == "__main__":
    main()
