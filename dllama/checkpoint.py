"""Hugging Face checkpoints: config.json -> ModelHeader, and lazy tensors from (sharded) safetensors.

Shared by the converter and the validator's reference forward. Tensors are read from
memory-mapped files one at a time, so nothing ever holds the whole model.
"""
from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dllama.errors import DllamaError
from dllama.formats import ArchType, FloatType, HiddenAct, ModelHeader, RopeType


class CheckpointError(DllamaError, ValueError):
    """The Hugging Face checkpoint is missing something or holds something we cannot convert."""


ARCH_BY_MODEL_TYPE = {
    "llama": ArchType.LLAMA,
    "mistral": ArchType.LLAMA,
    "qwen3": ArchType.QWEN3,
    "qwen3_moe": ArchType.QWEN3_MOE,
}
HIDDEN_ACT_BY_NAME = {"gelu": HiddenAct.GELU, "silu": HiddenAct.SILU}
NORM_EPSILON_CODE_BY_VALUE = {1e-5: 5, 1e-6: 6}
ROPE_TYPE_BY_NAME = {"llama3": RopeType.LLAMA3_1}


def load_config(folder: str | os.PathLike) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: a Hugging Face checkpoint folder needs its config.json")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None


def rope_settings(config: dict) -> tuple[float | None, dict | None]:
    """(rope_theta, rope_scaling) from either transformers 4 (top level) or 5 (`rope_parameters`)."""
    theta = config.get("rope_theta")
    scaling = config.get("rope_scaling")
    params = config.get("rope_parameters")
    if isinstance(params, dict):
        theta = params.get("rope_theta", theta)
        rope_type = params.get("rope_type") or params.get("type")
        if scaling is None and rope_type not in (None, "default"):
            scaling = params
    if isinstance(scaling, dict):
        rope_type = scaling.get("rope_type") or scaling.get("type")
        if rope_type in (None, "default"):
            scaling = None
    return theta, scaling


def header_from_config(config: dict, float_type: FloatType) -> ModelHeader:
    """The `.m` header the reference converter would write for this config (FORMAT.md §1.1)."""
    model_type = config.get("model_type")
    arch = ARCH_BY_MODEL_TYPE.get(model_type)
    if arch is None:
        raise CheckpointError(f"unsupported model_type {model_type!r}: dllama converts {', '.join(ARCH_BY_MODEL_TYPE)}")
    act_name = config.get("hidden_act", "silu")
    if act_name not in HIDDEN_ACT_BY_NAME:
        raise CheckpointError(f"unsupported hidden_act {act_name!r}: only silu and gelu exist in the format")

    def need(key: str, *alternatives: str) -> int:
        for k in (key, *alternatives):
            if config.get(k) is not None:
                return int(config[k])
        raise CheckpointError(f"config.json lacks {key!r}, which the {model_type} format needs")

    dim = need("hidden_size")
    n_heads = need("num_attention_heads")
    n_experts = int(config.get("num_experts") or config.get("num_local_experts") or 0)
    if arch == ArchType.QWEN3_MOE and n_experts == 0:
        raise CheckpointError("config.json of a qwen3_moe model names no experts (num_experts / num_local_experts)")
    if arch == ArchType.QWEN3_MOE and not config.get("norm_topk_prob", False):
        # transformers' default is false; distributed-llama always renormalises the chosen experts' weights
        raise CheckpointError("config.json of this qwen3_moe model has norm_topk_prob false (transformers' default "
                              "when the key is absent), but the format always renormalises the top-k expert weights: "
                              "the converted model would compute something else, so dllama cannot convert it")
    theta, scaling = rope_settings(config)
    fields: dict = {}
    if theta is not None:
        fields["rope_theta"] = int(theta)
    if scaling is not None:
        rope_name = scaling.get("rope_type") or scaling.get("type")
        if rope_name not in ROPE_TYPE_BY_NAME:
            raise CheckpointError(f"unsupported rope scaling type {rope_name!r}: only llama3 scaling exists in the "
                                  "format")
        fields.update(
            rope_scaling_factor=int(scaling["factor"]),
            rope_scaling_low_freq_factor=int(scaling["low_freq_factor"]),
            rope_scaling_high_freq_factor=int(scaling["high_freq_factor"]),
            rope_scaling_orig_max_seq_len=int(scaling["original_max_position_embeddings"]),
            rope_type=ROPE_TYPE_BY_NAME[rope_name],
        )
    if config.get("head_dim") is not None:
        fields["head_dim_value"] = int(config["head_dim"])
    if config.get("rms_norm_eps") is not None:
        eps = float(config["rms_norm_eps"])
        code = next((c for v, c in NORM_EPSILON_CODE_BY_VALUE.items() if abs(eps - v) < 1e-12), None)
        if code is None:
            raise CheckpointError(f"unsupported rms_norm_eps {eps}: the format stores only 1e-5 and 1e-6")
        fields["norm_epsilon_code"] = code
    if config.get("moe_intermediate_size") is not None:
        fields["moe_hidden_dim"] = int(config["moe_intermediate_size"])
    return ModelHeader(
        arch=arch,
        dim=dim,
        hidden_dim=need("intermediate_size"),
        n_layers=need("num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=int(config.get("num_key_value_heads") or n_heads),
        vocab_size=need("vocab_size"),
        max_seq_len=need("max_position_embeddings"),
        weights_float_type=float_type,
        hidden_act=HIDDEN_ACT_BY_NAME[act_name],
        n_experts=n_experts,
        n_active_experts=int(config.get("num_experts_per_tok") or 0) if n_experts else 0,
        **fields,
    )


# --------------------------------------------------------------------------------------------
# safetensors, read lazily through a memory map (the safetensors package has no numpy bf16)

_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"), "F64": np.dtype("<f8")}


def widen_to_float32(data: np.ndarray, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Stored F32/F16/BF16/F64 bytes -> a fresh float32 array of `shape` (bf16 and f16 widened exactly)."""
    raw = np.ascontiguousarray(data).view(np.uint8).view(_DTYPES[dtype]).reshape(shape)
    if dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    end: int


def read_safetensors_index(path: Path) -> dict[str, TensorEntry]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is truncated: too short for a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 << 20):
            raise CheckpointError(f"{path} is truncated or corrupt: header length {n} exceeds the file")
        try:
            meta = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path} is corrupt: its safetensors header is not valid JSON") from None
    entries = {}
    for name, info in meta.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            dtype, shape = info["dtype"], tuple(info["shape"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path} is corrupt: tensor {name} has a malformed header entry") from None
        if dtype not in _DTYPES:
            raise CheckpointError(f"{name} in {path} has dtype {dtype}; dllama reads F32, F16 and BF16 checkpoints")
        if 8 + n + end > size:
            raise CheckpointError(f"{path} is truncated: tensor {name} ends past the end of the file; "
                                  "download it again")
        if end - begin != int(np.prod(shape)) * _DTYPES[dtype].itemsize:
            raise CheckpointError(f"{path} is corrupt: tensor {name} has {end - begin} bytes for shape {list(shape)}")
        entries[name] = TensorEntry(path, dtype, shape, 8 + n + begin, 8 + n + end)
    return entries


_FUSED_EXPERTS = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<kind>gate_up_proj|down_proj)(?:\.weight)?$")


def fused_expert_views(entries: dict[str, TensorEntry]) -> dict[str, TensorEntry]:
    """Per-expert names for MoE experts saved fused, as transformers 5 may save them.

    `experts.gate_up_proj` [E, 2I, H] holds each expert's gate rows then its up rows and
    `experts.down_proj` [E, H, I] each expert's down matrix: every per-expert matrix is a
    contiguous byte range of the fused tensor, so a view is just an offset.
    """
    views = {}
    for name, entry in entries.items():
        match = _FUSED_EXPERTS.match(name)
        if not match or len(entry.shape) != 3:
            continue
        n_experts, rows, cols = entry.shape
        nbytes = rows * cols * _DTYPES[entry.dtype].itemsize
        parts = [("gate_proj", 0, rows // 2), ("up_proj", rows // 2, rows // 2)] if match["kind"] == "gate_up_proj" \
            else [("down_proj", 0, rows)]
        row_bytes = nbytes // rows
        for e in range(n_experts):
            for hf_name, first_row, n_rows in parts:
                start = entry.start + e * nbytes + first_row * row_bytes
                views[f"{match['prefix']}.{e}.{hf_name}.weight"] = TensorEntry(
                    entry.file, entry.dtype, (n_rows, cols), start, start + n_rows * row_bytes)
    return views


class Checkpoint:
    """A Hugging Face checkpoint folder: config plus every tensor, each loaded on demand."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"{self.folder} is not a folder")
        self.config = load_config(self.folder)
        self.files = self._shard_files()
        self.entries: dict[str, TensorEntry] = {}
        for file in self.files:
            self.entries.update(read_safetensors_index(file))
        for name, view in fused_expert_views(self.entries).items():
            self.entries.setdefault(name, view)
        self._maps: dict[Path, np.memmap] = {}

    def _shard_files(self) -> list[Path]:
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
            files = sorted({self.folder / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"shard {missing[0]} named in {index.name} is missing from {self.folder}")
            return files
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"no .safetensors files in {self.folder}; dllama reads safetensors checkpoints only")
        return files

    config_source = "config.json"
    rows_in_file_order = False  # llama q/k rows get the rotary permute on the way to the `.m`

    @property
    def looked_in(self) -> str:
        n = len(self.files)
        return f"looked in {n} safetensors file{'s' if n != 1 else ''} in {self.folder}"

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def get(self, name: str) -> np.ndarray:
        """The tensor as float32 (a fresh array; bf16 and f16 are widened exactly)."""
        entry = self.entries.get(name)
        if entry is None:
            raise CheckpointError(f"{name} is missing from the checkpoint (looked in {len(self.files)} "
                                  f"file{'s' if len(self.files) != 1 else ''})")
        return widen_to_float32(self._map(entry.file)[entry.start:entry.end], entry.dtype, entry.shape)

    def _map(self, file: Path) -> np.memmap:
        if file not in self._maps:
            self._maps[file] = np.memmap(file, dtype=np.uint8, mode="r")
        return self._maps[file]

    def release(self) -> None:
        """Drop the memory maps so their pages stop counting towards this process."""
        self._maps.clear()
