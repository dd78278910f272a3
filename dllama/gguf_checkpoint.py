"""GGUF files (llama.cpp's format) as a checkpoint: metadata -> config, tensors by Hugging Face name.

Read with the `gguf` package, llama.cpp's own reader. `GGUFCheckpoint` answers like
`checkpoint.Checkpoint` (config, entries, get) so the converter and the validator take either:
- `config` is a config.json-style dict built from the `{arch}.*` metadata;
- `entries` maps Hugging Face tensor names to byte ranges of the file, in the tensor's stored
  type (`TensorEntry.dtype` is the GGML type name: "F32", "Q4_0", "Q6_K", ...);
- `get(name)` dequantizes with `gguf.quants` and returns the Hugging Face layout.

llama.cpp stores llama q/k rows permuted for its rotary pairs exactly as FORMAT.md §1.3 wants
them (convert_hf_to_gguf.py `LlamaModel.permute` is our `permute_rotary_rows`), so GGUF rows go
to the `.m` as they are; `get` undoes the permute to give the Hugging Face rows.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from dllama.checkpoint import CheckpointError, TensorEntry
from dllama.formats import ModelHeader


class GGUFError(CheckpointError):
    """The GGUF file is unreadable or holds something dllama cannot convert."""


# GGUF general.architecture -> config.json model_type
MODEL_TYPE_BY_ARCH = {"llama": "llama", "mistral": "mistral", "qwen3": "qwen3", "qwen3moe": "qwen3_moe"}
ROTARY_PERMUTED_ARCHS = ("llama", "mistral")  # llama.cpp permutes q/k rows for these (see above)

# Hugging Face tensor name -> GGUF tensor name (llama.cpp gguf-py/gguf/tensor_mapping.py)
_GLOBAL_NAMES = {
    "model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
}
_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "mlp.gate": "ffn_gate_inp",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
_EXPERT_NAMES = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}
_HF_BY_GGUF_GLOBAL = {g: h for h, g in _GLOBAL_NAMES.items()}
_HF_BY_GGUF_LAYER = {g: h for h, g in _LAYER_NAMES.items()}
_HF_BY_GGUF_EXPERTS = {g: h for h, g in _EXPERT_NAMES.items()}
_LAYER_TENSOR = re.compile(r"^blk\.(\d+)\.([a-z0-9_]+)\.(weight|bias)$")
_GLOBAL_TENSOR = re.compile(r"^([a-z0-9_]+)\.(weight|bias)$")

FLOAT_TYPES = ("F32", "F16", "BF16")  # read directly by the converter's kernels
# quantized types gguf.quants can dequantize; others (IQ*, TQ*, integer tensors) are refused
DEQUANTIZABLE = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def hf_names(gguf_name: str, shape: tuple[int, ...]) -> dict[str, tuple[int, ...] | None]:
    """Hugging Face names stored in one GGUF tensor -> their expert index (None: the whole tensor)."""
    match = _LAYER_TENSOR.match(gguf_name)
    if match:
        layer, part, kind = match.groups()
        prefix = f"model.layers.{layer}."
        if part in _HF_BY_GGUF_EXPERTS and len(shape) == 3:
            return {f"{prefix}mlp.experts.{e}.{_HF_BY_GGUF_EXPERTS[part]}.{kind}": (e,) for e in range(shape[0])}
        if part in _HF_BY_GGUF_LAYER:
            return {f"{prefix}{_HF_BY_GGUF_LAYER[part]}.{kind}": None}
        return {}
    match = _GLOBAL_TENSOR.match(gguf_name)
    if match and match.group(1) in _HF_BY_GGUF_GLOBAL:
        return {f"{_HF_BY_GGUF_GLOBAL[match.group(1)]}.{match.group(2)}": None}
    return {}


class GGUFCheckpoint:
    """A GGUF file read like a Hugging Face checkpoint folder (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.folder = self.path  # where the converter's messages say it looked
        self.files = [self.path]
        self.reader = _open_reader(self.path)
        self.arch = self.string("general.architecture")
        if self.arch not in MODEL_TYPE_BY_ARCH:
            raise GGUFError(f"{self.path} holds a {self.arch!r} model; dllama converts GGUF architectures "
                            f"{', '.join(MODEL_TYPE_BY_ARCH)}")
        self._tensors = {t.name: t for t in self.reader.tensors}
        self.entries = self._hf_entries()
        self.config = self._config()

    looked_in = property(lambda self: f"looked in {self.path}")
    config_source = "the GGUF metadata"
    rows_in_file_order = True  # q/k rows are stored permuted already (module docstring)

    # -- metadata

    def value(self, key: str, default=None):
        field = self.reader.fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except (ValueError, IndexError, UnicodeDecodeError):
            raise GGUFError(f"{self.path} has an unreadable metadata value {key}; the file is corrupt") from None

    def string(self, key: str) -> str:
        value = self.value(key)
        if not isinstance(value, str):
            raise GGUFError(f"{self.path} lacks the metadata {key}; it is not a complete llama.cpp model file")
        return value

    def arch_value(self, key: str, default=None):
        return self.value(f"{self.arch}.{key}", default)

    def _need(self, key: str):
        value = self.arch_value(key)
        if value is None:
            raise GGUFError(f"{self.path} lacks the metadata {self.arch}.{key}, which the {self.arch} format needs")
        return value

    def _config(self) -> dict:
        """A config.json-style dict; head_dim, eps and rope theta always stated, as the header needs them."""
        heads = int(self._need("attention.head_count"))
        dim = int(self._need("embedding_length"))
        tokens = self.value("tokenizer.ggml.tokens")
        embedding = self.entries.get("model.embed_tokens.weight")
        vocab = self.arch_value("vocab_size") or (len(tokens) if tokens else None) or (embedding.shape[0] if embedding else None)
        config = {
            "model_type": MODEL_TYPE_BY_ARCH[self.arch],
            "hidden_size": dim,
            "intermediate_size": int(self._need("feed_forward_length")),
            "num_hidden_layers": int(self._need("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(self.arch_value("attention.head_count_kv", heads)),
            "head_dim": int(self.arch_value("attention.key_length") or dim // heads),
            "vocab_size": int(vocab) if vocab else None,
            "max_position_embeddings": int(self._need("context_length")),
            "rms_norm_eps": float(self._need("attention.layer_norm_rms_epsilon")),
            "rope_theta": float(self.arch_value("rope.freq_base", 10000.0)),
            "hidden_act": "silu",
            "tie_word_embeddings": "lm_head.weight" not in self.entries,
            "bos_token_id": self.value("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self.value("tokenizer.ggml.eos_token_id"),
        }
        if self.arch == "qwen3moe":
            config.update(num_experts=int(self._need("expert_count")),
                          num_experts_per_tok=int(self._need("expert_used_count")),
                          moe_intermediate_size=int(self._need("expert_feed_forward_length")))
        scaling = self._rope_scaling()
        if scaling:
            config["rope_scaling"] = scaling
        return config

    def _rope_scaling(self) -> dict | None:
        kind = self.arch_value("rope.scaling.type")
        if kind not in (None, "none"):
            raise GGUFError(f"{self.path} uses {kind} rope scaling; the distributed-llama format has only llama3 scaling")
        if "rope_freqs.weight" not in self._tensors:
            return None
        return llama3_scaling_from_freqs(self.get_gguf("rope_freqs.weight"), self.config_head_dim(),
                                         float(self.arch_value("rope.freq_base", 10000.0)), self.path)

    def config_head_dim(self) -> int:
        heads = int(self._need("attention.head_count"))
        return int(self.arch_value("attention.key_length") or int(self._need("embedding_length")) // heads)

    def header(self, float_type) -> ModelHeader:
        from dllama.checkpoint import header_from_config

        return header_from_config(self.config, float_type)

    # -- tensors

    def _hf_entries(self) -> dict[str, TensorEntry]:
        size = self.path.stat().st_size
        entries = {}
        for tensor in self.reader.tensors:
            start = int(tensor.data_offset)
            end = start + int(tensor.n_bytes)
            if end > size:
                raise GGUFError(f"{self.path} is truncated: tensor {tensor.name} ends past the end of the file; download it again")
            shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists ne[0] (the row length) first
            names = hf_names(tensor.name, shape)
            row_bytes = (end - start) // int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else end - start
            for hf_name, expert in names.items():
                if expert is None:
                    entries[hf_name] = TensorEntry(self.path, tensor.tensor_type.name, shape, start, end)
                else:
                    rows = shape[1]
                    first = start + expert[0] * rows * row_bytes
                    entries[hf_name] = TensorEntry(self.path, tensor.tensor_type.name, shape[1:], first, first + rows * row_bytes)
        return entries

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def get(self, name: str) -> np.ndarray:
        """The tensor as float32 in the Hugging Face layout (dequantized, q/k rows un-permuted)."""
        entry = self.entries.get(name)
        if entry is None:
            raise GGUFError(f"{name} is missing from {self.path}")
        values = dequantize(self.raw(entry), entry.dtype, entry.shape)
        permute_heads = self.rotary_heads(name)
        if permute_heads:
            values = unpermute_rotary_rows(values, permute_heads)
        return values

    def get_gguf(self, gguf_name: str) -> np.ndarray:
        tensor = self._tensors[gguf_name]
        shape = tuple(int(n) for n in reversed(tensor.shape))
        return dequantize(np.asarray(tensor.data).reshape(-1).view(np.uint8), tensor.tensor_type.name, shape)

    def raw(self, entry: TensorEntry) -> np.ndarray:
        """The stored bytes of an entry (a view of the reader's memory map)."""
        return self.reader.data[entry.start:entry.end]

    def rotary_heads(self, hf_name: str) -> int | None:
        """Heads over which llama.cpp permuted this tensor's rows, or None."""
        if self.arch not in ROTARY_PERMUTED_ARCHS or not hf_name.endswith(".weight"):
            return None
        if ".self_attn.q_proj." in hf_name:
            return self.config["num_attention_heads"]
        if ".self_attn.k_proj." in hf_name:
            return self.config["num_key_value_heads"]
        return None

    def release(self) -> None:
        """Nothing to drop: the reader's map lives as long as the checkpoint."""


def _open_reader(path: Path):
    from gguf import GGUFReader

    if not path.is_file():
        raise GGUFError(f"{path} does not exist or is not a file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); "
                        "use `dllama-convert hf` for a Hugging Face folder")
    try:
        return GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError) as e:
        raise GGUFError(f"{path} is truncated or corrupt ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                        "download it again") from None


def dequantize(raw: np.ndarray, type_name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Stored GGUF bytes of `type_name` -> float32 values of `shape`."""
    raw = np.ascontiguousarray(raw).view(np.uint8)
    if type_name == "F32":
        return raw.view("<f4").reshape(shape).astype(np.float32)
    if type_name == "F16":
        return raw.view("<f2").reshape(shape).astype(np.float32)
    if type_name == "BF16":
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
    if type_name not in DEQUANTIZABLE:
        raise GGUFError(f"tensor type {type_name} is not supported; dllama reads {', '.join(FLOAT_TYPES + DEQUANTIZABLE)}")
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    qtype = GGMLQuantizationType[type_name]
    rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    return gguf_dequantize(raw.reshape(rows, -1), qtype).astype(np.float32, copy=False).reshape(shape)


def unpermute_rotary_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of formats.permute_rotary_rows: adjacent rotary pairs -> Hugging Face's halves."""
    rows, cols = w.shape
    return w.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


LLAMA3_SCALINGS = [  # (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings) in use
    (8.0, 1.0, 4.0, 8192), (32.0, 1.0, 4.0, 8192), (16.0, 1.0, 4.0, 8192),
]


def llama3_freq_factors(head_dim: int, theta: float, factor: float, low: float, high: float, original: int) -> np.ndarray:
    """What llama.cpp stores in rope_freqs.weight for llama3 rope scaling (divisors of each frequency)."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / freqs
    low_wavelen, high_wavelen = original / low, original / high
    smooth = (original / wavelen - low) / (high - low)
    return np.where(wavelen < high_wavelen, 1.0,
                    np.where(wavelen > low_wavelen, factor, 1.0 / ((1 - smooth) / factor + smooth)))


def llama3_scaling_from_freqs(factors: np.ndarray, head_dim: int, theta: float, path: Path) -> dict:
    """llama.cpp keeps only the per-frequency factors; find the llama3 parameters that give them."""
    for factor, low, high, original in LLAMA3_SCALINGS:
        expected = llama3_freq_factors(head_dim, theta, factor, low, high, original)
        if expected.shape == factors.shape and np.allclose(expected, factors, rtol=1e-3):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                    "original_max_position_embeddings": original}
    raise GGUFError(f"{path} has rope_freqs.weight that matches no known llama3 rope scaling; "
                    "convert the original Hugging Face checkpoint with `dllama-convert hf` instead")
