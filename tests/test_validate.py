"""dllama-validate: correct conversions pass; each classic conversion bug fails with its reason.

Every bad input is a correct fixture conversion (../shared/fixtures/conformance) mutated through
dllama.formats, so the only thing wrong with it is the bug named by the test.
"""
from __future__ import annotations

import io
import json
import re
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import CONFORMANCE, FIXTURES, require_fixtures
from validate_helpers import (
    fold_channels,
    permute_qk,
    set_header,
    swap_tensors,
    tensor_slice,
    unpermute_qk,
    write_checkpoint_with,
)

from dllama.checkpoint import Checkpoint
from dllama.cli.dllama_validate import main
from dllama.formats import FloatType, ModelFile, read_tokenizer, tensor_plan
from dllama.tokenizer.from_hf import convert_tokenizer
from dllama.validate import checks
from dllama.validate.reference import ReferenceLogits, compute_reference
from dllama.validate.report import InputError, Status
from dllama.validate.validator import Options
from dllama.validate.validator import validate as run_validate

QUANTS = ("f32", "q80", "q40")
FAST = Options(corpus_limit=60, max_tokens=16)
DOCUMENTED_CHECKS = set(re.findall(r"`((?:model|tokenizer|logits)\.[a-z_]+)`",
                                   (Path(__file__).parent.parent / "docs" / "VALIDATE.md").read_text()))


def validate(*args, **kwargs):
    """validator.validate, and every check it reports is one docs/VALIDATE.md describes, by that name."""
    report = run_validate(*args, **kwargs)
    assert {c.name for c in report.checks} <= DOCUMENTED_CHECKS, {c.name for c in report.checks} - DOCUMENTED_CHECKS
    return report


def fixture(name: str) -> Path:
    return require_fixtures(CONFORMANCE / name)


def failing(report) -> dict[str, str]:
    return {c.name: c.reason for c in report.checks if c.status == Status.FAIL}


def write_model_with(tmp_path: Path, source: Path, edit) -> Path:
    """Copy a `.m`, let `edit(bytearray, ModelFile)` change its bytes, return the new path."""
    mf = ModelFile(source)
    data = bytearray(source.read_bytes())
    edit(data, mf)
    out = tmp_path / f"mutated_{source.name}"
    out.write_bytes(bytes(data))
    return out


def write_tokenizer(tmp_path: Path, tf, name: str = "mutated.t") -> Path:
    out = tmp_path / name
    out.write_bytes(tf.to_bytes())
    return out


# --------------------------------------------------------------------------------------------
# The reference forward itself

def test_reference_forward_matches_transformers_logits(conformance_dir):
    expected = ReferenceLogits.load(conformance_dir / "reference_logits.npz")
    ours = compute_reference(Checkpoint(conformance_dir), expected.ids)
    for got, want in zip(ours.logits, expected.logits):
        # measured 8.1e-7 of the largest logit; 1e-5 is 12x that and still 100x under what a norm epsilon
        # off by 10x or a q/k row order off by one head does (1e-3 and more)
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_reference_npz_round_trips_prompts_and_logits(tmp_path, conformance_dir):
    ref = ReferenceLogits.load(conformance_dir / "reference_logits.npz")
    ref.prompts = [f"prompt {j}" for j in range(len(ref.ids))]
    ref.save(tmp_path / "ref.npz")
    back = ReferenceLogits.load(tmp_path / "ref.npz")
    assert back.prompts == ref.prompts
    assert all(np.array_equal(a, b) for a, b in zip(back.logits, ref.logits))
    assert all(np.array_equal(a, b) for a, b in zip(back.ids, ref.ids))


def test_reference_npz_round_trips_arithmetic_runs_and_the_original_config(tmp_path):
    src = fixture("tiny-qwen3")
    ids = ReferenceLogits.load(src / "reference_logits.npz").ids
    ref = compute_reference(Checkpoint(src), ids, arithmetics=[FloatType.Q40], traced=2)
    ref.bos_id, ref.eos_ids = 1, [2, 3]
    ref.save(tmp_path / "ref.npz")
    back = ReferenceLogits.load(tmp_path / "ref.npz")
    trace = back.traces["q40"]
    assert trace.lengths == [len(i) for i in ids[:2]] and trace.states.shape[0] == 2 * 2 + 1
    assert np.array_equal(trace.states, ref.traces["q40"].states)
    assert back.config == Checkpoint(src).config and (back.bos_id, back.eos_ids) == (1, [2, 3])
    # the q40 run differs from the exact one by quantization, and its last state gives its logits
    assert not np.allclose(trace.logits, np.concatenate(back.logits[:2]))


@pytest.mark.parametrize("float_type", [FloatType.Q40, FloatType.Q80])
def test_reference_codecs_round_like_the_format_module(float_type):
    from dllama.formats import decode_tensor, encode_tensor
    from dllama.validate.reference import ROUNDING

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((64, 256)) * rng.choice([1e-3, 0.05, 3.0], (64, 1))).astype(np.float32)
    x[0, :32] = 0  # an all-zero block
    x[1, :32] = np.linspace(-1, 1, 32)  # a tie of |min| and max
    assert np.array_equal(ROUNDING[float_type](x), decode_tensor(encode_tensor(x, float_type), float_type, x.shape))


# --------------------------------------------------------------------------------------------
# Must hold 1: correct conversions pass

@pytest.mark.parametrize("quant", QUANTS)
def test_correct_conversion_passes(conformance_dir, quant):
    report = validate(conformance_dir / f"expected_{quant}.m", conformance_dir / "expected.t", hf=conformance_dir,
                      options=FAST)
    assert report.ok, failing(report)
    ran = {c.name for c in report.checks if c.status != Status.SKIP}
    assert {"model.weights_vs_checkpoint", "logits.correctness", "logits.quality", "tokenizer.faithful",
            "tokenizer.vs_source"} <= ran


@pytest.mark.parametrize("quant", QUANTS)
def test_correct_conversion_passes_against_a_reference_file(conformance_dir, quant, tmp_path):
    ref = arithmetic_reference(conformance_dir,
                               tmp_path) if quant != "f32" else conformance_dir / "reference_logits.npz"
    report = validate(conformance_dir / f"expected_{quant}.m", conformance_dir / "expected.t", reference=ref,
                      options=FAST)
    assert report.ok, failing(report)
    assert report.get("logits.correctness").status == Status.PASS
    assert report.get("logits.quality").status == Status.PASS


def test_a_transformers_reference_file_without_arithmetic_runs_skips_correctness_for_q40(conformance_dir):
    report = validate(conformance_dir / "expected_q40.m", conformance_dir / "expected.t",
                      reference=conformance_dir / "reference_logits.npz", options=FAST)
    assert report.get("logits.correctness").status == Status.SKIP
    assert "--arithmetic q40" in report.get("logits.correctness").reason


# --------------------------------------------------------------------------------------------
# Must hold 2: each classic failure, with the right reason

_ARITHMETIC_REFS: dict[Path, ReferenceLogits] = {}


def arithmetic_reference(src: Path, tmp_path: Path) -> Path:
    """The fixture's prompts as REF.npz with q40 and q80 arithmetic runs (`dllama-validate reference`)."""
    if src not in _ARITHMETIC_REFS:
        ids = ReferenceLogits.load(src / "reference_logits.npz").ids
        _ARITHMETIC_REFS[src] = compute_reference(Checkpoint(src), ids, arithmetics=[FloatType.Q40, FloatType.Q80])
    path = tmp_path / "ref_arithmetic.npz"
    _ARITHMETIC_REFS[src].save(path)
    return path


def logits_alone_catch(src: Path, tmp_path: Path, edit) -> None:
    """Without --hf only the logits (and the config a REF.npz of ours carries) can tell: the f32
    file against the exact original, the q40 file block by block against the original run with
    q40 arithmetic (benchmarks/validate.py thresholds)."""
    for quant, ref in (("f32", src / "reference_logits.npz"), ("q40", arithmetic_reference(src, tmp_path))):
        bad = write_model_with(tmp_path, src / f"expected_{quant}.m", edit)
        report = validate(bad, src / "expected.t", reference=ref, options=FAST)
        assert "logits.correctness" in failing(report), quant
        assert set(failing(report)) <= {"logits.correctness", "logits.quality", "model.header_vs_config"}, quant


def test_qk_rows_not_permuted_is_caught(tmp_path):
    src = fixture("tiny-llama")
    bad = write_model_with(tmp_path, src / "expected_q40.m", unpermute_qk)
    with_hf = validate(bad, src / "expected.t", hf=src, options=FAST)
    assert "NOT permuted" in failing(with_hf)["model.weights_vs_checkpoint"]
    logits_alone_catch(src, tmp_path, unpermute_qk)


def test_wrong_rope_theta_is_caught(tmp_path):
    src = fixture("tiny-qwen3")  # rope_theta 1e6; the classic bug writes the 10000 default

    def set_theta(data: bytearray, mf: ModelFile) -> None:
        header = replace(mf.header, rope_theta=10000)
        data[:header.nbytes] = header.to_bytes()

    bad = write_model_with(tmp_path, src / "expected_q40.m", set_theta)
    reasons = failing(validate(bad, src / "expected.t", hf=src, options=FAST))
    assert "rope_theta is 10000 in the .m but 1000000" in reasons["model.header_vs_config"]
    assert "model.weights_vs_checkpoint" not in reasons
    logits_alone_catch(src, tmp_path, set_theta)


def test_tokenizer_of_another_model_is_caught(tmp_path):
    src = fixture("tiny-llama")
    other = write_tokenizer(tmp_path, convert_tokenizer(require_fixtures(FIXTURES / "tokenizers" / "llama2")))
    report = validate(src / "expected_q40.m", other, hf=src, options=FAST)
    reasons = failing(report)
    assert "belongs to another model" in reasons["tokenizer.vocab_size"]
    assert "converted from another tokenizer" in reasons["tokenizer.vs_source"]


def test_vocab_differing_by_one_token_is_caught(tmp_path):
    src = fixture("tiny-llama")
    tf = read_tokenizer(src / "expected.t")
    tf.tokens.append(b"<|extra|>")
    tf.scores.append(-float(len(tf.scores)))
    report = validate(src / "expected_q40.m", write_tokenizer(tmp_path, tf), options=FAST)
    assert "differ by one token" in failing(report)["tokenizer.vocab_size"]


def test_vocabulary_sizes_pass_equal_warn_padded_and_fail_otherwise_naming_the_difference():
    # Qwen3 pads its embedding (151936 rows) beyond its 151669 tokens: the converter and runtime accept
    # that pair, so the validator must not fail it; one token fewer is still a lost token
    tf = read_tokenizer(fixture("tiny-llama") / "expected.t")
    header = ModelFile(fixture("tiny-llama") / "expected_q40.m").header
    padded = checks.vocab_sizes_equal(replace(header, vocab_size=tf.vocab_size + 128), tf)
    assert (padded.name, padded.status, padded.measured, padded.threshold) == ("tokenizer.vocab_size", Status.WARN,
                                                                               ".m 512, .t 384", "equal")
    assert padded.reason == ("the model's embedding has 128 rows the tokenizer never produces: fine for a checkpoint "
                             "that pads its vocabulary (Qwen does); otherwise the tokenizer lost tokens")
    one_fewer = checks.vocab_sizes_equal(replace(header, vocab_size=tf.vocab_size + 1), tf)
    assert (one_fewer.name, one_fewer.status, one_fewer.threshold) == ("tokenizer.vocab_size", Status.FAIL, "equal")
    assert "the .t has one fewer;" in one_fewer.reason
    one_more = checks.vocab_sizes_equal(replace(header, vocab_size=tf.vocab_size - 1), tf)
    assert one_more.status == Status.FAIL and "the .t has one more;" in one_more.reason
    five = checks.vocab_sizes_equal(replace(header, vocab_size=tf.vocab_size - 5), tf)
    assert five.status == Status.FAIL and five.reason == ("the vocabularies differ by 5 tokens (padding or added "
                                                          "tokens?); convert both from the same model folder")
    other = checks.vocab_sizes_equal(replace(header, vocab_size=100), tf)   # 284 more than max(64, 100 // 50)
    assert other.status == Status.FAIL and other.reason == ("this tokenizer belongs to another model; convert the "
                                                            "tokenizer from the model's own folder")
    same = checks.vocab_sizes_equal(header, tf)
    assert (same.name, same.status, same.measured, same.threshold) == ("tokenizer.vocab_size", Status.PASS,
                                                                       ".m 384, .t 384", "equal")


def test_bos_eos_swapped_is_caught(tmp_path):
    src = fixture("tiny-llama")
    tf = read_tokenizer(src / "expected.t")
    tf.bos_id, tf.eos_ids = tf.eos_ids[0], [tf.bos_id]
    report = validate(src / "expected_q40.m", write_tokenizer(tmp_path, tf), hf=src, options=FAST)
    assert set(failing(report)) == {"tokenizer.special_ids"}
    assert "swapped" in failing(report)["tokenizer.special_ids"]


def test_truncated_model_file_is_caught(tmp_path):
    src = fixture("tiny-llama")
    bad = tmp_path / "truncated.m"
    bad.write_bytes((src / "expected_q40.m").read_bytes()[:-1000])
    report = validate(bad, src / "expected.t", hf=src, options=FAST)
    reasons = failing(report)
    assert "truncated" in reasons["model.file_size"]
    assert report.get("logits.correctness").status == Status.SKIP


@pytest.mark.parametrize("a, b, holds", [
    ("layers.1.w1", "layers.1.w3",
     "holds model.layers.1.mlp.up_proj.weight instead of model.layers.1.mlp.gate_proj.weight"),
    ("layers.0.wo", "layers.1.wo",
     "holds model.layers.1.self_attn.o_proj.weight instead of model.layers.0.self_attn.o_proj.weight"),
])
def test_swapped_layer_tensors_are_caught(tmp_path, a, b, holds):
    src = fixture("tiny-qwen3")
    bad = write_model_with(tmp_path, src / "expected_q40.m", swap_tensors(a, b))
    assert holds in failing(validate(bad, src / "expected.t", hf=src, options=FAST))["model.weights_vs_checkpoint"]
    logits_alone_catch(src, tmp_path, swap_tensors(a, b))


def test_bf16_read_as_f16_is_named_against_the_checkpoint(tmp_path):
    from validate_helpers import read_bf16_as_f16
    from validate_helpers import write_model_with as write_with

    src = fixture("tiny-llama")  # a bf16 checkpoint
    bad = write_with(tmp_path / "bf16_as_f16.m", src / "expected_f32.m", read_bf16_as_f16)
    report = validate(bad, src / "expected.t", hf=src, options=FAST)
    assert failing(report)["model.tensors"] == (
        "the embedding looks like bf16 bytes read as f16 (100% of its values have 0.5 <= |x| < 2; a trained "
        "embedding's are small): the converter read a bf16 checkpoint as f16: the conversion wrote garbage; reconvert")
    problems = report.get("model.weights_vs_checkpoint").details["problems"]
    assert len(problems) == 16 and report.get("model.weights_vs_checkpoint").reason.endswith(
        "; and 12 more; reconvert with dllama-convert")   # the first four named, the rest counted
    for name in ("embedding", "layers.0.wo", "layers.1.w2"):   # tensors after no norm, compared as they are
        assert any(p.startswith(f"{name} holds the original's bf16 bytes read as f16 (reconvert reading bf16) "
                                "(relative error ") for p in problems), name


# --------------------------------------------------------------------------------------------
# sentencepiece with byte fallback

WORDS = ("model tensor layer quantize block scale token vocabulary merge piece byte head rope cache node "
         "cluster board convert validate prompt logits attention norm weight expert router").split()


def train_byte_fallback_sentencepiece(folder: Path) -> Path:
    import sentencepiece as spm

    rng = np.random.default_rng(0)
    sentences = [" ".join(rng.choice(WORDS, size=12)) + "." for _ in range(300)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, vocab_size=384,
                                   byte_fallback=True, model_type="bpe", minloglevel=2)
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    return folder


def test_sentencepiece_converted_without_byte_fallback_is_caught(tmp_path):
    src = fixture("tiny-llama")  # only its .m (vocab 384) is used; no --hf: the .t embeds its source
    tf = convert_tokenizer(train_byte_fallback_sentencepiece(tmp_path / "sp"))
    good = validate(src / "expected_f32.m", write_tokenizer(tmp_path, tf, "good.t"), options=FAST)
    assert good.ok, failing(good)
    assert "bos_id is 1" in good.get("tokenizer.reference_runtime").reason  # the plain-language warning
    # what a converter ignoring byte fallback writes: the piece's text instead of its byte
    tf.tokens = [f"<0x{t[0]:02X}>".encode() if len(t) == 1 and i >= 3 and i < 259 else t for i,
                 t in enumerate(tf.tokens)]
    bad = validate(src / "expected_f32.m", write_tokenizer(tmp_path, tf, "bad.t"), options=FAST)
    reasons = failing(bad)
    assert "converted without byte fallback" in reasons["tokenizer.byte_fallback"]


# --------------------------------------------------------------------------------------------
# Must hold 3: the CLI, its JSON and exit codes

def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_cli_json_and_exit_code_for_a_passing_pair(capsys):
    src = fixture("tiny-llama")
    code, out, _ = run_cli(capsys, str(src / "expected_q40.m"), str(src / "expected.t"), "--reference",
                           str(src / "reference_logits.npz"), "--json", "--corpus-limit", "40", "-q")
    doc = json.loads(out)
    assert code == 0 and doc["verdict"] == "pass" and doc["schema"] == "dllama-validate/2"
    assert {"name", "status", "measured", "threshold", "reason", "details"} <= set(doc["checks"][0])
    assert doc["counts"]["fail"] == 0


def test_cli_exit_code_1_and_table_for_a_failing_pair(capsys, tmp_path):
    src = fixture("tiny-llama")
    bad = tmp_path / "truncated.m"
    bad.write_bytes((src / "expected_q40.m").read_bytes()[:-18])
    code, out, _ = run_cli(capsys, str(bad), str(src / "expected.t"), "-q", "--corpus-limit", "20")
    assert code == 1
    assert "model.file_size" in out and "FAIL" in out and "verdict: FAIL" in out


@pytest.mark.parametrize("args, message", [
    (("missing.m", "{t}"), "does not exist"),
    (("{t}", "{m}"), "is not a distributed-llama .m model"),
    (("{m}", "{t}", "--reference", "{t}"), "not a readable .npz"),
    (("{m}", "{t}", "--hf", "./no/such/folder"), "--hf"),
    ((), "error: missing argument 'MODEL'"),
])
def test_cli_exit_code_2_for_unreadable_input(capsys, args, message):
    src = fixture("tiny-llama")
    paths = {"m": str(src / "expected_q40.m"), "t": str(src / "expected.t")}
    code, _, err = run_cli(capsys, *[a.format(**paths) for a in args])
    assert code == 2
    assert message in err


def test_cli_reference_subcommand_writes_a_usable_ref_npz(capsys, tmp_path):
    src = fixture("tiny-qwen3")
    code, out, _ = run_cli(capsys, "reference", "--hf", str(src), "--out", str(tmp_path / "ref.npz"),
                           "--prompt", "Hello there", "--prompt", "1 2 3", "-q")
    assert code in (0, None)
    ref = ReferenceLogits.load(tmp_path / "ref.npz")
    assert ref.prompts == ["Hello there", "1 2 3"] and ref.ids[0][0] == 382  # bos first
    assert set(ref.traces) == {"q40", "q80"} and ref.config["model_type"] == "qwen3"
    for quant in ("f32", "q40"):
        report = validate(src / f"expected_{quant}.m", src / "expected.t", reference=tmp_path / "ref.npz", options=FAST)
        assert report.ok, failing(report)
        assert report.get("logits.correctness").status == Status.PASS


# --------------------------------------------------------------------------------------------
# Paths the fixtures lack (moe, llama3.1 rope scaling, tied q80): two independent forwards agree

@pytest.mark.parametrize("model_type, overrides, quant", [
    ("qwen3_moe", {}, "f32"),
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}, "f32"),
    ("llama", {"tie_word_embeddings": True}, "q80"),
])
def test_synthetic_conversion_passes(tmp_path, model_type, overrides, quant):
    from dllama.converter.convert import convert
    from dllama.converter.synthetic import tiny_config, write_checkpoint

    source = write_checkpoint(tmp_path / "hf", tiny_config(model_type, **overrides), seed=1,
                              tokenizer=fixture("tiny-llama") / "tokenizer.json")
    (source / "tokenizer_config.json").write_bytes((fixture("tiny-llama") / "tokenizer_config.json").read_bytes())
    plan = convert(source, quant, tmp_path / "out", name="synthetic").plan
    report = validate(plan.model_path, plan.tokenizer_path, hf=source, options=FAST)
    assert report.ok, failing(report)
    assert report.get("logits.correctness").status == Status.PASS


# --------------------------------------------------------------------------------------------
# The table fits 100 columns with every number whole; a structure-only pass says so

def test_table_fits_100_columns_without_cutting_a_number():
    src = fixture("tiny-llama")
    report = validate(src / "expected_q40.m", src / "expected.t", hf=src, options=FAST)
    table = report.table()
    assert max(len(line) for line in table.splitlines()) <= 100
    assert "…" not in table
    for check in report.checks:  # every number measured appears whole in the table
        for number in re.findall(r"\d[\d.e+-]*", check.measured):
            assert number in table, (check.name, number)
    assert "structure only" not in table


def test_a_pass_without_the_original_names_what_did_not_run_and_proves_the_structure_only(capsys):
    src = fixture("tiny-llama")
    code, out, _ = run_cli(capsys, str(src / "expected_q40.m"), "-q", "--corpus-limit", "20")  # its .t beside it
    assert code == 0 and "verdict: PASS" in out
    summary = " ".join(out[out.index("verdict:"):].split())
    assert "not run: model.header_vs_config, model.weights_vs_checkpoint" in summary and "logits.quality" in summary
    assert "this pass proves the structure only: without --hf SOURCE or --reference REF.npz" in summary
    code, out, _ = run_cli(capsys, str(src / "expected_q40.m"), "-q", "--corpus-limit", "20", "--json")
    doc = json.loads(out)
    assert doc["structure_only"] is True and "logits.correctness" in doc["not_run"]


# --------------------------------------------------------------------------------------------
# The checks' results, called one by one: names (docs/VALIDATE.md), verdicts and the text a user reads

def tiny_header():
    from dllama.formats import read_model_header

    return read_model_header(fixture("tiny-llama") / "expected_q40.m")


def test_a_header_with_impossible_values_fails_naming_each():
    from dllama.formats import HiddenAct

    h = tiny_header()
    r = checks.header_sanity(replace(h, dim=0, max_seq_len=-1, head_dim_value=15, version=1))
    assert (r.name, r.status, r.measured, r.threshold) == ("model.header", Status.FAIL, "llama q40 2x0",
                                                           "supported values")
    assert r.reason == "version 1 (only 0 exists); dim is 0; max_seq_len is -1; head_dim 15 is odd, rope needs pairs"
    # one head of odd size is still odd; no heads at all is named once (head_dim needs heads)
    assert checks.header_problems(replace(h, n_heads=1, n_kv_heads=1, head_dim_value=15)) == \
        ["head_dim 15 is odd, rope needs pairs"]
    assert checks.header_problems(replace(h, n_heads=0, head_dim_value=0)) == ["n_heads is 0"]
    assert checks.header_problems(replace(h, rope_theta=0.0)) == ["rope_theta 0.0"]
    assert checks.header_problems(replace(h, n_kv_heads=3)) == ["n_heads 4 is not a multiple of n_kv_heads 3"]
    from dllama.formats import ArchType

    assert checks.header_problems(replace(h, arch=ArchType.QWEN3_MOE, n_experts=0, n_active_experts=0)) == [
        "qwen3_moe with 0 experts (a transformers-5 config read by the reference converter?)"]
    from dllama.formats import RopeType

    assert checks.header_problems(replace(h, rope_type=RopeType.LLAMA3_1, rope_scaling_factor=0.0)) == [
        "llama3.1 rope without scaling factor / original max length"]
    gelu = checks.header_sanity(replace(h, hidden_act=HiddenAct.GELU, weights_float_type=FloatType.F16))
    assert (gelu.name, gelu.status, gelu.measured, gelu.threshold) == ("model.header", Status.WARN, "llama f16 2x64",
                                                                       "supported values")
    assert gelu.reason == ("neither dllama-run nor the reference C++ runtime runs f16 weights; reconvert to q40, q80 "
                           "or f32; hidden_act gelu: both runtimes compute silu (FORMAT.md §2), so outputs will differ "
                           "from the original")
    assert checks.header_notes(h) == []   # q40, silu: nothing to say


def test_a_header_against_its_config_names_every_difference_and_a_config_that_cannot_convert():
    src = fixture("tiny-llama")
    config = json.loads((src / "config.json").read_text())
    h = tiny_header()
    same = checks.header_vs_config(h, config)
    assert (same.name, same.status, same.measured, same.threshold) == ("model.header_vs_config", Status.PASS,
                                                                       "all fields equal", "equal to config.json")
    from dllama.formats import ArchType

    differ = checks.header_vs_config(replace(h, n_layers=3, arch=ArchType.QWEN3), config)
    assert (differ.name, differ.status, differ.measured) == ("model.header_vs_config", Status.FAIL, "2 field(s) differ")
    assert differ.details["differences"] == {"arch": {"model": "qwen3", "config": "llama"},
                                             "n_layers": {"model": "3", "config": "2"}}
    theta = checks.header_vs_config(replace(h, rope_theta=500000.0), config)
    assert theta.reason == ("rope_theta is 500000.0 in the .m but 10000 per config.json (a transformers-5 config "
                            "keeps it in rope_parameters, which the reference converter drops); reconvert with "
                            "dllama-convert")
    broken = checks.header_vs_config(h, {"architectures": ["NoSuchForCausalLM"]})
    assert (broken.name, broken.status, broken.measured, broken.threshold) == ("model.header_vs_config",
                                                                               Status.FAIL, "-", "-")
    assert broken.reason.startswith("the source config cannot be converted: ")


def test_files_that_are_not_a_model_or_a_tokenizer_fail_their_first_check(tmp_path):
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x00" * 64)
    header, mf, results = checks.open_model(garbage)
    assert header is None and mf is None
    assert [(r.name, r.status, r.measured, r.threshold) for r in results] == [
        ("model.header", Status.FAIL, "unreadable", "valid header"), ("model.file_size", Status.SKIP, "-", "-")]
    assert results[0].reason.endswith("; reconvert with dllama-convert")
    assert results[1].reason == "the header could not be read"
    src = fixture("tiny-llama") / "expected_q40.m"
    header, mf, results = checks.open_model(src)
    assert mf is not None and [(r.name, r.status, r.measured, r.threshold, r.details) for r in results] == [
        ("model.header", Status.PASS, "llama q40 2x64", "supported values", {}),
        ("model.file_size", Status.PASS, f"{src.stat().st_size} bytes", f"exactly {src.stat().st_size}",
         {"size": src.stat().st_size})]
    short = tmp_path / "short.m"
    short.write_bytes(src.read_bytes()[:-18])
    assert [(r.name, r.status, r.reason) for r in checks.open_model(short)[2][1:]] == [
        ("model.file_size", Status.FAIL, "short.m is truncated (an interrupted copy or conversion?): copy or convert "
                                         "it again")]
    longer = tmp_path / "longer.m"
    longer.write_bytes(src.read_bytes() + bytes(18))
    header, mf, results = checks.open_model(longer)
    assert header is not None and mf is None
    assert [(r.name, r.status, r.measured, r.threshold, r.reason) for r in results[1:]] == [
        ("model.file_size", Status.FAIL, f"{src.stat().st_size + 18} bytes", f"exactly {src.stat().st_size}",
         "longer.m is longer than its header describes: trailing bytes or a header from another model")]
    impossible = write_model_with(tmp_path, src, set_header(dim=21, hidden_dim=20))   # w1: 20 x 21 values
    header, mf, results = checks.open_model(impossible)
    assert header.dim == 21 and mf is None
    assert [(r.name, r.status, r.measured, r.threshold, r.reason) for r in results[1:]] == [
        ("model.file_size", Status.FAIL, "-", "-",
         "the header describes impossible tensors: 420 values do not fill whole q40 blocks of 32")]
    with pytest.raises(InputError, match=r"^.*expected_q40\.m is not a distributed-llama \.t tokenizer \(wrong magic"):
        checks.require_tokenizer_magic(src)
    for require, what in ((checks.require_model_magic, "model"), (checks.require_tokenizer_magic, "tokenizer")):
        with pytest.raises(InputError, match=rf"^{what} file .*nowhere\.m does not exist$"):
            require(tmp_path / "nowhere.m")
    tf, result = checks.open_tokenizer(fixture("tiny-llama") / "expected.t")
    assert (result.name, result.status, result.measured, result.threshold, result.details) == (
        "tokenizer.file", Status.PASS, "384 tokens, 0 embedded", "well-formed .t", {"vocab_size": 384, "embedded": []})
    converted = write_tokenizer(tmp_path, convert_tokenizer(fixture("tiny-llama")), "converted.t")
    assert checks.open_tokenizer(converted)[1].details["embedded"] == ["tokenizer_json", "tokenizer_config"]
    tf, result = checks.open_tokenizer(garbage)
    assert tf is None and (result.name, result.status, result.measured, result.threshold) == (
        "tokenizer.file", Status.FAIL, "malformed", "well-formed .t")
    assert result.reason.endswith("; reconvert the tokenizer with dllama-convert")


def test_a_chat_template_is_rendered_with_a_sample_conversation():
    from dllama.tokenizer.chat import render_chat

    def render_with(template):
        return lambda messages: render_chat(template, messages, False, bos_token="<s>", eos_token="</s>")

    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    ok = checks.chat_template(render_with(template), template)
    assert (ok.name, ok.status, ok.measured) == ("tokenizer.chat_template", Status.PASS, "34 chars")
    assert ok.details["sample"] == "<user>Hello<assistant>Hi!<user>Bye"
    broken = "{{ raise_exception('no system role') }}"
    bad = checks.chat_template(render_with(broken), broken)
    assert (bad.name, bad.status, bad.measured, bad.threshold) == ("tokenizer.chat_template", Status.FAIL, "error",
                                                                   "renders")
    assert bad.reason == ("the chat template does not render: ChatTemplateError: the chat template refused the "
                          "messages: no system role")
    assert (ok.threshold, ok.reason) == ("renders", "")
    silent = "{% for m in messages %}<{{ m['role'] }}>{% endfor %}"   # the roles only, no content
    empty = checks.chat_template(render_with(silent), silent)
    assert (empty.name, empty.status, empty.measured, empty.threshold, empty.reason) == (
        "tokenizer.chat_template", Status.FAIL, "23 chars", "renders the messages",
        "the chat template rendered without the messages' text")
    long = "{% for m in messages %}" + "x" * 100 + "{{ m['content'] }}{% endfor %}"   # 311 chars rendered
    assert checks.chat_template(render_with(long), long).details["sample"] == ("x" * 100 + "Hello" + "x" * 95)
    none = checks.chat_template(render_with(""), None)
    assert (none.name, none.status, none.measured, none.threshold) == ("tokenizer.chat_template", Status.WARN, "none",
                                                                       "renders")
    assert none.reason == ("the .t has no chat template: chat mode will need one (base models have none; fine for "
                           "completion)")


@pytest.mark.parametrize("quant, step", [("q40", 8), ("q80", 127)])
def test_tensor_stats_of_quantized_tensors_are_their_block_scales(tmp_path, quant, step):
    from dllama.formats import decode_tensor

    src = fixture("tiny-llama") / f"expected_{quant}.m"
    name = "layers.0.w1"

    def zero_first_block(data: bytearray, mf: ModelFile) -> None:
        at = mf.layout[name].offset
        data[at:at + mf.layout[name].spec.nbytes // mf.layout[name].spec.shape[0]] = bytes(
            mf.layout[name].spec.nbytes // mf.layout[name].spec.shape[0])   # its first row's blocks: d = 0

    mf = ModelFile(write_model_with(tmp_path, src, zero_first_block))
    spec = mf.layout[name].spec
    raw = mf.raw(name).tobytes()
    block = 2 + (16 if quant == "q40" else 32)
    scales = np.frombuffer(b"".join(raw[i:i + 2] for i in range(0, len(raw), block)), "<f2").astype(np.float32)
    stats = checks.tensor_stats(mf, name)
    assert stats["quantized"] and stats["non_finite"] == 0 and not stats["all_zero"]
    assert stats["zero_blocks"] == np.mean(scales == 0) == (spec.shape[1] // 32) / len(scales)
    assert stats["mean_abs_scale"] == pytest.approx(float(np.abs(scales).mean()), rel=1e-6)
    # the largest |value| of a block is step * |d| (FORMAT.md §1.2): the decoded tensor's own maximum
    assert stats["abs_max"] == float(np.abs(decode_tensor(mf.raw(name), spec.float_type, spec.shape)).max())
    assert stats["abs_max"] == float(np.abs(scales).max()) * step


def test_sampled_rows_are_the_first_64_and_a_spread_reaching_the_last():
    layout = ModelFile(fixture("tiny-llama") / "expected_q40.m").layout
    w1, norm = layout["layers.0.w1"].spec, layout["layers.0.attn_norm"].spec
    assert w1.shape[0] > 2 * checks.SAMPLE_ROWS   # 192 rows: sampled
    rows = checks.sample_rows(w1)
    assert list(rows[:64]) == list(range(64)) and rows[-1] == w1.shape[0] - 1
    assert len(rows) <= 2 * checks.SAMPLE_ROWS and list(rows) == sorted(set(rows))
    assert list(checks.sample_rows(norm)) == [0]   # a vector is one row


def test_special_ids_that_differ_name_each_token_by_its_text_including_id_0():
    tf = read_tokenizer(fixture("tiny-llama") / "expected.t")   # bos 382 "<s>", eos [383], id 0 "!"
    expected_bos, expected_eos = tf.bos_id, list(tf.eos_ids)
    tf.bos_id = 0
    r = checks.special_ids(tf, expected_bos, expected_eos)
    assert (r.name, r.status, r.measured, r.threshold) == ("tokenizer.special_ids", Status.FAIL, "bos 0, eos [383]",
                                                           "bos 382, eos [383]")
    assert r.reason == (f"bos/eos ids differ from the source's (bos 0 '!', expected 382 "
                        f"{tf.tokens[382].decode()!r}); reconvert the tokenizer")
    unchecked = checks.special_ids(tf, None, None)
    assert (unchecked.name, unchecked.status, unchecked.measured, unchecked.threshold) == (
        "tokenizer.special_ids", Status.PASS, "bos 0, eos [383]", "in range (no source to compare)")
    tf.eos_ids = []
    no_eos = checks.special_ids(tf, expected_bos, expected_eos)
    assert (no_eos.name, no_eos.status, no_eos.measured, no_eos.threshold) == ("tokenizer.special_ids", Status.FAIL,
                                                                               "bos 0, eos []", "eos present")
    assert no_eos.reason == "the .t lists no eos token, so generation never stops; reconvert"


def test_byte_fallback_needs_every_byte_only_when_the_source_falls_back_to_bytes():
    tf = read_tokenizer(fixture("tiny-llama") / "expected.t")   # byte-level BPE: all 256 bytes are tokens
    every = ("tokenizer.byte_fallback", Status.PASS, "0 literal <0xNN> pieces", "0")
    for source_has_byte_fallback in (None, True, False):
        r = checks.byte_fallback(tf, source_has_byte_fallback)
        assert (r.name, r.status, r.measured, r.threshold) == every
    literal = read_tokenizer(fixture("tiny-llama") / "expected.t")
    literal.tokens[33] = b"<0x21>"
    as_text = checks.byte_fallback(literal, None)
    assert (as_text.name, as_text.status, as_text.measured, as_text.threshold) == (
        "tokenizer.byte_fallback", Status.FAIL, "1 literal <0xNN> pieces", "0")
    assert as_text.reason == ("byte-fallback pieces are stored as text (id 33 is b'<0x21>', not one byte): the "
                              "tokenizer was converted without byte fallback, so characters outside the vocabulary "
                              "would come out as '<0x..>' text; reconvert with dllama-convert")
    tf.tokens[0], tf.tokens[1] = b"!!", b'""'   # the bytes "!" and '"' no longer have a token of their own
    lost = checks.byte_fallback(tf, True)
    assert (lost.name, lost.status, lost.measured, lost.threshold) == ("tokenizer.byte_fallback", Status.FAIL,
                                                                      "2 of 256 bytes missing", "all 256 bytes")
    assert lost.reason == ("the source tokenizer uses byte fallback but 2 byte values have no single-byte token; "
                           "reconvert")
    for source_has_byte_fallback in (None, False):   # no byte fallback to serve: a byte-level BPE needs none
        r = checks.byte_fallback(tf, source_has_byte_fallback)
        assert (r.name, r.status, r.measured, r.threshold) == every


def test_a_tokenizer_against_its_source_lists_the_first_differing_tokens():
    source = read_tokenizer(fixture("tiny-llama") / "expected.t")
    same = checks.tokenizer_vs_source(source, source)
    assert (same.name, same.status, same.measured, same.threshold) == ("tokenizer.vs_source", Status.PASS,
                                                                       "384 tokens identical", "identical tokens")
    tf = read_tokenizer(fixture("tiny-llama") / "expected.t")
    for i in (5, 7, 9, 11):
        tf.tokens[i] = b"<%d>" % i
    differ = checks.tokenizer_vs_source(tf, source)
    assert (differ.name, differ.status, differ.measured, differ.threshold) == ("tokenizer.vs_source", Status.FAIL,
                                                                               "4 tokens differ", "identical tokens")
    assert differ.reason.startswith("id 5: b'<5>' vs b'&', id 7: b'<7>' vs b'(', id 9: b'<9>' vs b'*': ")
    assert differ.details["differing_ids"] == [5, 7, 9, 11]
    tf.tokens.pop()
    shorter = checks.tokenizer_vs_source(tf, source)
    assert (shorter.name, shorter.status, shorter.measured, shorter.threshold) == (
        "tokenizer.vs_source", Status.FAIL, "383 vs 384 tokens", "identical tokens")


def test_more_than_three_broken_tensors_are_named_three_and_counted(tmp_path):
    src = fixture("tiny-llama") / "expected_f32.m"

    def zero(names):
        def edit(data: bytearray, mf: ModelFile) -> None:
            for name in names:
                data[tensor_slice(mf, name)] = bytes(mf.layout[name].spec.nbytes)
        return edit

    healthy = checks.tensor_health(ModelFile(src))
    assert (healthy.name, healthy.status, healthy.measured, healthy.threshold) == (
        "model.tensors", Status.PASS, "21/21 tensors healthy", "all finite, none all-zero")
    three = checks.tensor_health(ModelFile(write_model_with(tmp_path, src, zero(["layers.0.q", "layers.0.k",
                                                                                "layers.0.v"]))))
    assert (three.name, three.status, three.measured, three.threshold) == ("model.tensors", Status.FAIL,
                                                                           "18/21 tensors healthy",
                                                                           "all finite, none all-zero")
    assert three.reason == ("layers.0.q is all zeros; layers.0.k is all zeros; layers.0.v is all zeros: the conversion "
                            "wrote garbage; reconvert")
    four = checks.tensor_health(ModelFile(write_model_with(tmp_path, src, zero(["layers.0.q", "layers.0.k",
                                                                               "layers.0.v", "layers.1.w2"]))))
    assert (four.status, four.measured) == (Status.FAIL, "17/21 tensors healthy")
    assert four.reason == ("layers.0.q is all zeros; layers.0.k is all zeros; layers.0.v is all zeros ...: the "
                           "conversion wrote garbage; reconvert")


@pytest.mark.parametrize("quant", ["f32", "q40"])
def test_tensor_stats_of_a_tensor_without_one_finite_value_are_zero_but_the_count(tmp_path, quant):
    name = "layers.1.w2"

    def nan_everywhere(data: bytearray, mf: ModelFile) -> None:
        where = tensor_slice(mf, name)
        if quant == "f32":
            data[where] = np.full(mf.layout[name].spec.nbytes // 4, np.nan, "<f4").tobytes()
        else:   # every block's f16 scale d NaN, its nibbles kept (FORMAT.md §1.2: 2 + 16 bytes a block)
            blocks = np.frombuffer(bytes(data[where]), np.uint8).reshape(-1, 18).copy()
            blocks[:, :2] = np.frombuffer(np.float16(np.nan).tobytes(), np.uint8)
            data[where] = blocks.tobytes()

    mf = ModelFile(write_model_with(tmp_path, fixture("tiny-llama") / f"expected_{quant}.m", nan_everywhere))
    spec = mf.layout[name].spec
    count = spec.shape[0] * spec.shape[1] // (32 if quant == "q40" else 1)
    stats = checks.tensor_stats(mf, name)
    assert stats["non_finite"] == count and stats["abs_max"] == 0.0
    if quant == "q40":
        assert (stats["mean_abs_scale"], stats["zero_blocks"]) == (0.0, 0.0)
    else:
        assert (stats["mean"], stats["std"]) == (0.0, 0.0)
    health = checks.tensor_health(mf)
    what = "scales" if quant == "q40" else "values"
    assert health.status == Status.FAIL and health.reason.startswith(f"{name} has {count} non-finite {what}: ")


# --------------------------------------------------------------------------------------------
# weights_vs_checkpoint: folded norms, q/k rows of an arch without the permute, a checkpoint short of a tensor

def fold_first_layer_and_head(tmp_path: Path, scales: np.ndarray) -> ModelFile:
    """tiny-llama's f32 file with layer 0's attention input and the head's folded by `scales`, as the
    error-aware q40 encoder folds them (calibration.Fold); its FFN inputs and layer 1 left as they are."""
    from validate_helpers import write_model_with as write_with

    src = fixture("tiny-llama") / "expected_f32.m"
    once = write_with(tmp_path / "fold1.m", src, fold_channels("layers.0.attn_norm", ("layers.0.q", "layers.0.k",
                                                                                      "layers.0.v"), scales))
    return ModelFile(write_with(tmp_path / "folded.m", once, fold_channels("norm", ("lm_head",), scales)))


def test_norms_folded_into_the_matrices_after_them_are_checked_through_their_channel_scales(tmp_path):
    scales = np.linspace(0.5, 2.0, 64, dtype=np.float32)   # one per channel of tiny-llama's dim
    folded = fold_first_layer_and_head(tmp_path, scales)
    ckpt, plan = Checkpoint(fixture("tiny-llama")), tensor_plan(folded.header)
    found = checks.channel_scales(folded, ckpt, plan)
    assert set(found) == {"layers.0.attn_norm", "norm"}
    for recovered in found.values():
        assert np.allclose(recovered, scales, rtol=1e-6, atol=0)
    assert checks.channel_scales(ModelFile(fixture("tiny-llama") / "expected_f32.m"), ckpt, plan) == {}

    calls = []
    r = checks.weights_vs_checkpoint(folded, ckpt, progress=lambda done, total: calls.append((done, total)))
    assert (r.name, r.status, r.threshold) == ("model.weights_vs_checkpoint", Status.PASS, "<= 1e-06 (f32)"), r.reason
    # the folded norms are not compared themselves; every other tensor is, within f32's rounding
    assert set(r.details["relative_errors"]) == {s.name for s in plan} - set(found)
    assert max(r.details["relative_errors"].values()) <= 1e-6
    assert calls == [(i + 1, len(plan)) for i, s in enumerate(plan) if s.name not in found]


def test_a_folded_norm_whose_original_channel_is_zero_keeps_scale_1_there(tmp_path):
    def zero_channel_3(tensors):
        tensors["model.layers.0.input_layernorm.weight"][3] = 0

    ckpt = Checkpoint(write_checkpoint_with(tmp_path / "hf", fixture("tiny-llama"), zero_channel_3))
    scales = np.linspace(0.5, 2.0, 64, dtype=np.float32)
    scales[3] = 1   # the stored weight is 0 too (below): 0 / s says nothing of s
    zero_3 = np.ones(64, np.float32)
    zero_3[3] = np.inf
    once = fold_first_layer_and_head(tmp_path, scales)
    folded = ModelFile(write_model_with(tmp_path, once.path, fold_channels("layers.0.attn_norm", (), zero_3)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # 0 / 0 is no fold's business: no numpy warning reaches the user
        found = checks.channel_scales(folded, ckpt, tensor_plan(folded.header))
    assert set(found) == {"layers.0.attn_norm", "norm"} and found["layers.0.attn_norm"][3] == 1


def test_a_folded_norm_with_a_channel_zeroed_in_the_file_is_read_without_a_warning(tmp_path):
    scales = np.linspace(0.5, 2.0, 64, dtype=np.float32)
    folded = fold_first_layer_and_head(tmp_path, scales)
    zeroed = write_model_with(tmp_path, folded.path, fold_channels("layers.0.attn_norm", (), np.float32(np.inf)))
    mf = ModelFile(zeroed)   # the norm divided by inf: every channel 0 in the file, none in the original
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # x / 0 is computed, then masked: no numpy warning reaches the user
        found = checks.channel_scales(mf, Checkpoint(fixture("tiny-llama")), tensor_plan(mf.header))
    assert "layers.0.attn_norm" not in found and "norm" in found


def test_a_folded_norm_with_one_channel_zeroed_in_the_file_is_no_fold_and_is_named(tmp_path):
    """A fold keeps zeros as zeros: with one channel zeroed in the file, the norm is compared as it is (a
    scale of 1 there would hide it in a q40 file's tolerance, the matrices' column being ~|s - 1| / sqrt(dim)
    off)."""
    scales = np.linspace(0.5, 2.0, 64, dtype=np.float32)
    folded = fold_first_layer_and_head(tmp_path, scales)
    zero_5 = np.ones(64, np.float32)
    zero_5[5] = np.inf   # the norm divided by inf at channel 5 only
    mf = ModelFile(write_model_with(tmp_path, folded.path, fold_channels("layers.0.attn_norm", (), zero_5)))
    ckpt = Checkpoint(fixture("tiny-llama"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert set(checks.channel_scales(mf, ckpt, tensor_plan(mf.header))) == {"norm"}
    r = checks.weights_vs_checkpoint(mf, ckpt)
    assert r.status == Status.FAIL
    # the norm and the matrices after it, compared as they are: all four named
    assert [p.split(" (relative")[0] for p in r.details["problems"]] == [
        "layers.0.q differs from model.layers.0.self_attn.q_proj.weight",
        "layers.0.k differs from model.layers.0.self_attn.k_proj.weight",
        "layers.0.v differs from model.layers.0.self_attn.v_proj.weight",
        "layers.0.attn_norm differs from model.layers.0.input_layernorm.weight"]


def test_a_norm_of_the_wrong_sign_is_no_fold_and_is_named(tmp_path):
    from validate_helpers import write_model_with as write_with

    flipped = write_with(tmp_path / "flipped.m", fixture("tiny-llama") / "expected_f32.m",
                         fold_channels("layers.0.ffn_norm", (), np.float32(-1)))
    mf, ckpt = ModelFile(flipped), Checkpoint(fixture("tiny-llama"))
    assert checks.channel_scales(mf, ckpt, tensor_plan(mf.header)) == {}
    r = checks.weights_vs_checkpoint(mf, ckpt)
    assert r.status == Status.FAIL and r.details["problems"] == [
        "layers.0.ffn_norm differs from model.layers.0.post_attention_layernorm.weight (relative error 2)"]


def test_qk_rows_permuted_for_an_arch_without_the_permute_are_named(tmp_path):
    src = fixture("tiny-qwen3")   # 4 query heads, 2 kv heads
    bad = ModelFile(write_model_with(tmp_path, src / "expected_f32.m", permute_qk))
    r = checks.weights_vs_checkpoint(bad, Checkpoint(src))
    assert r.status == Status.FAIL
    assert [p.split(" (relative")[0] for p in r.details["problems"]] == [
        f"layers.{i}.{m} has q/k rows permuted, but qwen3 must not be (FORMAT.md §1.3)" for i in (0, 1) for m in "qk"]


def test_a_checkpoint_without_a_norm_or_with_a_tensor_of_another_shape_fails_naming_it(tmp_path):
    def drop_norm_and_transpose_up(tensors):
        for name in ("model.norm.weight", "lm_head.weight", "model.embed_tokens.weight"):   # the head has neither
            del tensors[name]
        tensors["model.layers.1.mlp.up_proj.weight"] = np.ascontiguousarray(
            tensors["model.layers.1.mlp.up_proj.weight"].T)

    ckpt = Checkpoint(write_checkpoint_with(tmp_path / "hf", fixture("tiny-llama"), drop_norm_and_transpose_up))
    r = checks.weights_vs_checkpoint(ModelFile(fixture("tiny-llama") / "expected_f32.m"), ckpt)
    assert r.status == Status.FAIL and r.details["problems"] == [
        "model.embed_tokens.weight is missing from the checkpoint",
        "layers.1.w3 differs from model.layers.1.mlp.up_proj.weight (relative error inf)",
        "model.norm.weight is missing from the checkpoint", "lm_head.weight is missing from the checkpoint"]
    # four problems: all named, none counted
    assert r.reason.endswith("; lm_head.weight is missing from the checkpoint; reconvert with dllama-convert")


def test_bos_and_eos_of_the_embedded_config_are_looked_up_by_their_text():
    from dllama.formats import EmbeddedKind

    tf = convert_tokenizer(fixture("tiny-llama"))   # embeds its tokenizer_config: bos "<|bos|>", eos "<|eos|>"
    assert checks.expected_special_ids_from_embedded(tf) == (382, [383])

    def expected_with(config: dict, eos_ids=(383,)):
        embedded = [replace(e, data=json.dumps(config).encode()) if e.kind == EmbeddedKind.TOKENIZER_CONFIG else e
                    for e in tf.embedded]
        return checks.expected_special_ids_from_embedded(replace(tf, embedded=embedded, eos_ids=list(eos_ids)))

    assert expected_with({"bos_token": {"content": "<|bos|>"}, "eos_token": "<|eos|>"}) == (382, [383])
    assert expected_with({"bos_token": "<|bos|>", "eos_token": "<|eos|>"}, eos_ids=(5, 383)) == (382, [5, 383])
    assert expected_with({"bos_token": None, "eos_token": "<|eos|>"}) == (None, None)   # no bos: nothing to compare
    assert expected_with({"bos_token": 382, "eos_token": "<|eos|>"}) == (None, None)    # not a text
    assert expected_with({"bos_token": "<|bos|>", "eos_token": "<|not a token|>"}) == (None, None)


def test_bf16_read_as_f16_rounds_to_the_nearest_bf16_ties_to_even():
    # float32 bits -> the bf16 a converter stores (round to nearest, ties to the even last bit), whose two
    # bytes a converter reading them as f16 takes for an f16
    bits = np.array([0x3F818000, 0x3F808000, 0x3F808001, 0x3F807FFF, 0xBF818000], np.uint32)
    bf16 = np.array([0x3F82, 0x3F80, 0x3F81, 0x3F80, 0xBF82], np.uint16)
    got = checks.bf16_read_as_f16(bits.view(np.float32))
    assert got.dtype == np.float32 and np.array_equal(got, bf16.view(np.float16).astype(np.float32))


def test_the_misread_bf16_fraction_counts_non_zero_values_only():
    assert checks.misread_bf16_fraction(np.array([0.0, 0.0, 0.7, -1.5, 0.01, 2.0], np.float32)) == 0.5
    assert checks.misread_bf16_fraction(np.zeros(8, np.float32)) == 0.0   # an all-zero embedding: nothing misread


def test_relative_error_of_rows_against_an_all_zero_original():
    w1 = Checkpoint(fixture("tiny-llama")).get("model.layers.0.mlp.gate_proj.weight")[:4]
    zeros = np.zeros_like(w1)
    assert checks.relative_error(zeros, zeros) == 0.0   # an all-zero original stored as such: exact
    assert checks.relative_error(w1, zeros) == float("inf")   # anything else against it: no scale to be near
    assert checks.relative_error(-w1, w1) == pytest.approx(2.0, rel=1e-12)


def test_llama_qk_rows_left_unpermuted_are_named(tmp_path):
    src = fixture("tiny-llama")
    bad = ModelFile(write_model_with(tmp_path, src / "expected_f32.m", unpermute_qk))
    r = checks.weights_vs_checkpoint(bad, Checkpoint(src))
    assert [p.split(" (relative")[0] for p in r.details["problems"]] == [
        f"layers.{i}.{m} has q/k rows NOT permuted for rotary pairs (FORMAT.md §1.3)" for i in (0, 1) for m in "qk"]


def test_a_checkpoint_with_none_of_the_models_tensors_fails_naming_them_all(tmp_path):
    def keep_none(tensors):
        tensors.clear()
        tensors["unrelated.weight"] = np.zeros(4, np.float32)

    ckpt = Checkpoint(write_checkpoint_with(tmp_path / "hf", fixture("tiny-llama"), keep_none))
    r = checks.weights_vs_checkpoint(ModelFile(fixture("tiny-llama") / "expected_q40.m"), ckpt)
    assert (r.status, r.measured, r.threshold) == (Status.FAIL, "max rel err 0", "<= 0.2 (q40)")
    assert len(r.details["problems"]) == 21 and r.details["relative_errors"] == {}
    assert r.reason.endswith("; and 17 more; reconvert with dllama-convert")


def test_a_tensor_swapped_with_an_unrelated_one_is_named_as_differing(tmp_path):
    # diagnose looks for the swaps converters make, in one layer (w1/w3) or one role across layers;
    # layers.0.w1 holding layers.1.w3 is neither, and is reported as differing, not guessed at
    src = fixture("tiny-qwen3")
    mf = ModelFile(write_model_with(tmp_path, src / "expected_q40.m", swap_tensors("layers.0.w1", "layers.1.w3")))
    spec = mf.layout["layers.0.w1"].spec
    rows = checks.sample_rows(spec)
    stored = checks.stored_rows(mf, spec, rows)
    assert checks.diagnose(mf, Checkpoint(src), spec, tensor_plan(mf.header), rows, stored) == (
        "differs from model.layers.0.mlp.gate_proj.weight")


def test_tensor_stats_of_a_float_tensor_are_its_values_statistics():
    from dllama.formats import decode_tensor

    mf = ModelFile(fixture("tiny-llama") / "expected_f32.m")
    spec = mf.layout["layers.0.w2"].spec
    values = decode_tensor(mf.raw("layers.0.w2"), spec.float_type, spec.shape)
    stats = checks.tensor_stats(mf, "layers.0.w2")
    assert (stats["quantized"], stats["non_finite"], stats["all_zero"]) == (False, 0, False)
    assert stats["mean"] == pytest.approx(float(values.mean()), rel=1e-5, abs=1e-9)
    assert stats["std"] == pytest.approx(float(values.std()), rel=1e-5) and stats["std"] > 0
    assert stats["abs_max"] == float(np.abs(values).max())
