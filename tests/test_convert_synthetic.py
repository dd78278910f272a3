"""Synthetic checkpoints are real Hugging Face checkpoints: the safetensors library and our reader agree."""
from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors import safe_open

from dllama.checkpoint import Checkpoint, header_from_config
from dllama.converter.synthetic import checkpoint_tensors, tiny_config, tinyllama_config, write_checkpoint
from dllama.formats import FloatType, model_file_size


@pytest.mark.parametrize("dtype", ["f16", "f32"])
def test_safetensors_library_reads_what_we_wrote(tmp_path, dtype):
    folder = write_checkpoint(tmp_path, tiny_config("qwen3"), dtype=dtype, seed=1)
    ours = Checkpoint(folder)
    with safe_open(folder / "model.safetensors", "np") as f:
        assert set(f.keys()) == set(ours.entries)
        for name in f.keys():
            assert np.array_equal(f.get_tensor(name).astype(np.float32), ours.get(name))


def test_bf16_checkpoint_holds_the_f32_values_rounded_to_nearest_even(tmp_path):
    bf16 = Checkpoint(write_checkpoint(tmp_path / "bf16", tiny_config(), dtype="bf16", seed=1))
    f32 = Checkpoint(write_checkpoint(tmp_path / "f32", tiny_config(), dtype="f32", seed=1))
    with safe_open(bf16.files[0], "np") as f:  # the library parses our header (numpy cannot hold bf16 values)
        assert set(f.keys()) == set(bf16.entries)
    for name in ("model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight", "model.norm.weight"):
        bits = f32.get(name).view(np.uint32).astype(np.uint64)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16).astype(np.uint32).view(np.float32)
        assert np.array_equal(bf16.get(name), rounded)


def test_magnitudes_are_those_of_trained_models(tmp_path):
    folder = write_checkpoint(tmp_path, tiny_config(hidden_size=256, intermediate_size=512), seed=2)
    ck = Checkpoint(folder)
    w = ck.get("model.layers.0.mlp.up_proj.weight")
    norm = ck.get("model.layers.0.input_layernorm.weight")
    assert 0.018 < w.std() < 0.022 and abs(w.mean()) < 2e-3
    assert 0.9 < norm.mean() < 1.1 and norm.min() > 0.5


def test_shards_index_names_every_tensor_once(tmp_path):
    config = tiny_config("qwen3_moe")
    folder = write_checkpoint(tmp_path, config, shards=3, tie_embeddings=True)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert set(index["weight_map"]) == {name for name, _ in checkpoint_tensors(config, tie_embeddings=True)}
    assert "lm_head.weight" not in index["weight_map"]
    assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is True


def test_same_seed_same_weights_whatever_the_sharding(tmp_path):
    a = Checkpoint(write_checkpoint(tmp_path / "a", tiny_config(), seed=5))
    b = Checkpoint(write_checkpoint(tmp_path / "b", tiny_config(), seed=5, shards=2))
    c = Checkpoint(write_checkpoint(tmp_path / "c", tiny_config(), seed=6))
    name = "model.layers.1.self_attn.o_proj.weight"
    assert np.array_equal(a.get(name), b.get(name)) and not np.array_equal(a.get(name), c.get(name))


def test_tinyllama_config_has_the_benchmark_shape():
    header = header_from_config(tinyllama_config(), FloatType.Q40)
    assert (header.dim, header.hidden_dim, header.n_layers, header.n_heads, header.n_kv_heads, header.vocab_size) == \
        (2048, 5632, 22, 32, 4, 32000)
    n_params = sum(int(np.prod(shape)) for _, shape in checkpoint_tensors(tinyllama_config()))
    assert 2.1e9 < 2 * n_params < 2.3e9  # ~2.2 GB of bf16
    assert model_file_size(header) < 0.9e9
