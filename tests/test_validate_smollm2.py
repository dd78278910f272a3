"""dllama-validate on a real model (SmolLM2-135M-Instruct, issue 12): correct f32/q80/q40
conversions pass, and each classic failure, made by mutating a correct conversion, fails with its
own reason, with the checkpoint (--hf, a GGUF file) and from a REF.npz made on the original alone.

One REF.npz is computed per session (~25 s); the mutations are validated against it, the
--hf runs adding the checks that need the checkpoint (weights, source tokenizer).
"""
from __future__ import annotations

from pathlib import Path

import pytest
from validate_helpers import (
    MODEL_MUTATIONS,
    TOKENIZER_MUTATIONS,
    write_model_with,
    write_tokenizer_with,
)

from dllama.cli.dllama_validate import main
from dllama.validate.reference import DEFAULT_PROMPTS, ReferenceLogits
from dllama.validate.report import Status
from dllama.validate.validator import Options, validate

FAST = Options(corpus_limit=60)


def failing(report) -> dict[str, str]:
    return {c.name: c.reason for c in report.checks if c.status == Status.FAIL}


@pytest.fixture(scope="session")
def smollm2_ref(smollm2_gguf, tmp_path_factory) -> Path:
    """`dllama-validate reference --hf SmolLM2.gguf --out ref.npz` (q40 and q80 runs by default)."""
    path = tmp_path_factory.mktemp("smollm2_ref") / "ref.npz"
    with pytest.raises(SystemExit) as exit_info:
        main(["reference", "--hf", str(smollm2_gguf), "--out", str(path), "-q"])
    assert exit_info.value.code in (0, None)
    return path


def test_reference_file_made_from_the_gguf_carries_what_a_board_needs(smollm2_ref, smollm2_files):
    from dllama.checkpoint import header_from_config
    from dllama.formats import FloatType, read_model_header

    ref = ReferenceLogits.load(smollm2_ref)
    assert set(ref.traces) == {"q40", "q80"} and ref.prompts == list(DEFAULT_PROMPTS)
    assert header_from_config(ref.config, FloatType.Q40) == read_model_header(smollm2_files["q40"])
    assert (ref.bos_id, ref.eos_ids) == (1, [2])
    assert ref.traces["q40"].states.shape[0] == 2 * 30 + 1


# --------------------------------------------------------------------------------------------
# Must hold 1: correct conversions pass

def test_correct_q40_passes_with_the_gguf_as_original_and_a_quality_warning(smollm2_files, smollm2_gguf):
    report = validate(smollm2_files["q40"], smollm2_files["tokenizer"], hf=smollm2_gguf, options=FAST)
    assert report.ok, failing(report)
    ran = {c.name for c in report.checks if c.status != Status.SKIP}
    assert {"model.weights_vs_checkpoint", "tokenizer.vs_source", "logits.correctness", "logits.quality"} <= ran
    quality = report.get("logits.quality")
    assert quality.status == Status.WARN and quality.details["grade"] == "poor"
    assert "use q80 for a model this small" in quality.reason
    assert report.get("logits.correctness").details["worst_block"].startswith("layer")


@pytest.mark.parametrize("quant, grade", [("f32", "excellent"), ("q80", "good"), ("q40", "poor")])
def test_correct_conversions_pass_from_a_reference_file(smollm2_files, smollm2_ref, quant, grade):
    report = validate(smollm2_files[quant], smollm2_files["tokenizer"], reference=smollm2_ref, options=FAST)
    assert report.ok, failing(report)
    assert report.get("logits.correctness").status == Status.PASS
    assert report.get("tokenizer.vs_reference").status == Status.PASS
    assert report.get("logits.quality").details["grade"] == grade


# --------------------------------------------------------------------------------------------
# Must hold 2 and 3: each classic failure fails with its own reason, with and without the checkpoint

# mutation -> (quant it mutates, {check: words its reason must hold} from REF.npz alone,
#              the same with --hf as well)
MODEL_REASONS = {
    "q/k rows not permuted": ("q40", {"logits.correctness": "from layer 0 attention"},
                              {"model.weights_vs_checkpoint": "q/k rows NOT permuted"}),
    "rope_theta 10000 (not 100000)": ("q40", {"model.header_vs_config": "rope_theta is 10000 in the .m but 100000",
                                              "logits.correctness": "does not compute"}, {}),
    "rms eps 1e-6 (not 1e-5)": ("q40", {"model.header_vs_config": "norm_epsilon_code is 6 in the .m but 5"}, {}),
    "w2 of layers 10/11 swapped": ("q40", {"logits.correctness": "from layer 10 ffn"},
                                   {"model.weights_vs_checkpoint": "holds model.layers.11.mlp.down_proj.weight instead "
                                                                   "of "
                                                                   "model.layers.10.mlp.down_proj.weight"}),
    "truncated": ("q40", {"model.file_size": "truncated"}, {}),
    # with --hf too: test_validate.py::test_bf16_read_as_f16_is_named_against_the_checkpoint (a bf16 fixture, fast)
    "bf16 source read as f16": ("f32", {"model.tensors": "bf16 bytes read as f16", "logits.quality": "garbage"}, {}),
}
TOKENIZER_REASONS = {
    "tokenizer of another model (ids permuted)": ({"tokenizer.vs_reference": "belongs to another model"},
                                                  {"tokenizer.vs_source": "not the source's",
                                                   "tokenizer.faithful": "tokenizes differently"}),
    "vocab off by one": ({"tokenizer.vocab_size": "differ by one token"}, {}),
    "bos/eos swapped": ({"tokenizer.special_ids": "swapped"}, {}),
}


def assert_reasons(report, expected: dict[str, str]) -> None:
    reasons = failing(report)
    for check, words in expected.items():
        assert check in reasons, (check, reasons)
        assert words in reasons[check], (check, reasons[check])


@pytest.mark.parametrize("name", MODEL_REASONS)
def test_model_mutation_fails_with_its_reason(name, smollm2_files, smollm2_gguf, smollm2_ref, tmp_path):
    quant, from_ref, with_hf = MODEL_REASONS[name]
    bad = write_model_with(tmp_path / "bad.m", smollm2_files[quant], MODEL_MUTATIONS[name])
    ref_only = validate(bad, smollm2_files["tokenizer"], reference=smollm2_ref, options=FAST)
    assert_reasons(ref_only, from_ref)
    assert not any(n.startswith("tokenizer.") for n in failing(ref_only))
    if with_hf:
        both = validate(bad, smollm2_files["tokenizer"], hf=smollm2_gguf, reference=smollm2_ref, options=FAST)
        assert_reasons(both, {**from_ref, **with_hf})


@pytest.mark.parametrize("name", TOKENIZER_REASONS)
def test_tokenizer_mutation_fails_with_its_reason(name, smollm2_files, smollm2_gguf, smollm2_ref, tmp_path):
    from_ref, with_hf = TOKENIZER_REASONS[name]
    bad = write_tokenizer_with(tmp_path / "bad.t", smollm2_files["tokenizer"], TOKENIZER_MUTATIONS[name])
    ref_only = validate(smollm2_files["q40"], bad, reference=smollm2_ref, options=FAST)
    assert_reasons(ref_only, from_ref)
    assert ref_only.get("logits.correctness").status == Status.PASS  # the model file is fine
    if with_hf:
        both = validate(smollm2_files["q40"], bad, hf=smollm2_gguf, reference=smollm2_ref, options=FAST)
        assert_reasons(both, {**from_ref, **with_hf})
