"""`dllama-run chat` from a pipe: its commands, continued lines, and Ctrl-C during an answer.

The same chat at a real terminal (line editing, history) is tests/test_chat_terminal.py."""
from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest
from conftest import CONFORMANCE, require_fixtures
from typer.testing import CliRunner

from dllama.cli.dllama_run import app
from dllama.cli.loading import load_model
from dllama.cli.run_chat import Chat
from dllama.runtime.conversation import StopReason
from dllama.runtime.sampler import Sampling

GREEDY = Sampling(temperature=0.0)


@pytest.fixture
def llama() -> Path:
    return require_fixtures(CONFORMANCE / "tiny-llama")


def chat(llama: Path, lines: str, *options: str):
    args = ["chat", "--model", llama / "expected_q40.m", "--tokenizer", llama / "expected.t", "--steps", 6,
            "--temperature", 0, *options]
    result = CliRunner().invoke(app, [str(a) for a in args], input=lines)
    assert result.exit_code == 0, result.output
    return result


def summaries(stderr: str) -> list[tuple[int, int]]:
    """(prompt tokens evaluated, KV positions in use) of each answer's status line."""
    return [(int(m[1]), int(m[2])) for m in re.finditer(r"^prompt: (\d+) tokens.*\| context: (\d+)/", stderr, re.M)]


def saved(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["messages"]


def test_reset_empties_the_kv_cache_so_the_question_is_answered_as_in_a_new_chat(llama, tmp_path):
    before, after = tmp_path / "before.json", tmp_path / "after.json"
    result = chat(llama, f"hello\nand again\n/save {before}\n/reset\nhello\n/save {after}\n")
    first, _, again = summaries(result.stderr)
    assert again == first  # the whole prompt evaluated again, into an empty cache (not 1 token: a cached prefix)
    assert "new conversation | context: 0/256 tokens" in result.stderr
    assert [m["role"] for m in saved(before)] == ["user", "assistant", "user", "assistant"]
    assert saved(after) == saved(before)[:2]


def test_system_prompt_and_a_continued_line_reach_the_model(llama, tmp_path):
    from dllama.tokenizer import Tokenizer

    target = tmp_path / "chat.json"
    nowhere = tmp_path / "missing" / "chat.json"
    result = chat(llama, f"/system Be brief.\n/system\nfirst \\\nsecond\n/save {target}\n/save {nowhere}\n/nonsense\n"
                         "/help\n")
    messages = saved(target)
    assert messages[:2] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "first \nsecond"}]
    prompt = Tokenizer.load(str(llama / "expected.t")).encode_chat(messages[:2])
    assert summaries(result.stderr)[0][0] == len(prompt)
    assert "system: Be brief." in result.stderr and "unknown command /nonsense" in result.stderr
    assert f"not saved: cannot write to {nowhere.parent}" in result.stderr
    assert all(name in result.stderr for name in ("/reset", "/system TEXT", "/save FILE", "/help"))
    assert result.stdout.count("... ") == 1


def test_a_turn_the_kv_cache_cannot_hold_is_refused_and_the_chat_goes_on(llama):
    result = chat(llama, "a rather long question " * 6 + "\nhi\n", "--max-seq-len", 24)
    assert "--max-seq-len is 24" in result.stderr and "/reset" in result.stderr
    assert len(summaries(result.stderr)) == 1  # "hi" was answered


def test_ctrl_c_stops_the_answer_and_the_next_turn_reads_a_consistent_cache(llama):
    loaded = load_model(llama / "expected_f32.m", llama / "expected.t", 256, 1)
    interrupted = Chat(loaded, steps=40, sampling=GREEDY)
    pieces: list[str] = []

    def press_ctrl_c_at_the_third_token(text: str) -> None:
        pieces.append(text)
        if len(pieces) == 3:
            signal.raise_signal(signal.SIGINT)

    interrupted.ask("hello", press_ctrl_c_at_the_third_token)
    assert interrupted.conversation.stop_reason == StopReason.CANCELLED
    prompt = loaded.tokenizer.encode_chat(interrupted.messages()[:1])
    assert len(interrupted.conversation.cached) == len(prompt) + 3  # the three shown tokens, nothing half-done
    assert interrupted.turns[-1]["role"] == "assistant"  # the partial answer is kept

    answers = []
    interrupted.ask("and then?", answers.append)
    fresh = Chat(loaded, steps=40, sampling=GREEDY, turns=list(interrupted.turns[:-2]))
    fresh_answers = []
    fresh.ask("and then?", fresh_answers.append)  # the whole conversation evaluated from position 0
    assert interrupted.conversation.start_pos > 0  # the interrupted chat reused its cache
    assert "".join(answers) == "".join(fresh_answers)


def test_a_stop_sequence_ends_the_shown_answer_and_the_remembered_one(llama, tmp_path):
    first, cut = tmp_path / "first.json", tmp_path / "cut.json"
    chat(llama, f"hello\n/save {first}\n", "--steps", 12)
    answer = saved(first)[-1]["content"]
    stop = answer[len(answer) // 2:][:2]
    assert stop.strip() and answer.find(stop) > 0, answer
    result = chat(llama, f"hello\n/save {cut}\n", "--steps", 12, "--stop", stop)
    assert saved(cut)[-1]["content"] == answer[:answer.find(stop)]
    assert result.stdout.split("> ")[1] == answer[:answer.find(stop)] + "\n"
