"""dllama's GGUF reader against Hugging Face transformers' own reading of the same files.

tests/fixtures/transformers_gguf/ holds what transformers (with torch; neither a dllama dependency)
loaded from each GGUF: every tensor's sha256 as float32 in the Hugging Face layout, and the logits
of a prompt (make_fixtures.py there made them). So the dequantization (F16, BF16, Q4_1, Q5_0, Q5_1,
Q8_0, and Q2_K to Q6_K in files llama-quantize wrote), the q/k un-permutation and the GGUF route's f32
conversion are checked against code that shares nothing with dllama's. Llama 3's rope scaling, which a
GGUF keeps only as rope_freqs.weight, is checked against transformers on the checkpoint llama.cpp's
converter made the file from; the "mistral" architecture name against transformers' "llama" reading.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT

from dllama.converter.convert import convert
from dllama.gguf_checkpoint import GGUFCheckpoint
from dllama.runtime.engine import Engine

FIXTURES = ROOT / "tests" / "fixtures" / "transformers_gguf"
READING = json.loads((FIXTURES / "transformers_reading.json").read_text())["files"]
TINY = sorted(name for name in READING if name.startswith("tiny-"))
# measured: <= 2.2e-6 between our f32 forward and transformers' on the conformance models; 10x that
# catches a wrong norm epsilon or a q/k row order off by one head (both move logits by > 1e-3)
TINY_LOGITS_TOLERANCE = 2e-5
# measured: 5.3e-5 on SmolLM2 (30 layers, logits up to 30: float32 sums in another order); 10x that
# is still 100x under what one wrong layer or epsilon does to them
SMOLLM2_LOGITS_TOLERANCE = 5e-4


def sha256_f32(values: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(values, dtype=np.float32).tobytes()).hexdigest()


def assert_tensors_equal_transformers(gguf: Path) -> int:
    expected = READING[gguf.name]["tensors"]
    ckpt = GGUFCheckpoint(gguf)
    names = [name for name in expected if name in ckpt]
    wrong = [name for name in names if sha256_f32(ckpt.get(name)) != expected[name]["sha256"]]
    assert not wrong, f"{len(wrong)} tensors differ from transformers' reading, the first {wrong[0]}"
    return len(names)


@pytest.mark.parametrize("name", TINY)
def test_tiny_gguf_tensors_are_bit_identical_to_transformers(name):
    assert assert_tensors_equal_transformers(FIXTURES / name) == len(READING[name]["tensors"])


@pytest.mark.parametrize("name", TINY)
def test_tiny_gguf_converted_to_f32_gives_transformers_logits(name, tmp_path):
    result = convert(FIXTURES / name, "f32", tmp_path, name="m")
    engine = Engine.load(result.plan.model_path)
    expected = np.load(FIXTURES / name.replace(".gguf", ".logits.npz"))
    for prompt, ids in READING[name]["prompts"].items():
        engine.reset()
        got = engine.forward(ids, 0)
        assert np.abs(got - expected[prompt]).max() <= TINY_LOGITS_TOLERANCE
        assert (got.argmax(-1) == expected[prompt].argmax(-1)).all()


def test_smollm2_gguf_tensors_are_bit_identical_to_transformers(smollm2_gguf):
    """Every tensor transformers builds from the GGUF, the tied lm_head aside (the format has none)."""
    assert assert_tensors_equal_transformers(smollm2_gguf) >= 272


def test_smollm2_gguf_f32_conversion_gives_transformers_logits(smollm2_files, smollm2_gguf):
    engine = Engine.load(smollm2_files["f32"])
    expected = np.load(FIXTURES / f"{smollm2_gguf.stem}.logits.npz")
    for prompt, ids in READING[smollm2_gguf.name]["prompts"].items():
        engine.reset()
        got = engine.forward(ids, 0)
        assert np.abs(got - expected[prompt]).max() <= SMOLLM2_LOGITS_TOLERANCE
        assert (got.argmax(-1) == expected[prompt].argmax(-1)).all()


def test_llama3_rope_scaling_recovered_from_rope_freqs_gives_transformers_logits(tmp_path):
    """llama.cpp's converter keeps Llama 3's rope scaling only as per-frequency divisors (rope_freqs.weight);
    dllama must find the scaling they came from. Measured: 2.4e-6 from transformers on the original folder
    over 200 positions; the same model without the scaling is 0.056 away, 2800x the tolerance."""
    rope = json.loads((FIXTURES / "transformers_reading.json").read_text())["llama3_rope"]
    assert GGUFCheckpoint(FIXTURES / rope["file"]).config["rope_scaling"] == rope["rope_scaling"]
    result = convert(FIXTURES / rope["file"], "f32", tmp_path, name="m")
    expected = np.load(FIXTURES / rope["file"].replace(".gguf", ".logits.npz"))["long"]
    got = Engine.load(result.plan.model_path).forward(rope["prompts"]["long"], 0)
    assert np.abs(got - expected).max() <= TINY_LOGITS_TOLERANCE


def test_mistral_architecture_name_reads_as_transformers_reads_the_llama_one(tmp_path):
    """A GGUF whose general.architecture is "mistral" (keys mistral.*), the tensors of tiny-llama-f16.gguf:
    transformers' gguf-py knows no such architecture (llama.cpp writes Mistral 7B as "llama"), so its reading
    of the llama-named copy is the reference."""
    from gguf_helpers import write_gguf_like

    source = FIXTURES / "tiny-llama-f16.gguf"
    mistral = write_gguf_like(source, tmp_path / "tiny-mistral-f16.gguf", arch="mistral")
    assert GGUFCheckpoint(mistral).config["model_type"] == "mistral"
    expected_tensors = READING[source.name]["tensors"]
    ckpt = GGUFCheckpoint(mistral)
    assert all(sha256_f32(ckpt.get(name)) == t["sha256"] for name, t in expected_tensors.items() if name in ckpt)
    result = convert(mistral, "f32", tmp_path / "out", name="m")
    engine = Engine.load(result.plan.model_path)
    expected = np.load(FIXTURES / "tiny-llama-f16.logits.npz")
    for prompt, ids in READING[source.name]["prompts"].items():
        engine.reset()
        assert np.abs(engine.forward(ids, 0) - expected[prompt]).max() <= TINY_LOGITS_TOLERANCE
