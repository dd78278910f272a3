"""Random Hugging Face checkpoints of any shape, streamed to disk tensor by tensor.

For tests, examples and benchmarks: `write_checkpoint` writes config.json and safetensors
(optionally sharded with model.safetensors.index.json) without ever holding a whole tensor in
memory, so a 2.2 GB TinyLlama-shaped checkpoint costs a few MB of RAM. Magnitudes are those of
trained models (weights ~ N(0, 0.02), norms ~ 1) so quantized files behave like real ones.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np

from dllama.checkpoint import header_from_config
from dllama.formats import FloatType, ModelHeader, encode_tensor, tensor_plan

SOURCE_DTYPES = {"bf16": "BF16", "f16": "F16", "f32": "F32"}
_ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4}
_CHUNK_VALUES = 1 << 22  # values generated per step: 16 MB of float32
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "chat_template.jinja",
                   "special_tokens_map.json")


def tiny_config(model_type: str = "llama", **overrides) -> dict:
    """A small config.json in the hub layout (transformers 4 keys) for tests; override any key."""
    config = {
        "architectures": [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen3": "Qwen3ForCausalLM",
                           "qwen3_moe": "Qwen3MoeForCausalLM"}.get(model_type, "LlamaForCausalLM")],
        "model_type": model_type,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 384,
        "max_position_embeddings": 256,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    if model_type in ("qwen3", "qwen3_moe"):
        config.update(head_dim=32, rms_norm_eps=1e-6, rope_theta=1000000.0)
    if model_type == "qwen3_moe":
        config.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, norm_topk_prob=True)
    config.update(overrides)
    return config


def tinyllama_config(**overrides) -> dict:
    """TinyLlama-1.1B's config.json shape (dim 2048, hidden 5632, 22 layers, 32/4 heads, vocab 32000)."""
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "vocab_size": 32000,
        "max_position_embeddings": 2048,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    config.update(overrides)
    return config


def checkpoint_tensors(config: dict, tie_embeddings: bool | None = None) -> list[tuple[str, tuple[int, ...]]]:
    """(Hugging Face name, shape) of every tensor a checkpoint with this config holds."""
    if tie_embeddings is None:
        tie_embeddings = bool(config.get("tie_word_embeddings", False))
    plan = tensor_plan(header_from_config(config, FloatType.F32))
    return [(s.hf_name, s.shape) for s in plan if not (tie_embeddings and s.name == "lm_head")]


def write_checkpoint(folder: str | os.PathLike, config: dict, dtype: str = "bf16", seed: int = 0, shards: int = 1,
                     tie_embeddings: bool | None = None, tokenizer: str | os.PathLike | None = None,
                     tokenizer_json: str | os.PathLike | None = None) -> Path:
    """Write a random checkpoint for `config` into `folder` and return the folder.

    dtype: bf16, f16 or f32 source tensors. shards > 1 splits the tensors over that many files
    with a model.safetensors.index.json. tie_embeddings (default: the config's
    tie_word_embeddings) leaves lm_head out. tokenizer: a tokenizer.json file or a folder whose
    tokenizer files are copied beside the weights (tokenizer_json is an alias).
    """
    if dtype not in SOURCE_DTYPES:
        raise ValueError(f"dtype {dtype!r}: use one of {', '.join(SOURCE_DTYPES)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = dict(config)
    if tie_embeddings is not None:
        config["tie_word_embeddings"] = bool(tie_embeddings)
    config["torch_dtype"] = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}[dtype]
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    tensors = checkpoint_tensors(config, tie_embeddings)
    st_dtype = SOURCE_DTYPES[dtype]
    groups = _split_into_shards(tensors, shards, _ITEMSIZE[st_dtype])
    rng = np.random.default_rng(seed)
    if len(groups) == 1:
        _write_safetensors(folder / "model.safetensors", groups[0], st_dtype, rng)
    else:
        weight_map = {}
        total = 0
        for i, group in enumerate(groups):
            name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            total += _write_safetensors(folder / name, group, st_dtype, rng)
            weight_map.update({tensor: name for tensor, _ in group})
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    source = tokenizer if tokenizer is not None else tokenizer_json
    if source is not None:
        copy_tokenizer(source, folder)
    return folder


def write_random_model(path: str | os.PathLike, header: ModelHeader, seed: int = 0) -> Path:
    """A `.m` of random weights for `header` (norms near 1, matrices scaled by 1/sqrt(cols)), written
    straight with the format module's plan and codecs: for runtime tests of shapes no checkpoint has."""
    path = Path(path)
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        f.write(header.to_bytes())
        for spec in tensor_plan(header):
            if len(spec.shape) == 1:
                values = 1.0 + 0.1 * rng.standard_normal(spec.shape)
            else:
                values = rng.standard_normal(spec.shape) / np.sqrt(spec.shape[1])
            f.write(encode_tensor(values.astype(np.float32), spec.float_type).tobytes())
    return path


def copy_tokenizer(source: str | os.PathLike, folder: Path) -> None:
    source = Path(source)
    if source.is_file():
        shutil.copyfile(source, folder / source.name)
        return
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)


def _split_into_shards(tensors, shards: int, itemsize: int) -> list[list]:
    shards = max(1, min(shards, len(tensors)))
    sizes = [int(np.prod(shape)) * itemsize for _, shape in tensors]
    target = sum(sizes) / shards
    groups: list[list] = [[]]
    filled = 0
    for tensor, size in zip(tensors, sizes):
        if groups[-1] and filled + size / 2 > target * len(groups) and len(groups) < shards:
            groups.append([])
        groups[-1].append(tensor)
        filled += size
    while len(groups) < shards:  # a few huge tensors: split the longest group further
        longest = max(range(len(groups)), key=lambda g: len(groups[g]))
        half = len(groups[longest]) // 2
        groups[longest:longest + 1] = [groups[longest][:half], groups[longest][half:]]
    return groups


def _write_safetensors(path: Path, tensors: list[tuple[str, tuple[int, ...]]], st_dtype: str,
                       rng: np.random.Generator) -> int:
    return write_safetensors(path, tensors, st_dtype, lambda f, name, shape: _write_random_tensor(f, name, shape,
                                                                                                  st_dtype, rng))


def write_safetensors(path: Path, tensors: list[tuple[str, tuple[int, ...]]], st_dtype: str,
                      write_tensor: Callable[[BinaryIO, str, tuple[int, ...]], None]) -> int:
    """Header first (offsets are known from the shapes), then `write_tensor(f, name, shape)` writes
    each tensor's bytes in `st_dtype` (see `encode_values`). Returns the data bytes."""
    itemsize = _ITEMSIZE[st_dtype]
    meta: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        n = int(np.prod(shape)) * itemsize
        meta[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header = json.dumps(meta, separators=(",", ":")).encode("utf-8")
    header += b" " * (-len(header) % 8)  # safetensors aligns the data start to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for name, shape in tensors:
            write_tensor(f, name, shape)
    return offset


def _write_random_tensor(f, name: str, shape: tuple[int, ...], st_dtype: str, rng: np.random.Generator) -> None:
    total = int(np.prod(shape))
    is_norm = len(shape) == 1
    done = 0
    while done < total:
        n = min(_CHUNK_VALUES, total - done)
        values = rng.standard_normal(n, dtype=np.float32)
        if is_norm:
            values *= np.float32(0.1)
            values += np.float32(1.0)
        else:
            values *= np.float32(0.02)
        f.write(encode_values(values, st_dtype).tobytes())
        done += n


def encode_values(values: np.ndarray, st_dtype: str) -> np.ndarray:
    """float32 values -> safetensors bytes of st_dtype (bf16 rounded to nearest even)."""
    if st_dtype == "F32":
        return values.astype("<f4", copy=False)
    if st_dtype == "F16":
        return values.astype("<f2")
    bits = values.view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))  # round to nearest even
    return (rounded >> np.uint32(16)).astype("<u2")
