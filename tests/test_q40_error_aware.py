"""The error-aware q40 encoder (issue 29): same format, smaller error, read by every runtime.

Per block it is never worse than the reference's encoding under its own weighting; on SmolLM2 it
halves the KL the validator measures; its files pass dllama-validate (correctness against the
file's own weights, weights unfolded against the original) and run on the reference C++ runtime.
`--exact` keeps the reference converter's bytes (tests/test_convert.py, test_gguf.py, the CLI's).
"""
from __future__ import annotations

import numpy as np
import pytest

from dllama.converter import encoders
from dllama.converter.calibration import CALIBRATION_TEXT, CalibrationError, read_calibration_text
from dllama.formats import ModelFile, dequantize_q40
from dllama.validate.report import Status
from dllama.validate.validator import Options, validate

FAST = Options(corpus_limit=20)


def weighted_block_errors(w: np.ndarray, encoded: np.ndarray, importance: np.ndarray) -> np.ndarray:
    """Per 32-value block: sum importance * sqrt(mean square of the row + w^2) * (w - stored)^2, the
    weighting encode_q40_search minimises."""
    stored = dequantize_q40(encoded.reshape(-1)).reshape(w.shape).astype(np.float64)
    w64 = w.astype(np.float64)
    weight = importance[None, :] * np.sqrt((w64 ** 2).mean(axis=1, keepdims=True) + w64 ** 2)
    return (weight * (w64 - stored) ** 2).reshape(w.shape[0], -1, 32).sum(axis=2)


def encode(kernel, w: np.ndarray, *args) -> np.ndarray:
    out = np.empty((w.shape[0], w.shape[1] // 32 * 18), np.uint8)
    kernel(w.view(np.uint32), encoders.SRC_F32, np.arange(w.shape[0]), *args, out)
    return out


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.q_proj.weight", "model.layers.12.mlp.down_proj.weight",
                                  "model.layers.29.mlp.up_proj.weight"])
def test_no_block_of_a_real_matrix_is_worse_than_the_reference_encoding(smollm2_gguf, name):
    from dllama.gguf_checkpoint import GGUFCheckpoint

    w = np.ascontiguousarray(GGUFCheckpoint(smollm2_gguf).get(name))
    rng = np.random.default_rng(0)
    for importance in (np.ones(w.shape[1], np.float32), rng.lognormal(0, 2, w.shape[1]).astype(np.float32)):
        exact = weighted_block_errors(w, encode(encoders.encode_q40, w), importance)
        aware = weighted_block_errors(w, encode(encoders.encode_q40_search, w, np.ones(w.shape[1], np.float32),
                                                importance), importance)
        assert np.all(aware <= exact * (1 + 1e-5) + 1e-30)
        assert aware.sum() < 0.95 * exact.sum()  # and better overall (0.87 measured on layer 0 q)


def test_a_calibration_text_that_cannot_be_read_is_refused_with_the_fix(tmp_path):
    assert read_calibration_text(None) == CALIBRATION_TEXT
    (tmp_path / "empty.txt").write_text("  \n")
    for path in (tmp_path / "missing.txt", tmp_path / "empty.txt"):
        with pytest.raises(CalibrationError, match="calibration text"):
            read_calibration_text(path)


def test_an_error_aware_conformance_file_passes_the_validator_and_differs_from_the_reference(conformance_dir,
                                                                                             tmp_path):
    from dllama.converter.convert import convert

    result = convert(conformance_dir, "q40", tmp_path, name="m")
    assert result.plan.model_path.read_bytes() != (conformance_dir / "expected_q40.m").read_bytes()
    report = validate(result.plan.model_path, result.plan.tokenizer_path, hf=conformance_dir, options=FAST)
    statuses = {c.name: c.status for c in report.checks}
    assert report.ok and statuses["model.weights_vs_checkpoint"] == Status.PASS
    assert statuses["logits.correctness"] == Status.PASS


# --------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct: the bar of issue 29, and the mistakes the validator still names

def quality_of(report) -> dict:
    return next(c for c in report.checks if c.name == "logits.quality").details


def test_smollm2_error_aware_q40_halves_the_kl_and_passes_the_validator(smollm2_q40_error_aware, smollm2_files,
                                                                      smollm2_gguf):
    report = validate(smollm2_q40_error_aware, smollm2_files["tokenizer"], hf=smollm2_gguf, options=FAST)
    assert report.ok, [(c.name, c.reason) for c in report.checks if c.status == Status.FAIL]
    correctness = next(c for c in report.checks if c.name == "logits.correctness")
    assert correctness.details["arithmetic"] == "q40 (the file's own weights)"
    quality = quality_of(report)["summary"]
    # the bar of issue 29 (docs/VALIDATE.md): measured KL 0.319 (--exact: 0.667), top-1 0.663, 61 of
    # the 92 positions (--exact: 0.511); the HF folder's file is this one, byte for byte (test_gguf.py)
    assert quality["mean_kl"] <= 0.35 and quality["top1"] >= 0.65


def test_smollm2_exact_q40_is_told_about_the_error_aware_encoder(smollm2_files, smollm2_gguf):
    report = validate(smollm2_files["q40"], smollm2_files["tokenizer"], hf=smollm2_gguf, options=FAST)
    quality = next(c for c in report.checks if c.name == "logits.quality")
    assert quality.status == Status.WARN and "reconvert without --exact" in quality.reason


def test_a_wrong_norm_in_an_error_aware_file_is_named(smollm2_q40_error_aware, smollm2_files, smollm2_gguf, tmp_path):
    """The folded norms are checked through the matrices after them: a norm from another layer shows."""
    import shutil

    broken = tmp_path / "broken.m"
    shutil.copyfile(smollm2_q40_error_aware, broken)
    model = ModelFile(broken)
    start, size = (model.layout["layers.5.attn_norm"].offset, model.layout["layers.5.attn_norm"].spec.nbytes)
    other = model.raw("layers.6.attn_norm").tobytes()
    del model
    with open(broken, "r+b") as f:
        f.seek(start)
        f.write(other[:size])
    report = validate(broken, smollm2_files["tokenizer"], hf=smollm2_gguf, options=FAST)
    failing = {c.name: c.reason for c in report.checks if c.status == Status.FAIL}
    assert "layers.5.q" in failing.get("model.weights_vs_checkpoint", "")


NEAR_TIE = 0.5  # tests/test_distributed_smollm2.py measured q40's top-two gaps moving up to 1.0 between arithmetics


@pytest.mark.slow
def test_reference_runtime_greedy_tokens_equal_ours_on_the_error_aware_q40_up_to_a_near_tie(smollm2_q40_error_aware,
                                                                                          smollm2_files,
                                                                                          reference_dllama):
    """One-token prompts (the reference's token-by-token path, tests/test_gguf.py says why), q80
    partials on both sides as the reference rounds them. The two runtimes sum in other orders, so
    the texts may part where our top two logits are within NEAR_TIE, and only there (measured: "I" parts at token 5,
    '19th' against '19,', our gap 0.08; "A" agrees on all 16)."""
    from reference_runtime import run_inference

    from dllama.formats import read_tokenizer
    from dllama.runtime.engine import Engine
    from dllama.tokenizer import Tokenizer

    tokens = read_tokenizer(smollm2_files["tokenizer"]).tokens
    engine = Engine.load(smollm2_q40_error_aware, buffer_float_type="q80")
    compared = 0
    for prompt in ("I", "A"):
        theirs = run_inference(reference_dllama, smollm2_q40_error_aware, smollm2_files["tokenizer"], prompt,
                               steps=16, buffer_float_type="q80")
        engine.reset()
        ids = Tokenizer.load(str(smollm2_files["tokenizer"]), mode="reference").encode(prompt)
        logits = engine.forward(ids, 0)[-1]
        for piece in theirs:
            ours = int(np.argmax(logits))
            if piece != tokens[ours].decode("utf-8"):  # only where ours nearly ties
                top_two = np.sort(logits)[-2:]
                assert top_two[1] - top_two[0] < NEAR_TIE, (prompt, compared, piece)
                break
            compared += 1
            logits = engine.forward([ours], engine.pos)[-1]
    assert compared >= 12  # measured: 4 + 16


def test_convert_cli_refuses_an_unreadable_calibration_text_in_one_line(conformance_dir, tmp_path):
    from typer.testing import CliRunner

    from dllama.cli.dllama_convert import app

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["hf", str(conformance_dir), "-q", "q40", "-o", str(out),
                                      "--calibration", str(tmp_path / "missing.txt")])
    assert result.exit_code == 1 and "calibration text" in result.output
    assert not out.exists() or list(out.iterdir()) == []


def test_an_error_aware_moe_file_passes_the_validator(tmp_path):
    """qwen3_moe: its FFN norm also feeds the float32 router, so only attention and the head fold."""
    from conftest import CONFORMANCE

    from dllama.checkpoint import Checkpoint
    from dllama.converter.convert import convert
    from dllama.converter.synthetic import tiny_config, write_checkpoint

    folder = write_checkpoint(tmp_path / "moe", tiny_config("qwen3_moe", bos_token_id=382, eos_token_id=383),
                              dtype="f32", seed=3, tokenizer=CONFORMANCE / "tiny-qwen3")
    result = convert(folder, "q40", tmp_path / "out", name="moe")
    model = ModelFile(result.plan.model_path)
    original_ffn_norm = Checkpoint(folder).get("model.layers.0.post_attention_layernorm.weight")
    assert np.array_equal(model.tensor("layers.0.ffn_norm"), original_ffn_norm)
    report = validate(result.plan.model_path, result.plan.tokenizer_path, hf=folder, options=FAST)
    assert report.ok, [(c.name, c.reason) for c in report.checks if c.status == Status.FAIL]
