"""`dllama-run`: streaming generation, chat, and one clear error line per bad input."""
from __future__ import annotations

import struct
from pathlib import Path

import pytest
from conftest import CONFORMANCE, require_fixtures
from typer.testing import CliRunner

from dllama.cli.dllama_run import app
from dllama.formats import read_tokenizer
from dllama.runtime.engine import Engine
from dllama.runtime.generate import generate

runner = CliRunner()


@pytest.fixture
def llama() -> Path:
    return require_fixtures(CONFORMANCE / "tiny-llama")


def run(*args: str, input: str | None = None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: "), result.stderr
    assert [line for line in lines if line.startswith("error: ")] == [lines[-1]]
    for fragment in fragments:
        assert fragment in lines[-1]


def test_greedy_generation_streams_the_engines_tokens_then_a_timing_summary(llama):
    from dllama.tokenizer import Tokenizer

    result = run("--model", llama / "expected_f32.m", "--tokenizer", llama / "expected.t", "--prompt", "Hello world",
                 "--steps", 12, "--temperature", 0)
    assert result.exit_code == 0, result.output
    tok = Tokenizer.load(str(llama / "expected.t"))
    ids = tok.encode("Hello world")
    expected = list(generate(Engine.load(llama / "expected_f32.m"), ids, 12, eos_ids=tok.eos_ids))
    assert result.stdout == "Hello world" + tok.decode(expected) + "\n"
    summary = result.stderr.strip().splitlines()[-1]
    assert summary.startswith(f"prompt: {len(ids)} tokens,") and f"generated: {len(expected)} tokens" in summary
    assert "ms/token" in summary


def test_ignore_eos_generates_every_step_asked_for(llama, monkeypatch):
    """With a token of the greedy answer as end-of-sequence, generation stops before it; --ignore-eos
    (benchmarks) goes on to all --steps tokens, the engine's greedy tokens."""
    from dllama.tokenizer import Tokenizer

    tok = Tokenizer.load(str(llama / "expected.t"))
    ids = tok.encode("Hello world")
    greedy = list(generate(Engine.load(llama / "expected_f32.m"), ids, 12))
    stop = next(i for i in range(1, len(greedy)) if greedy[i] not in greedy[:i])  # its first time in the answer
    assert len(greedy) == 12
    monkeypatch.setattr(Tokenizer, "eos_ids", property(lambda self: [greedy[stop]]))
    args = ("--model", llama / "expected_f32.m", "--tokenizer", llama / "expected.t", "--prompt", "Hello world",
            "--steps", 12, "--temperature", 0)
    stopped, ignoring = run(*args), run(*args, "--ignore-eos")
    assert stopped.exit_code == 0 and ignoring.exit_code == 0, stopped.output + ignoring.output
    assert f"generated: {stop} tokens" in stopped.stderr.strip().splitlines()[-1]
    assert "generated: 12 tokens" in ignoring.stderr.strip().splitlines()[-1]
    assert ignoring.stdout == "Hello world" + tok.decode(greedy) + "\n"


def test_seeded_sampling_is_reproducible(llama):
    args = ("--model", llama / "expected_q40.m", "--tokenizer", llama / "expected.t", "--prompt", "Once",
            "--steps", 16, "--temperature", 1.0, "--topp", 0.95, "--seed", 7)
    first, second = run(*args), run(*args)
    assert first.exit_code == 0 and first.stdout == second.stdout


def test_chat_answers_each_turn_and_ends_on_an_empty_line(llama):
    result = run("chat", "--model", llama / "expected_q40.m", "--tokenizer", llama / "expected.t", "--steps", 6,
                 "--temperature", 0, input="hello\nand again\n\n")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("> ") == 3  # two answered turns, then the empty line
    assert result.stderr.count("prompt: ") == 2


def test_help_names_the_default_kv_cache_size():
    result = run("--help")
    assert result.exit_code == 0 and "default 2048" in result.stdout and "chat" in result.stdout


# --------------------------------------------------------------------------------------------
# Bad input: one line naming the problem and the fix, exit code 1

def corrupt_copy(src: Path, dst: Path, edit) -> Path:
    data = bytearray(src.read_bytes())
    edit(data)
    dst.write_bytes(bytes(data))
    return dst


def test_bad_magic(llama, tmp_path):
    model = corrupt_copy(llama / "expected_q40.m", tmp_path / "bad.m", lambda d: struct.pack_into("<i", d, 0, 0x1234))
    result = run("--model", model, "--tokenizer", llama / "expected.t", "--prompt", "hi")
    assert_one_line_error(result, "bad magic 0x1234", "not a distributed-llama model")


def test_unknown_header_key(llama, tmp_path):
    model = corrupt_copy(llama / "expected_q40.m", tmp_path / "key.m", lambda d: struct.pack_into("<i", d, 8, 99))
    result = run("--model", model, "--tokenizer", llama / "expected.t", "--prompt", "hi")
    assert_one_line_error(result, "unknown header key 99")


def test_truncated_tensors(llama, tmp_path):
    model = tmp_path / "short.m"
    model.write_bytes((llama / "expected_q40.m").read_bytes()[:-100])
    result = run("--model", model, "--tokenizer", llama / "expected.t", "--prompt", "hi")
    assert_one_line_error(result, "truncated", "the header needs exactly")


def test_tokenizer_from_another_model(llama, tmp_path):
    tf = read_tokenizer(llama / "expected.t")
    tf.tokens += [f"<extra{i}>".encode() for i in range(16)]
    tf.scores += [0.0] * 16
    other = tmp_path / "other.t"
    other.write_bytes(tf.to_bytes())
    result = run("--model", llama / "expected_q40.m", "--tokenizer", other, "--prompt", "hi")
    assert_one_line_error(result, f"has {tf.vocab_size} tokens", "vocabulary of 384", "same checkpoint")


def test_prompt_longer_than_max_seq_len(llama):
    result = run("--model", llama / "expected_q40.m", "--tokenizer", llama / "expected.t",
                 "--prompt", "a rather long prompt " * 4, "--max-seq-len", 8)
    assert_one_line_error(result, "--max-seq-len is 8", "raise --max-seq-len or shorten the prompt")


def test_missing_model_file(llama, tmp_path):
    result = run("--model", tmp_path / "nope.m", "--tokenizer", llama / "expected.t", "--prompt", "hi")
    assert_one_line_error(result, "does not exist")


def test_missing_prompt_names_the_required_options(llama):
    result = run("--model", llama / "expected_q40.m", "--tokenizer", llama / "expected.t")
    assert_one_line_error(result, "--prompt")


def test_sampling_flags_top_k_1_is_greedy_and_stop_cuts_the_text(llama):
    common = ("--model", llama / "expected_f32.m", "--tokenizer", llama / "expected.t", "--prompt", "Hello world",
              "--steps", 12)
    greedy = run(*common, "--temperature", 0)
    top_1 = run(*common, "--temperature", 1.5, "--seed", 3, "--top-k", 1, "--repeat-penalty", 1)
    assert greedy.exit_code == 0 and top_1.stdout == greedy.stdout
    text = greedy.stdout[len("Hello world"):-1]
    stop = text[4:7]
    stopped = run(*common, "--temperature", 0, "--stop", stop, "--stop", "never there")
    assert stopped.exit_code == 0 and stopped.stdout == "Hello world" + text[:text.index(stop)] + "\n"


def test_bad_sampling_values_are_refused_without_a_traceback(llama):
    common = ("--model", llama / "expected_f32.m", "--tokenizer", llama / "expected.t", "--prompt", "Hi", "--steps", 2)
    assert_one_line_error(run(*common, "--repeat-penalty", 0), "repeat_penalty")
    for flag in ("--temperature", "--min-p"):   # typer's own range check refuses NaN
        result = run(*common, flag, "nan")
        assert result.exit_code == 2 and f"error: invalid value for '{flag}'" in result.output  # one error: line
