"""The classic conversion failures, made by mutating a correct conversion (issue 12, must-hold 2).

Each mutation writes a new `.m` or `.t` through dllama.formats, so the only thing wrong with the
result is the bug named. benchmarks/validate.py measures them; tests/test_validate_smollm2.py
asserts each one fails with its own reason.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np

from dllama.formats import EmbeddedKind, ModelFile, decode_tensor, encode_tensor, read_tokenizer


def tensor_slice(mf: ModelFile, name: str) -> slice:
    t = mf.layout[name]
    return slice(t.offset, t.offset + t.spec.nbytes)


def write_model_with(out: Path, source: Path, edit: Callable[[bytearray, ModelFile], None]) -> Path:
    """Copy a `.m`, let `edit(bytearray, ModelFile)` change its bytes."""
    mf = ModelFile(source)
    data = bytearray(source.read_bytes())
    edit(data, mf)
    out.write_bytes(bytes(data))
    return out


# --------------------------------------------------------------------------------------------
# Model mutations: edit(data, mf)

def unpermute_qk(data: bytearray, mf: ModelFile) -> None:
    """Undo FORMAT.md §1.3's permute by moving whole stored rows (blocks run along columns)."""
    _reorder_qk_rows(data, mf, lambda heads, hd: (heads, hd // 2, 2))


def permute_qk(data: bytearray, mf: ModelFile) -> None:
    """Apply FORMAT.md §1.3's permute to q/k rows of an arch that must not have it (a llama-only step
    run on another arch), by moving whole stored rows."""
    _reorder_qk_rows(data, mf, lambda heads, hd: (heads, 2, hd // 2))


def _reorder_qk_rows(data: bytearray, mf: ModelFile, shape_of) -> None:
    """Every layer's q and k rows, each head's viewed as shape_of(heads, head_dim) and its last two axes
    swapped: the permute one way or the other."""
    h = mf.header
    for layer in range(h.n_layers):
        for name, heads in ((f"layers.{layer}.q", h.n_heads), (f"layers.{layer}.k", h.n_kv_heads)):
            spec = mf.layout[name].spec
            rows = np.frombuffer(mf.raw(name), np.uint8).reshape(spec.shape[0], -1)
            order = np.arange(spec.shape[0]).reshape(shape_of(heads, spec.shape[0] // heads)).swapaxes(1, 2)
            data[tensor_slice(mf, name)] = rows[order.reshape(-1)].tobytes()


def set_header(**fields):
    def edit(data: bytearray, mf: ModelFile) -> None:
        header = replace(mf.header, **fields)
        data[:header.nbytes] = header.to_bytes()
    return edit


def swap_tensors(a: str, b: str):
    def edit(data: bytearray, mf: ModelFile) -> None:
        sa, sb = tensor_slice(mf, a), tensor_slice(mf, b)
        data[sa], data[sb] = bytes(mf.raw(b)), bytes(mf.raw(a))
    return edit


def bf16_read_as_f16(values: np.ndarray) -> np.ndarray:
    """What a converter that reads a bf16 checkpoint's bytes as f16 gets for these values."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    bf16 = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even
    return bf16.view(np.float16).astype(np.float32)


def read_bf16_as_f16(data: bytearray, mf: ModelFile) -> None:
    """Every tensor as a converter reading the bf16 original as f16 writes it."""
    for name in mf.names:
        spec = mf.layout[name].spec
        values = decode_tensor(mf.raw(name), spec.float_type, spec.shape)
        data[tensor_slice(mf, name)] = encode_tensor(bf16_read_as_f16(values), spec.float_type).tobytes()


def truncate(data: bytearray, mf: ModelFile) -> None:
    del data[-1000:]


# --------------------------------------------------------------------------------------------
# Tokenizer mutations: a TokenizerFile changed in place

def permute_token_ids(tf, seed: int = 0) -> None:
    """A tokenizer of "another model" with the same vocabulary size: every id moved, and the
    embedded tokenizer.json moved with it, so the .t is self-consistent."""
    n = tf.vocab_size
    perm = np.random.default_rng(seed).permutation(n)  # new id of old id i
    inverse = np.argsort(perm)
    tf.tokens = [tf.tokens[i] for i in inverse]
    tf.scores = [tf.scores[i] for i in inverse]
    tf.bos_id = int(perm[tf.bos_id])
    tf.eos_ids = [int(perm[i]) for i in tf.eos_ids]
    for k, source in enumerate(tf.embedded):
        if source.kind == EmbeddedKind.TOKENIZER_JSON:
            spec = json.loads(source.data.decode("utf-8"))
            spec["model"]["vocab"] = {t: int(perm[i]) for t, i in spec["model"]["vocab"].items()}
            for added in spec.get("added_tokens", []):
                added["id"] = int(perm[added["id"]])
            _renumber_post_processor(spec.get("post_processor"), perm)
            tf.embedded[k] = replace(source, data=json.dumps(spec, ensure_ascii=False).encode("utf-8"))


def _renumber_post_processor(node, perm) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "ids" and isinstance(value, list):
                node[key] = [int(perm[i]) for i in value]
            else:
                _renumber_post_processor(value, perm)
    elif isinstance(node, list):
        for item in node:
            _renumber_post_processor(item, perm)


def add_one_token(tf) -> None:
    tf.tokens.append(b"<|extra|>")
    tf.scores.append(-float(len(tf.scores)))


def swap_bos_eos(tf) -> None:
    tf.bos_id, tf.eos_ids = tf.eos_ids[0], [tf.bos_id]


def write_tokenizer_with(out: Path, source: Path, edit) -> Path:
    tf = read_tokenizer(source)
    edit(tf)
    out.write_bytes(tf.to_bytes())
    return out


# name -> (what the mutation changes: "model" or "tokenizer", the edit, the quant it mutates)
MODEL_MUTATIONS = {
    "q/k rows not permuted": unpermute_qk,
    "rope_theta 10000 (not 100000)": set_header(rope_theta=10000),
    "rms eps 1e-6 (not 1e-5)": set_header(norm_epsilon_code=6),
    "w2 of layers 10/11 swapped": swap_tensors("layers.10.w2", "layers.11.w2"),
    "truncated": truncate,
    "bf16 source read as f16": read_bf16_as_f16,
}
TOKENIZER_MUTATIONS = {
    "tokenizer of another model (ids permuted)": permute_token_ids,
    "vocab off by one": add_one_token,
    "bos/eos swapped": swap_bos_eos,
}


# --------------------------------------------------------------------------------------------
# Checkpoint and fold edits

def write_checkpoint_with(folder: Path, source: Path, edit: Callable[[dict[str, np.ndarray]], None]) -> Path:
    """A float32 copy of a Hugging Face checkpoint folder (its values widened exactly), after
    `edit(tensors)` changed, added or dropped tensors; config.json copied."""
    from safetensors.numpy import save_file

    from dllama.checkpoint import Checkpoint

    ckpt = Checkpoint(source)
    tensors = {name: ckpt.get(name) for name in ckpt.entries}
    edit(tensors)
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_bytes((source / "config.json").read_bytes())
    return folder


def fold_channels(norm: str, matrices: tuple[str, ...], scales: np.ndarray):
    """What the error-aware encoder does to a float32 `.m` (dllama.converter.calibration.Fold): the
    matrices' input channels times `scales`, the RMSNorm weight before them divided by them."""
    def edit(data: bytearray, mf: ModelFile) -> None:
        for name in (norm, *matrices):
            spec = mf.layout[name].spec
            values = decode_tensor(mf.raw(name), spec.float_type, spec.shape)
            folded = values / scales if name == norm else values * scales
            data[tensor_slice(mf, name)] = encode_tensor(folded.astype(np.float32), spec.float_type).tobytes()
    return edit
