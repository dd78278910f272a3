"""`dllama-run MODEL`: the model store (convert and validate once, then run from it), and the command line's
shared habits (--version, completion, one spelling per option, one `error:` line before anything loads)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONFORMANCE, require_fixtures
from typer.testing import CliRunner

from dllama import store
from dllama.cli.dllama_run import app
from dllama.converter.convert import convert
from dllama.runtime import aot_kernels

runner = CliRunner()
PROMPT = "The capital of France is"


@pytest.fixture
def llama() -> Path:
    return require_fixtures(CONFORMANCE / "tiny-llama")


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("DLLAMA_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_error_line(result, *fragments: str, code: int = 1) -> None:
    """Exit `code` and one `error:` line, the last on stderr (progress notes may come before it)."""
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert [line for line in lines if "error" in line.lower()] == lines[-1:], result.stderr
    assert lines[-1].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[-1]


def nothing_loads(monkeypatch, *modules: str) -> None:
    """Make loading or resolving a model fail the test: an error must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was resolved or loaded before the error")

    for module in modules:
        for name in ("model_files", "load_model"):
            monkeypatch.setattr(f"{module}.{name}", refuse, raising=False)


def fresh_env(tmp_path: Path) -> dict:
    """A new user's HOME and XDG cache; only the compiled kernels are shared (their build is timed elsewhere)."""
    env = {**os.environ, "HOME": str(tmp_path / "user"), "XDG_CACHE_HOME": str(tmp_path / "user" / ".cache"),
           "DLLAMA_CACHE": str(aot_kernels.cache_root()), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("DLLAMA_HOME", None)
    return env


def dllama_run(args: list, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dllama.cli.dllama_run", *map(str, args)], env=env, text=True,
                          capture_output=True, timeout=600, umask=0o022)


# --------------------------------------------------------------------------------------------
# Must hold 1: a GGUF and a checkpoint folder, converted and stored once, then run from the store

def test_a_gguf_is_converted_stored_and_answered_then_run_from_the_store(smollm2_gguf, tmp_path):
    env = fresh_env(tmp_path)
    args = [smollm2_gguf, "--prompt", PROMPT, "--steps", 8, "--temperature", 0]
    first = dllama_run(args, env)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith(PROMPT + " Paris")  # SmolLM2 q80, greedy
    assert "into the model store" in first.stderr and "stored as smollm2-135m-instruct:q80" in first.stderr
    second = dllama_run(args, env)
    assert second.returncode == 0, second.stderr
    assert "model store" not in second.stderr and second.stdout == first.stdout
    listed = dllama_run(["list"], env)
    assert "smollm2-135m-instruct:q80" in listed.stdout and str(smollm2_gguf) in listed.stdout
    entry = tmp_path / "user" / ".cache" / "dllama" / "models" / "smollm2-135m-instruct" / "q80"
    assert sorted(oct(p.stat().st_mode & 0o777) for p in entry.iterdir()) == ["0o644"] * 3  # Must hold 4
    assert oct(entry.stat().st_mode & 0o777) == "0o755"


def test_a_checkpoint_folder_is_stored_once_even_by_two_runs_at_once(llama, home, tmp_path):
    env = {**fresh_env(tmp_path), "DLLAMA_HOME": str(home)}
    args = [sys.executable, "-m", "dllama.cli.dllama_run", str(llama), "--prompt", "Hello world", "--steps", "6",
            "--temperature", "0"]
    both = [subprocess.Popen(args, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, umask=0o022)
            for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in both]
    assert [p.returncode for p in both] == [0, 0], outputs
    assert sum("into the model store" in err for _, err in outputs) == 1  # the other waited for the lock, found it
    assert outputs[0][0] == outputs[1][0]
    entry = store.find("tiny-llama")
    assert entry.quant == "q80"  # a small model: q80
    assert entry.files.model.read_bytes() == (llama / "expected_q80.m").read_bytes()
    assert entry.info["validation"]["verdict"] == "pass"
    assert [p.name for p in (home / "models").iterdir() if p.name != store.LOCK_FILE] == ["tiny-llama"]
    again = run(llama, "--prompt", "Hello world", "--steps", 6, "--temperature", 0)
    assert again.exit_code == 0 and "model store" not in again.stderr and again.stdout == outputs[0][0]
    by_name = run("tiny-llama", "--prompt", "Hello world", "--steps", 6, "--temperature", 0)
    assert by_name.stdout == outputs[0][0]
    listed = run("list", "--json")
    assert [m["name"] for m in json.loads(listed.stdout)["models"]] == ["tiny-llama:q80"]
    assert run("rm", "tiny-llama").exit_code == 0
    assert store.entries() == [] and not entry.folder.exists()


def test_a_hub_id_is_converted_from_the_local_hugging_face_cache(llama, tmp_path):
    repo = tmp_path / "hf" / "hub" / "models--acme--tiny-llama"
    revision = "0123456789abcdef0123456789abcdef01234567"
    (repo / "snapshots" / revision).mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(llama / name, repo / "snapshots" / revision / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    env = {**fresh_env(tmp_path), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
           "HF_ENDPOINT": "http://127.0.0.1:9"}  # never the real hub
    proc = dllama_run(["acme/tiny-llama", "--quant", "q40", "--prompt", "Hello", "--steps", 4], env)
    assert proc.returncode == 0, proc.stderr
    stored = tmp_path / "user" / ".cache" / "dllama" / "models" / "tiny-llama" / "q40"
    direct = convert(llama, "q40", tmp_path / "direct", name="tiny-llama")  # the default (error-aware) encoder
    assert (stored / "dllama_model_tiny-llama_q40.m").read_bytes() == direct.plan.model_path.read_bytes()
    assert json.loads((stored / "entry.json").read_text())["source"] == "acme/tiny-llama"


def test_a_m_file_runs_with_the_t_beside_it(llama, home):
    result = run(llama / "expected_q40.m", "--prompt", "Hello", "--steps", 4, "--temperature", 0)
    reference = run("--model", llama / "expected_q40.m", "--tokenizer", llama / "expected.t", "--prompt", "Hello",
                    "--steps", 4, "--temperature", 0)
    assert result.exit_code == 0 and result.stdout == reference.stdout
    assert not (home / "models").exists() or store.entries() == []  # a .m is run where it is


def test_a_m_among_several_t_files_asks_for_its_tokenizer(llama, home, tmp_path):
    shutil.copyfile(llama / "expected_q40.m", tmp_path / "a.m")
    for name in ("x.t", "y.t"):
        shutil.copyfile(llama / "expected.t", tmp_path / name)
    assert_one_error_line(run(tmp_path / "a.m", "--prompt", "Hi"), "found 2 .t files", "--tokenizer")
    assert run(tmp_path / "a.m", "--tokenizer", tmp_path / "x.t", "--prompt", "Hi", "--steps", 2).exit_code == 0


def test_the_default_quant_keeps_a_ggufs_own_blocks_else_follows_the_models_size(llama, tmp_path):
    from gguf_helpers import gguf_from_hf_folder, write_gguf_like

    float32 = gguf_from_hf_folder(llama, tmp_path / "tiny-f32.gguf")
    assert store.default_quant(float32) == "q80"  # 0.1 M weights: small
    assert store.default_quant(llama) == "q80"
    for ggml, quant in (("Q4_0", "q40"), ("Q8_0", "q80")):  # copied block for block, never rounded twice
        assert store.default_quant(write_gguf_like(float32, tmp_path / f"{ggml}.gguf", tensor_type=ggml)) == quant


# --------------------------------------------------------------------------------------------
# The store's writes: whole entries

def test_a_changed_source_replaces_its_entry_and_another_source_of_that_name_gets_its_own(llama, home, tmp_path):
    first, second = (shutil.copytree(llama, tmp_path / where / "tiny-llama") for where in ("a", "b"))
    notes: list[str] = []
    stored = store.resolve(str(first), "q40", log=notes.append)
    assert store.resolve(str(first), log=notes.append) == stored
    assert sum("into the model store" in n for n in notes) == 1
    os.utime(first / "config.json", ns=(0, 0))  # the source changed: converted again, in the same entry
    assert store.resolve(str(first), log=notes.append).model == stored.model
    assert any(n.startswith("replaced tiny-llama:q40") for n in notes)
    other = store.resolve(str(second), "q40", log=notes.append)
    assert other.entry.ref == "tiny-llama-2:q40" and other.model.read_bytes() == stored.model.read_bytes()
    assert sorted(e.ref for e in store.entries()) == ["tiny-llama-2:q40", "tiny-llama:q40"]


def test_a_failed_conversion_leaves_no_entry_and_a_killed_ones_leftovers_are_removed(llama, home, monkeypatch):
    from dllama.converter import convert

    (home / "models" / (store.STAGING_PREFIX + "killed")).mkdir(parents=True)  # what a SIGKILL leaves
    real_write = convert.write_outputs

    def write_then_fail(job, progress=None):
        real_write(job, progress)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(convert, "write_outputs", write_then_fail)
    result = run(llama, "--prompt", "Hi")
    assert_one_error_line(result, "No space left on device")
    assert store.entries() == [] and [p.name for p in (home / "models").iterdir()] == [store.LOCK_FILE]


# --------------------------------------------------------------------------------------------
# Must hold 3: each error path is one `error:` line, exit 1, and nothing loaded first

def test_serve_on_a_port_in_use_is_refused_before_anything_loads(llama, home, monkeypatch):
    nothing_loads(monkeypatch, "dllama.cli.run_serve")
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = run("serve", llama / "expected_q40.m", "--port", port)
    assert_one_error_line(result, f"cannot listen on 127.0.0.1:{port}", "choose another --port")
    assert result.stdout == ""


def test_a_worker_on_a_port_in_use_is_refused_before_its_model_loads(llama, home, monkeypatch):
    nothing_loads(monkeypatch, "dllama.cli.run_cluster")
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = run("worker", "--host", "127.0.0.1", "--port", port, "--model", llama / "expected_q40.m")
    assert_one_error_line(result, f"cannot listen on 127.0.0.1:{port}")


def test_a_gguf_given_as_model_is_named_and_not_converted(smollm2_gguf, home, monkeypatch):
    monkeypatch.setattr("dllama.cli.dllama_run.load_model", lambda *a, **k: pytest.fail("loaded"))
    result = run("--model", smollm2_gguf, "--prompt", "Hi")
    assert_one_error_line(result, "this is a GGUF file: run `dllama-run", "or convert it with dllama-convert gguf")
    assert not (home / "models").exists()


def test_a_checkpoint_folder_given_as_model_is_named(llama, home):
    assert_one_error_line(run("chat", "--model", llama), "this is a checkpoint folder", "dllama-convert hf")


@pytest.mark.parametrize("args, fragments", [
    (("no-such-model", "--prompt", "Hi"), ("does not exist", "dllama-run list", "hub id")),
    (("{m}", "--model", "{m}", "--prompt", "Hi"), ("MODEL", "--model", "not both")),
    (("{t}", "--prompt", "Hi"), ("is not a distributed-llama .m model nor a GGUF file",)),
    (("--prompt", "Hi"), ("name the model",)),
    (("rm", "no-such-model"), ("no stored model is named no-such-model",)),
    (("{dir}", "--prompt", "Hi"), ("a folder without config.json",)),
])
def test_bad_model_arguments(llama, home, tmp_path, monkeypatch, args, fragments):
    monkeypatch.setattr("dllama.cli.dllama_run.load_model", lambda *a, **k: pytest.fail("loaded"))
    paths = {"m": str(llama / "expected_q40.m"), "t": str(llama / "expected.t"), "dir": str(tmp_path)}
    assert_one_error_line(run(*[a.format(**paths) for a in args]), *fragments)


def test_usage_errors_are_one_error_line_too():
    result = run("--no-such-option")
    assert_one_error_line(result, "no such option: --no-such-option", "--help`", code=2)
    assert "Error" not in result.stderr


# --------------------------------------------------------------------------------------------
# One command line: --version, completion, one spelling per option

@pytest.mark.parametrize("module", ["dllama_run", "dllama_convert", "dllama_validate"])
def test_every_command_has_version(module):
    import importlib

    from dllama.cli.command_group import version

    command = importlib.import_module(f"dllama.cli.{module}").app
    result = runner.invoke(command, ["--version"], prog_name=module.replace("_", "-"))
    assert result.exit_code == 0 and result.stdout == f"{module.replace('_', '-')} {version()}\n"


def complete(words: str) -> list[str]:
    result = runner.invoke(app, [], prog_name="dllama-run",
                           env={"_DLLAMA_RUN_COMPLETE": "complete_bash", "COMP_WORDS": words,
                                "COMP_CWORD": str(len(words.split()) - 1)})
    return result.stdout.split()


def test_shell_completion_completes_commands_and_stored_models(home):
    entry = home / "models" / "chat-model" / "q40"
    entry.mkdir(parents=True)
    (entry / store.ENTRY_FILE).write_text(json.dumps({"name": "chat-model", "quant": "q40", "model": "m.m",
                                                      "tokenizer": "t.t"}))
    assert complete("dllama-run ch") == ["chat", "chat-model", "chat-model:q40"]
    assert complete("dllama-run serve chat-model:") == ["chat-model:q40"]


def test_threads_is_the_one_spelling_and_nthreads_a_hidden_alias(llama):
    help_text = run("--help").stdout
    assert "--threads" in help_text and "--nthreads" not in help_text
    args = ("--model", llama / "expected_q40.m", "--prompt", "Hi", "--steps", 3, "--temperature", 0)
    old, new = run(*args, "--nthreads", 1), run(*args, "--threads", 1)
    assert old.exit_code == 0 and old.stdout == new.stdout and "1 threads" in old.stderr


def test_plan_sizes_buffers_for_the_runtimes_batch(llama):
    from dllama.runtime.engine import PREFILL_BATCH

    plan = [json.loads(run("plan", llama / "expected_q40.m", "--nodes", 2, "--json", *extra).stdout)
            for extra in ((), ("--batch", PREFILL_BATCH), ("--batch", 1))]
    assert plan[0] == plan[1] and plan[0] != plan[2]
