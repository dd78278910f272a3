"""dllama-convert's library path: byte-exact with the reference converter, on every source layout."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import CHECKPOINTS, CONFORMANCE, FIXTURES, ROOT
from safetensors.numpy import load_file, save_file

from dllama.checkpoint import Checkpoint, header_from_config
from dllama.converter import convert as convert_module
from dllama.converter.convert import convert
from dllama.converter.synthetic import tiny_config, write_checkpoint
from dllama.formats import (
    EmbeddedKind,
    FloatType,
    ModelFile,
    encode_tensor,
    permute_rotary_rows,
    read_model_header,
    read_tokenizer,
    tensor_plan,
    vocabulary_end,
)

EXAMPLE_TOKENIZER = ROOT / "examples" / "tokenizer"  # 512 tokens, bos 510, eos 511


def small_config(model_type: str = "llama", **overrides) -> dict:
    return tiny_config(model_type, **{"vocab_size": 512, "bos_token_id": 510, "eos_token_id": 511, **overrides})


def numpy_reference_bytes(folder: Path, quant: str) -> bytes:
    """The `.m` bytes built the slow, obvious way: whole tensors through formats.encode_tensor."""
    checkpoint = Checkpoint(folder)
    header = header_from_config(checkpoint.config, FloatType.parse(quant))
    parts = [header.to_bytes()]
    for spec in tensor_plan(header):
        name = spec.hf_name if spec.hf_name in checkpoint else spec.fallback_hf_name
        w = checkpoint.get(name)
        if spec.permute_heads:
            w = permute_rotary_rows(w, spec.permute_heads)
        parts.append(encode_tensor(w, spec.float_type).tobytes())
    return b"".join(parts)


def model_bytes(result) -> bytes:
    return result.plan.model_path.read_bytes()


# -- the reference converter's own outputs (../shared/fixtures/conformance)

EXPECTED_QUANTS = ("q40", "q80", "f32")


def test_every_conformance_fixture_and_file_is_compared_below():
    """`--exact` is held to the reference converter's bytes on every fixture: a fixture or an
    expected file added without a place in CHECKPOINTS / EXPECTED_QUANTS would go unchecked."""
    for root in (CONFORMANCE, FIXTURES / "conformance"):
        fixtures = sorted(p.name for p in root.iterdir() if (p / "config.json").is_file())
        assert fixtures == sorted(CHECKPOINTS), root
        for name in fixtures:
            expected = sorted(p.name for p in (root / name).glob("expected_*.m"))
            assert expected == sorted(f"expected_{q}.m" for q in EXPECTED_QUANTS), root / name


@pytest.mark.parametrize("quant", EXPECTED_QUANTS)
def test_model_file_is_byte_identical_to_reference_converter(conformance_dir, tmp_path, quant):
    result = convert(conformance_dir, quant, tmp_path, name="m", exact=True)
    assert model_bytes(result) == (conformance_dir / f"expected_{quant}.m").read_bytes()


def test_tokenizer_without_extension_is_byte_identical_to_reference(conformance_dir, tmp_path):
    result = convert(conformance_dir, None, tmp_path, name="m", embed_tokenizer=False)
    assert result.plan.tokenizer_path.read_bytes() == (conformance_dir / "expected.t").read_bytes()


def test_tokenizer_with_extension_equals_reference_up_to_the_extension(conformance_dir, tmp_path):
    result = convert(conformance_dir, "q40", tmp_path, name="m", exact=True)
    data = result.plan.tokenizer_path.read_bytes()
    expected = (conformance_dir / "expected.t").read_bytes()
    assert vocabulary_end(data) == len(expected)
    assert data[:len(expected)] == expected
    embedded = read_tokenizer(result.plan.tokenizer_path).embedded_source(EmbeddedKind.TOKENIZER_JSON)
    assert embedded == (conformance_dir / "tokenizer.json").read_bytes()


# -- source layouts: sharded, f16/f32, tied/absent lm_head, transformers 5, qwen3_moe

def test_sharded_checkpoint_converts_like_a_single_file(tmp_path):
    one = write_checkpoint(tmp_path / "one", small_config(), seed=3, tokenizer=EXAMPLE_TOKENIZER)
    three = write_checkpoint(tmp_path / "three", small_config(), seed=3, shards=3, tokenizer=EXAMPLE_TOKENIZER)
    assert (three / "model.safetensors.index.json").is_file() and len(Checkpoint(three).files) == 3
    a = model_bytes(convert(one, "q40", tmp_path / "out1", name="m", exact=True))
    b = model_bytes(convert(three, "q40", tmp_path / "out3", name="m", exact=True))
    assert a == b == numpy_reference_bytes(one, "q40")


@pytest.mark.parametrize("dtype,quant", [("f16", "q40"), ("f16", "q80"), ("f32", "q40"), ("f32", "f16"),
                                         ("bf16", "f16"), ("bf16", "f32")])
def test_f16_f32_and_bf16_sources_match_the_numpy_reference(tmp_path, dtype, quant):
    folder = write_checkpoint(tmp_path / "ck", small_config(), dtype=dtype, tokenizer=EXAMPLE_TOKENIZER)
    written = model_bytes(convert(folder, quant, tmp_path / "out", name="m", exact=True))
    assert written == numpy_reference_bytes(folder, quant)


def test_f64_source_converts_like_its_f32_values(tmp_path):
    folder = write_checkpoint(tmp_path / "ck", small_config(), dtype="f32", tokenizer=EXAMPLE_TOKENIZER)
    f32 = model_bytes(convert(folder, "q40", tmp_path / "out32", name="m", exact=True))
    tensors = load_file(folder / "model.safetensors")
    save_file({k: v.astype(np.float64) for k, v in tensors.items()}, folder / "model.safetensors")
    assert model_bytes(convert(folder, "q40", tmp_path / "out64", name="m", exact=True)) == f32


def test_tied_embeddings_store_the_embedding_as_lm_head(tmp_path):
    folder = write_checkpoint(tmp_path / "ck", small_config(), tie_embeddings=True, tokenizer=EXAMPLE_TOKENIZER)
    assert "lm_head.weight" not in Checkpoint(folder)
    result = convert(folder, "q80", tmp_path / "out", name="m")
    model = ModelFile(result.plan.model_path)
    assert np.array_equal(model.raw("lm_head"), encode_tensor(model.tensor("embedding"), FloatType.Q80))


def test_absent_lm_head_with_an_untied_config_falls_back_to_the_embedding(tmp_path):
    folder = write_checkpoint(tmp_path / "ck", small_config(), tie_embeddings=True, tokenizer=EXAMPLE_TOKENIZER)
    config = json.loads((folder / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (folder / "config.json").write_text(json.dumps(config))
    written = model_bytes(convert(folder, "q40", tmp_path / "out", name="m", exact=True))
    assert written == numpy_reference_bytes(folder, "q40")


def transformers5_layout(config: dict) -> dict:
    """The same model as transformers 5 writes config.json: rope_parameters, num_local_experts."""
    config = dict(config)
    theta = config.pop("rope_theta")
    scaling = config.pop("rope_scaling", None) or {"rope_type": "default"}
    config["rope_parameters"] = {"rope_theta": theta, **scaling}
    if "num_experts" in config:
        config["num_local_experts"] = config.pop("num_experts")
    return config


def test_qwen3_moe_checkpoint_matches_the_numpy_reference(tmp_path):
    folder = write_checkpoint(tmp_path / "ck", small_config("qwen3_moe"), shards=2, tokenizer=EXAMPLE_TOKENIZER)
    result = convert(folder, "q40", tmp_path / "out", name="m", exact=True)
    assert model_bytes(result) == numpy_reference_bytes(folder, "q40")
    header = read_model_header(result.plan.model_path)
    assert (header.n_experts, header.n_active_experts, header.moe_hidden_dim) == (4, 2, 64)


@pytest.mark.parametrize("norm_topk_prob", [False, None])
def test_qwen3_moe_without_renormalised_expert_weights_is_refused(tmp_path, norm_topk_prob):
    """The format always renormalises the top-k weights; false (transformers' default) would compute otherwise."""
    folder = write_checkpoint(tmp_path / "ck", small_config("qwen3_moe"), tokenizer=EXAMPLE_TOKENIZER)
    config = json.loads((folder / "config.json").read_text())
    config.pop("norm_topk_prob")
    if norm_topk_prob is not None:
        config["norm_topk_prob"] = norm_topk_prob
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="norm_topk_prob false"):
        convert(folder, "q40", tmp_path / "out", name="m")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_transformers5_config_layout_writes_the_same_file_as_transformers4(tmp_path):
    config4 = small_config("qwen3_moe")
    folder = write_checkpoint(tmp_path / "ck", config4, tokenizer=EXAMPLE_TOKENIZER)
    v4 = model_bytes(convert(folder, "q40", tmp_path / "out4", name="m", exact=True))
    (folder / "config.json").write_text(json.dumps(transformers5_layout(config4)))
    v5 = convert(folder, "q40", tmp_path / "out5", name="m", exact=True)
    assert model_bytes(v5) == v4
    header = read_model_header(v5.plan.model_path)
    assert header.n_experts == 4 and header.rope_theta == 1_000_000


def fuse_experts(folder: Path, n_layers: int, n_experts: int) -> None:
    """Rewrite an f32 checkpoint with experts fused as transformers 5 saves them (gate_up_proj, down_proj)."""
    tensors = load_file(folder / "model.safetensors")
    for layer in range(n_layers):
        p = f"model.layers.{layer}.mlp.experts"

        def take(e: int, kind: str, p: str = p) -> np.ndarray:
            return tensors.pop(f"{p}.{e}.{kind}.weight")

        gate_up = [np.concatenate([take(e, "gate_proj"), take(e, "up_proj")]) for e in range(n_experts)]
        tensors[f"{p}.gate_up_proj"] = np.stack(gate_up)
        tensors[f"{p}.down_proj"] = np.stack([take(e, "down_proj") for e in range(n_experts)])
    save_file(tensors, folder / "model.safetensors")


def test_transformers5_fused_moe_experts_convert_like_per_expert_tensors(tmp_path):
    config = small_config("qwen3_moe")
    folder = write_checkpoint(tmp_path / "ck", config, dtype="f32", tokenizer=EXAMPLE_TOKENIZER)
    per_expert = model_bytes(convert(folder, "q40", tmp_path / "out1", name="m", exact=True))
    fuse_experts(folder, config["num_hidden_layers"], config["num_experts"])
    (folder / "config.json").write_text(json.dumps(transformers5_layout(config)))
    assert "model.layers.0.mlp.experts.0.gate_proj.weight" not in load_file(folder / "model.safetensors")
    assert model_bytes(convert(folder, "q40", tmp_path / "out2", name="m", exact=True)) == per_expert


def test_llama3_rope_scaling_inside_rope_parameters_reaches_the_header(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    config = transformers5_layout(small_config(rope_theta=500000.0, rope_scaling=scaling))
    folder = write_checkpoint(tmp_path / "ck", config, tokenizer=EXAMPLE_TOKENIZER)
    header = read_model_header(convert(folder, "q40", tmp_path / "out", name="m", exact=True).plan.model_path)
    assert (header.rope_theta, header.rope_scaling_factor, header.rope_scaling_orig_max_seq_len) == (500000, 32, 8192)
    assert header.rope_type == 2


def test_mistral_converts_as_llama_arch_with_permuted_q_k(tmp_path):
    folder = write_checkpoint(tmp_path / "ck", small_config("mistral"), tokenizer=EXAMPLE_TOKENIZER)
    result = convert(folder, "f32", tmp_path / "out", name="m")
    model = ModelFile(result.plan.model_path)
    assert model.header.arch.name == "LLAMA"
    q = Checkpoint(folder).get("model.layers.0.self_attn.q_proj.weight")
    assert np.array_equal(model.tensor("layers.0.q"), permute_rotary_rows(q, 4))
    assert not np.array_equal(model.tensor("layers.0.q"), q)


# -- streaming: small chunks must give the same bytes as whole tensors

@pytest.mark.parametrize("quant", ["q40", "f32"])
def test_converting_in_small_row_chunks_gives_the_same_bytes(tmp_path, monkeypatch, quant):
    monkeypatch.setattr(convert_module, "CHUNK_SOURCE_BYTES", 1000)  # a few rows (or one head) per chunk
    folder = write_checkpoint(tmp_path / "ck", small_config(), tokenizer=EXAMPLE_TOKENIZER)
    written = model_bytes(convert(folder, quant, tmp_path / "out", name="m", exact=True))
    assert written == numpy_reference_bytes(folder, quant)


def test_progress_reports_every_source_byte_once(tmp_path, monkeypatch):
    monkeypatch.setattr(convert_module, "CHUNK_SOURCE_BYTES", 4096)
    folder = write_checkpoint(tmp_path / "ck", small_config(), tokenizer=EXAMPLE_TOKENIZER)
    steps = []
    result = convert(folder, "q40", tmp_path / "out", name="m", progress=steps.append, exact=True)
    assert sum(steps) == result.plan.source_bytes == (folder / "model.safetensors").stat().st_size - \
        min(e.start for e in Checkpoint(folder).entries.values())
    assert len(steps) > len(result.plan.tensors)  # chunked, so the bar moves within big tensors


def test_output_file_names_follow_the_reference_convention(tmp_path):
    folder = write_checkpoint(tmp_path / "ck", small_config(), tokenizer=EXAMPLE_TOKENIZER)
    result = convert(folder, "q80", tmp_path / "out", name="tiny")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["dllama_model_tiny_q80.m",
                                                                    "dllama_tokenizer_tiny.t"]
    assert set(result.sizes) == {result.plan.model_path, result.plan.tokenizer_path}


def test_llama2_style_tokenizer_json_converts_alone(llama2_tokenizer_dir, tmp_path):
    result = convert(llama2_tokenizer_dir, None, tmp_path, name="llama2")
    tok = read_tokenizer(result.plan.tokenizer_path)
    assert tok.vocab_size == 32000 and tok.bos_id == 1 and tok.eos_ids == [2]
    assert tok.tokens[3 + 0x41] == b"A"  # <0x41> byte-fallback piece is the byte itself
