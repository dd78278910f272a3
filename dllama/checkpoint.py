"""Hugging Face checkpoints: config.json -> ModelHeader, and lazy tensors from (sharded) safetensors.

Shared by the converter and the validator's reference forward. Tensors are read from
memory-mapped files one at a time, so nothing ever holds the whole model.
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dllama.errors import DllamaError
from dllama.formats import HEADER_LIMITS, ArchType, FloatType, HiddenAct, ModelHeader, RopeType


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
    return read_json_object(path, "config.json")


def read_json_object(path: Path, what: str, max_bytes: int = 64 << 20) -> dict:
    """A JSON file that must hold an object (config.json, an index), bounded in size."""
    if path.stat().st_size > max_bytes:
        raise CheckpointError(f"{path} is {path.stat().st_size} bytes, far more than a {what} holds; it is not one")
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} is not UTF-8 text; download it again") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        raise CheckpointError(f"{path} nests too deeply to be a {what}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} holds a JSON {type(value).__name__}, not the object a {what} is")
    return value


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


# config.json key -> the header field whose HEADER_LIMITS bound it
_CONFIG_LIMITS = {
    "hidden_size": "dim", "intermediate_size": "hidden_dim", "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads", "num_key_value_heads": "n_kv_heads", "vocab_size": "vocab_size",
    "max_position_embeddings": "max_seq_len", "num_experts": "n_experts", "num_local_experts": "n_experts",
    "num_experts_per_tok": "n_active_experts", "head_dim": "head_dim_value", "moe_intermediate_size": "moe_hidden_dim",
}
# the header stores rope values as int32 (FORMAT.md §1.1)
_INT32_MAX = 2**31 - 1


class _ConfigReader:
    """Typed, bounded values of a config dict; errors name `where` and the key."""

    def __init__(self, config: dict, where: str):
        self.config, self.where = config, where

    def fail(self, key: str, value, wanted: str) -> CheckpointError:
        return CheckpointError(f"{self.where} has {key} = {_short(value)}, not {wanted}; fix it or download the "
                               "checkpoint again")

    def integer(self, key: str, value=None, low: int = 0, high: int = _INT32_MAX) -> int:
        value = self.config.get(key) if value is None else value
        limit = HEADER_LIMITS.get(_CONFIG_LIMITS.get(key, ""))
        low, high = limit if limit else (low, high)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.fail(key, value, f"a whole number in {low}..{high}")
        return value

    def optional_integer(self, key: str, low: int = 0) -> int | None:
        value = self.config.get(key)
        return None if value is None else self.integer(key, value, low)

    def number(self, key: str, value, low: float = 0.0, high: float = float(_INT32_MAX)) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise self.fail(key, value, f"a number in {low:g}..{high:g}")
        return float(value)

    def name(self, key: str, default: str | None = None) -> str | None:
        value = self.config.get(key, default)
        if value is not None and not isinstance(value, str):
            raise self.fail(key, value, "a name")
        return value


def _short(value) -> str:
    text = json.dumps(value) if isinstance(value, (dict, list, str, int, float, bool, type(None))) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def header_from_config(config: dict, float_type: FloatType, where: str = "config.json") -> ModelHeader:
    """The `.m` header the reference converter would write for this config (FORMAT.md §1.1).
    Every value is type- and range-checked first: `where` (the file) and the key are in each error."""
    c = _ConfigReader(config, where)
    model_type = c.name("model_type")
    arch = ARCH_BY_MODEL_TYPE.get(model_type)
    if arch is None:
        raise CheckpointError(f"unsupported model_type {model_type!r} in {where}: dllama converts "
                              f"{', '.join(ARCH_BY_MODEL_TYPE)}")
    act_name = c.name("hidden_act", "silu")
    if act_name not in HIDDEN_ACT_BY_NAME:
        raise CheckpointError(f"unsupported hidden_act {act_name!r} in {where}: only silu and gelu exist in the format")

    def need(key: str) -> int:
        if config.get(key) is None:
            raise CheckpointError(f"{where} lacks {key!r}, which the {model_type} format needs")
        return c.integer(key)

    dim = need("hidden_size")
    n_heads = need("num_attention_heads")
    experts_key = "num_experts" if config.get("num_experts") else "num_local_experts"
    n_experts = c.integer(experts_key) if config.get(experts_key) else 0
    if arch == ArchType.QWEN3_MOE and n_experts == 0:
        raise CheckpointError(f"{where} of a qwen3_moe model names no experts (num_experts / num_local_experts)")
    if arch == ArchType.QWEN3_MOE and not config.get("norm_topk_prob", False):
        # transformers' default is false; distributed-llama always renormalises the chosen experts' weights
        raise CheckpointError(f"{where} of this qwen3_moe model has norm_topk_prob false (transformers' default "
                              "when the key is absent), but the format always renormalises the top-k expert weights: "
                              "the converted model would compute something else, so dllama cannot convert it")
    theta, scaling = rope_settings(config)
    fields: dict = {}
    if theta is not None:
        fields["rope_theta"] = int(c.number("rope_theta", theta, low=1.0))
    if scaling is not None:
        fields.update(_llama3_scaling(c, scaling))
    if config.get("head_dim") is not None:
        fields["head_dim_value"] = c.integer("head_dim")
    if config.get("rms_norm_eps") is not None:
        eps = c.number("rms_norm_eps", config["rms_norm_eps"], high=1.0)
        code = next((code for v, code in NORM_EPSILON_CODE_BY_VALUE.items() if abs(eps - v) < 1e-12), None)
        if code is None:
            raise CheckpointError(f"unsupported rms_norm_eps {eps} in {where}: the format stores only 1e-5 and 1e-6")
        fields["norm_epsilon_code"] = code
    if config.get("moe_intermediate_size") is not None:
        fields["moe_hidden_dim"] = c.integer("moe_intermediate_size")
    n_kv_heads = c.integer("num_key_value_heads") if config.get("num_key_value_heads") else n_heads
    active = c.integer("num_experts_per_tok") if n_experts and config.get("num_experts_per_tok") else 0
    header = ModelHeader(
        arch=arch,
        dim=dim,
        hidden_dim=need("intermediate_size"),
        n_layers=need("num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        vocab_size=need("vocab_size"),
        max_seq_len=need("max_position_embeddings"),
        weights_float_type=float_type,
        hidden_act=HIDDEN_ACT_BY_NAME[act_name],
        n_experts=n_experts,
        n_active_experts=active,
        **fields,
    )
    if header.head_dim < 1:
        raise CheckpointError(f"{where} has {n_heads} attention heads for hidden_size {dim}: no head is a whole "
                              "value wide")
    return header


def _llama3_scaling(c: _ConfigReader, scaling) -> dict:
    if not isinstance(scaling, dict):
        raise c.fail("rope_scaling", scaling, "an object")
    rope_name = scaling.get("rope_type") or scaling.get("type")
    if not isinstance(rope_name, str) or rope_name not in ROPE_TYPE_BY_NAME:
        raise CheckpointError(f"unsupported rope scaling type {rope_name!r:.40} in {c.where}: only llama3 scaling "
                              "exists in the format")
    values = {}
    for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        if key not in scaling:
            raise CheckpointError(f"{c.where} has llama3 rope_scaling without {key}")
        values[key] = int(c.number(f"rope_scaling.{key}", scaling[key]))
    return dict(
        rope_scaling_factor=values["factor"],
        rope_scaling_low_freq_factor=values["low_freq_factor"],
        rope_scaling_high_freq_factor=values["high_freq_factor"],
        rope_scaling_orig_max_seq_len=values["original_max_position_embeddings"],
        rope_type=ROPE_TYPE_BY_NAME[rope_name],
    )


# --------------------------------------------------------------------------------------------
# safetensors, read lazily through a memory map (the safetensors package has no numpy bf16)

_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"), "F64": np.dtype("<f8")}


def widen_to_float32(data: np.ndarray, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Stored F32/F16/BF16/F64 bytes -> a fresh float32 array of `shape` (bf16 and f16 widened exactly)."""
    raw = np.ascontiguousarray(data).view(np.uint8).view(_DTYPES[dtype]).reshape(shape)
    if dtype == "BF16":
        bits = raw.astype(np.uint32)
        bits <<= 16  # in place: one float32-sized array, not two
        return bits.view(np.float32)
    return raw.astype(np.float32)


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    end: int


MAX_SAFETENSORS_HEADER = 100 << 20  # the safetensors library's own limit


def read_safetensors_index(path: Path) -> dict[str, TensorEntry]:
    """Every tensor's dtype, shape and byte range, checked as the safetensors library checks them
    (issue 28): a JSON object of entries whose ranges tile the data exactly, no gap, no overlap."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is truncated: too short for a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, MAX_SAFETENSORS_HEADER):
            raise CheckpointError(f"{path} is truncated or corrupt: header length {n} exceeds the file")
        try:
            meta = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise CheckpointError(f"{path} is corrupt: its safetensors header is not valid JSON") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} is corrupt: its safetensors header is a JSON {type(meta).__name__}, not an "
                              "object")
    data_size = size - 8 - n
    entries = {name: _tensor_entry(path, name, info, 8 + n, data_size)
               for name, info in meta.items() if name != "__metadata__"}
    _check_tiling(path, entries, 8 + n, data_size)
    return entries


def _tensor_entry(path: Path, name: str, info, data_start: int, data_size: int) -> TensorEntry:
    def corrupt(what: str) -> CheckpointError:
        return CheckpointError(f"{path} is corrupt: tensor {name} has {what}; download it again")

    if not isinstance(info, dict):
        raise corrupt("a malformed header entry")
    offsets, dtype, shape = info.get("data_offsets"), info.get("dtype"), info.get("shape")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(v) for v in offsets)):
        raise corrupt(f"data_offsets {_short(offsets)}, not two byte offsets")
    if not (isinstance(shape, list) and len(shape) <= 8 and all(_is_count(v) for v in shape)):
        raise corrupt(f"shape {_short(shape)}, not a list of sizes")
    if not isinstance(dtype, str):
        raise corrupt(f"dtype {_short(dtype)}")
    if dtype not in _DTYPES:
        raise CheckpointError(f"{name} in {path} has dtype {dtype}; dllama reads F32, F16 and BF16 checkpoints")
    begin, end = offsets
    if not begin <= end <= data_size:
        what = "truncated: tensor {name} ends past the end of the file" if end > data_size else \
            f"corrupt: tensor {name} has data_offsets [{begin}, {end}]"
        raise CheckpointError(f"{path} is {what.format(name=name)}; download it again")
    if end - begin != math.prod(shape) * _DTYPES[dtype].itemsize:
        raise CheckpointError(f"{path} is corrupt: tensor {name} has {end - begin} bytes for shape {shape}")
    return TensorEntry(path, dtype, tuple(shape), data_start + begin, data_start + end)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 48


def _check_tiling(path: Path, entries: dict[str, TensorEntry], data_start: int, data_size: int) -> None:
    at = data_start
    for name, entry in sorted(entries.items(), key=lambda item: (item[1].start, item[1].end)):
        if entry.start != at:
            what = "overlaps the tensor before it" if entry.start < at else "leaves a gap before it"
            raise CheckpointError(f"{path} is corrupt: tensor {name} {what} (safetensors data is one tensor after "
                                  "another); download it again")
        at = entry.end
    if at != data_start + data_size:
        raise CheckpointError(f"{path} is corrupt: {data_start + data_size - at} bytes after its last tensor; download "
                              "it again")


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


def _is_shard_name(name) -> bool:
    """A file name in the checkpoint's own folder: an index cannot point elsewhere on the disk."""
    return isinstance(name, str) and name.endswith(".safetensors") and Path(name).name == name and name[0] != "."


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
            weight_map = read_json_object(index, "safetensors index").get("weight_map")
            if not isinstance(weight_map, dict) or not all(_is_shard_name(f) for f in weight_map.values()):
                raise CheckpointError(f"{index} is corrupt: its weight_map must map tensor names to shard files in "
                                      "this folder; download it again")
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

    def header(self, float_type: FloatType) -> ModelHeader:
        return header_from_config(self.config, float_type, where=str(self.folder / "config.json"))
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

    def get_rows(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Some rows of a matrix as float32, reading only those."""
        entry = self.entries[name]
        stored = self.stored(name).reshape(entry.shape[0], -1)[rows]
        return widen_to_float32(stored, entry.dtype, (len(rows),) + tuple(entry.shape[1:]))

    def stored(self, name: str) -> np.ndarray:
        """The tensor's bytes as the file stores them (a view of its map, until release())."""
        entry = self.entries[name]
        return self._map(entry.file)[entry.start:entry.end]

    def _map(self, file: Path) -> np.memmap:
        if file not in self._maps:
            self._maps[file] = np.memmap(file, dtype=np.uint8, mode="r")
        return self._maps[file]

    def release(self) -> None:
        """Drop the memory maps so their pages stop counting towards this process."""
        self._maps.clear()
