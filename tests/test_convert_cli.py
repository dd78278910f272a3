"""dllama-convert through its CLI: bad input is one clear line, exit 1, and no output file left behind."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import CONFORMANCE, require_fixtures
from safetensors.numpy import load_file, save_file
from test_convert import EXAMPLE_TOKENIZER, small_config
from typer.testing import CliRunner

from dllama.cli.dllama_convert import app
from dllama.converter.convert import ConversionError, prepare_conversion, write_outputs
from dllama.converter.synthetic import write_checkpoint
from dllama.formats import EmbeddedKind, FloatType, read_tokenizer

runner = CliRunner()


def run_cli(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def checkpoint(tmp_path: Path, dtype: str = "bf16", **config) -> Path:
    return write_checkpoint(tmp_path / "ck", small_config(**config), dtype=dtype, tokenizer=EXAMPLE_TOKENIZER)


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def assert_fails_cleanly(result, out_dir: Path, *phrases: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for phrase in phrases:
        assert phrase in lines[0]
    assert result.stdout == ""
    assert not out_dir.exists() or list(out_dir.iterdir()) == []  # not even a .partial


def test_conversion_prints_the_summary_and_writes_both_files(tmp_path):
    folder = checkpoint(tmp_path)
    out = tmp_path / "out"
    result = run_cli("hf", folder, "--quant", "q40", "--name", "tiny", "--output-dir", out)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["dllama_model_tiny_q40.m", "dllama_tokenizer_tiny.t"]
    for fact in ("arch llama", "q40 weights", "dim 64", "layers     2", "kv heads 2", "vocab      512",
                 str(out / "dllama_model_tiny_q40.m")):
        assert fact in result.stdout


def test_json_summary_is_machine_readable(tmp_path):
    folder = checkpoint(tmp_path)
    result = run_cli("hf", folder, "-q", "f32", "-o", tmp_path / "out", "--json", "--no-embed-tokenizer")
    summary = json.loads(result.stdout)
    assert summary["model"]["quant"] == "f32" and summary["model"]["n_layers"] == 2
    assert summary["tokenizer"]["embedded_source"] is False
    assert sum(summary["outputs"].values()) == sum(p.stat().st_size for p in (tmp_path / "out").iterdir())


def test_tokenizer_command_writes_only_the_t_file(tmp_path):
    result = run_cli("tokenizer", EXAMPLE_TOKENIZER, "--name", "ex", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["dllama_tokenizer_ex.t"]


def test_sentencepiece_tokenizer_model_source_is_converted_and_embedded(tmp_path):
    import io

    import sentencepiece

    words = "the quick brown fox jumps over a lazy dog while small boards run large models in parallel".split()
    sentences = [" ".join(words[i % len(words):] + words[:i % len(words)]) for i in range(200)]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, vocab_size=400,
                                             model_type="bpe", byte_fallback=True, minloglevel=2)
    folder = write_checkpoint(tmp_path / "ck", small_config(vocab_size=400, bos_token_id=1, eos_token_id=2))
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    result = run_cli("hf", folder, "-q", "q40", "-n", "sp", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    tok = read_tokenizer(tmp_path / "out" / "dllama_tokenizer_sp.t")
    assert (tok.vocab_size, tok.bos_id, tok.eos_ids) == (400, 1, [2])
    assert tok.tokens[3 + 0x41] == b"A"  # byte-fallback piece <0x41>
    assert tok.embedded_source(EmbeddedKind.SENTENCEPIECE) == model.getvalue()


# -- one test per bad input (issue 2, "Must hold" 4)

def test_missing_config_is_named(tmp_path):
    folder = checkpoint(tmp_path)
    (folder / "config.json").unlink()
    assert_fails_cleanly(run_cli("hf", folder, "-q", "q40", "-o", tmp_path / "out"), tmp_path / "out",
                         "config.json is missing")


def test_missing_tensor_is_named(tmp_path):
    folder = checkpoint(tmp_path, dtype="f32")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors")
    assert_fails_cleanly(run_cli("hf", folder, "-q", "q40", "-o", tmp_path / "out"), tmp_path / "out",
                         "model.layers.1.mlp.up_proj.weight is missing")


def test_tensor_with_the_wrong_shape_is_named(tmp_path):
    folder = checkpoint(tmp_path)
    edit_config(folder, intermediate_size=96)
    assert_fails_cleanly(run_cli("hf", folder, "-q", "q40", "-o", tmp_path / "out"), tmp_path / "out",
                         "model.layers.0.mlp.gate_proj.weight has shape [128, 64]")


def test_bias_tensors_are_refused_rather_than_dropped(tmp_path):
    folder = checkpoint(tmp_path, dtype="f32", attention_bias=True)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
    save_file(tensors, folder / "model.safetensors")
    assert_fails_cleanly(run_cli("hf", folder, "-q", "q40", "-o", tmp_path / "out"), tmp_path / "out",
                         "model.layers.0.self_attn.q_proj.bias is a bias")


def test_missing_shard_is_named(tmp_path):
    folder = write_checkpoint(tmp_path / "ck", small_config(), shards=2, tokenizer=EXAMPLE_TOKENIZER)
    (folder / "model-00002-of-00002.safetensors").unlink()
    assert_fails_cleanly(run_cli("hf", folder, "-q", "q40", "-o", tmp_path / "out"), tmp_path / "out",
                         "model-00002-of-00002.safetensors", "missing")


@pytest.mark.parametrize("key,value,phrase", [
    ("model_type", "gpt2", "unsupported model_type 'gpt2'"),
    ("hidden_act", "gelu_pytorch_tanh", "unsupported hidden_act 'gelu_pytorch_tanh'"),
    ("rms_norm_eps", 1e-8, "unsupported rms_norm_eps 1e-08"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "unsupported rope scaling type 'yarn'"),
])
def test_unsupported_config_values_are_named(tmp_path, key, value, phrase):
    folder = checkpoint(tmp_path)
    edit_config(folder, **{key: value})
    assert_fails_cleanly(run_cli("hf", folder, "-q", "q40", "-o", tmp_path / "out"), tmp_path / "out", phrase)


@pytest.mark.parametrize("quant", ["q40", "q80"])
def test_row_length_not_a_multiple_of_32_is_refused_for_block_types(tmp_path, quant):
    folder = checkpoint(tmp_path, hidden_size=48, num_attention_heads=4, num_key_value_heads=2)
    assert_fails_cleanly(run_cli("hf", folder, "-q", quant, "-o", tmp_path / "out"), tmp_path / "out",
                         "rows of 48 values, not a multiple of 32", "--quant f32")
    # the fix the message suggests works
    assert run_cli("hf", folder, "-q", "f32", "-o", tmp_path / "out").exit_code == 0


def test_truncated_safetensors_is_refused(tmp_path):
    folder = checkpoint(tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:len(data) - 1000])
    assert_fails_cleanly(run_cli("hf", folder, "-q", "q40", "-o", tmp_path / "out"), tmp_path / "out", "truncated")


def test_corrupt_safetensors_header_is_refused(tmp_path):
    folder = checkpoint(tmp_path)
    with open(folder / "model.safetensors", "r+b") as f:
        f.seek(8)
        f.write(b"\xff\xfe not json")
    assert_fails_cleanly(run_cli("hf", folder, "-q", "q40", "-o", tmp_path / "out"), tmp_path / "out", "corrupt")


def test_tokenizer_larger_than_the_model_vocabulary_is_refused(tmp_path):
    folder = checkpoint(tmp_path, vocab_size=384)
    assert_fails_cleanly(run_cli("hf", folder, "-q", "q40", "-o", tmp_path / "out"), tmp_path / "out",
                         "512 tokens", "vocab_size is 384")


def test_model_vocabulary_padded_beyond_the_tokenizer_is_accepted_with_a_note(tmp_path):
    folder = checkpoint(tmp_path, vocab_size=640)  # as Qwen pads its embedding
    result = run_cli("hf", folder, "-q", "q40", "-o", tmp_path / "out")
    assert result.exit_code == 0 and "padded beyond the tokenizer" in result.stderr


def test_eos_id_outside_the_tokenizer_is_refused(tmp_path):
    folder = checkpoint(tmp_path, eos_token_id=[511, 128009])
    assert_fails_cleanly(run_cli("hf", folder, "-q", "q40", "-o", tmp_path / "out"), tmp_path / "out",
                         "eos token id 128009", "eos_token_id in config.json")


def test_missing_tokenizer_is_named(tmp_path):
    folder = write_checkpoint(tmp_path / "ck", small_config())
    assert_fails_cleanly(run_cli("hf", folder, "-q", "q40", "-o", tmp_path / "out"), tmp_path / "out",
                         "neither tokenizer.model nor tokenizer.json")


def test_unknown_quant_is_refused(tmp_path):
    folder = checkpoint(tmp_path)
    assert_fails_cleanly(run_cli("hf", folder, "-q", "q4_k", "-o", tmp_path / "out"), tmp_path / "out",
                         "q40, q80, f32")


def test_f16_is_refused_with_the_reason(tmp_path):
    """The format has f16 weights but no runtime runs them: a file nobody could run is not written."""
    folder = checkpoint(tmp_path)
    assert_fails_cleanly(run_cli("hf", folder, "-q", "f16", "-o", tmp_path / "out"), tmp_path / "out",
                         "no runtime runs f16 weights", "use f32")


def test_converted_files_have_the_umasks_mode(tmp_path):
    folder = checkpoint(tmp_path)
    old = os.umask(0o022)
    try:
        assert run_cli("hf", folder, "-q", "q40", "-o", tmp_path / "out").exit_code == 0
    finally:
        os.umask(old)
    assert sorted(oct(p.stat().st_mode & 0o777) for p in (tmp_path / "out").iterdir()) == ["0o644", "0o644"]


def test_output_folder_that_cannot_be_created_is_refused(tmp_path):
    folder = checkpoint(tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = run_cli("hf", folder, "-q", "q40", "-o", blocker / "out")
    assert_fails_cleanly(result, blocker / "out", "--output-dir")


def read_only_prefix(folder: Path) -> list[str]:
    """A command prefix under which `folder` is read-only, for root too (CI runs as root, who writes through
    permission bits): a private mount namespace where the folder is bound onto itself read-only."""
    if os.geteuid() != 0:
        folder.chmod(0o500)
        return []
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"root without a mount namespace (unshare: {probe.stderr.decode().strip()})")
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"',
            str(folder)]


def test_read_only_output_folder_is_refused(tmp_path):
    folder = checkpoint(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    try:
        result = subprocess.run([*read_only_prefix(out), "dllama-convert", "hf", str(folder), "-q", "q40", "-o",
                                 str(out)], capture_output=True, text=True, timeout=300)
    finally:
        out.chmod(0o700)
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "not writable" in result.stderr and result.stdout == ""
    assert list(out.iterdir()) == []


def test_failure_while_streaming_leaves_no_file(tmp_path):
    folder = checkpoint(tmp_path)
    out = tmp_path / "out"
    plan = prepare_conversion(folder, FloatType.Q40, "m", out, exact=True)  # the calibration would read it first
    os.truncate(folder / "model.safetensors", (folder / "model.safetensors").stat().st_size // 2)  # after the checks
    with pytest.raises(ConversionError, match="truncated"):
        write_outputs(plan)
    assert list(out.iterdir()) == []


def test_disk_full_while_writing_is_one_line_and_leaves_no_file(tmp_path, monkeypatch):
    import errno

    from dllama.converter import convert as convert_module

    real_write = convert_module._write_tensor
    written = []

    def write_then_fail(f, t, *args):
        if written:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(t)
        real_write(f, t, *args)

    monkeypatch.setattr(convert_module, "_write_tensor", write_then_fail)
    folder = checkpoint(tmp_path)
    assert_fails_cleanly(run_cli("hf", folder, "-q", "q40", "-n", "m", "-o", tmp_path / "out"), tmp_path / "out",
                         "writing", "dllama_model_m_q40.m", "No space left on device", "--output-dir")


def test_default_name_of_the_current_folder_is_its_real_name(tmp_path, monkeypatch):
    folder = checkpoint(tmp_path)
    monkeypatch.chdir(folder)
    assert run_cli("hf", ".", "-q", "q40", "-o", tmp_path / "out").exit_code == 0
    assert (tmp_path / "out" / "dllama_model_ck_q40.m").is_file()


# -- hub ids, without network

def run_subprocess(args: list[str], hf_home: Path, offline: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1" if offline else "0",
           "HF_ENDPOINT": "http://127.0.0.1:9"}  # never the real hub: port 9 refuses connections
    env.pop("HF_HUB_CACHE", None)
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    return subprocess.run([sys.executable, "-m", "dllama.cli.dllama_convert", *args], env=env, capture_output=True,
                          text=True, timeout=120)


def test_hub_id_offline_and_not_cached_fails_with_one_line(tmp_path):
    out = tmp_path / "out"
    proc = run_subprocess(["hf", "acme/tiny-llama", "-q", "q40", "-o", str(out)], tmp_path / "hf")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: acme/tiny-llama is not in the Hugging Face cache and offline mode is on (HF_HUB_OFFLINE); "
        "download it once with network access, or pass a local folder"]
    assert not out.exists()


def test_hub_unreachable_and_not_cached_fails_with_one_line(tmp_path):
    proc = run_subprocess(["hf", "acme/tiny-llama", "-q", "q40", "-o", str(tmp_path / "out")], tmp_path / "hf",
                          offline=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: cannot reach the Hugging Face hub to download acme/tiny-llama and it is not cached; "
        "check the network, or pass a local folder"]
    assert not (tmp_path / "out").exists()


def test_hub_id_found_in_the_offline_cache_converts(tmp_path):
    source = require_fixtures(CONFORMANCE / "tiny-llama")
    repo = tmp_path / "hf" / "hub" / "models--acme--tiny-llama"
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(source / name, snapshot / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    out = tmp_path / "out"
    proc = run_subprocess(["hf", "acme/tiny-llama", "-q", "q40", "--exact", "-o", str(out)], tmp_path / "hf")
    assert proc.returncode == 0, proc.stderr
    assert (out / "dllama_model_tiny-llama_q40.m").read_bytes() == (source / "expected_q40.m").read_bytes()


def test_hub_download_takes_only_the_top_level_files_a_conversion_reads(tmp_path):
    from huggingface_hub.utils import filter_repo_objects

    from dllama.converter.hub import IGNORE_PATTERNS, METADATA_PATTERNS, _weight_patterns

    repo = ["config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors", "model-fp8.safetensors", "consolidated.safetensors", "tokenizer.json",
            "tokenizer_config.json", "tokenizer.model", "chat_template.jinja", "pytorch_model.bin",
            "original/params.json", "onnx/model.safetensors", "README.md"]

    def fetched(patterns):
        return list(filter_repo_objects(repo, allow_patterns=patterns, ignore_patterns=IGNORE_PATTERNS))

    assert fetched(METADATA_PATTERNS) == ["config.json", "model.safetensors.index.json", "tokenizer.json",
                                          "tokenizer_config.json", "tokenizer.model", "chat_template.jinja"]
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert [f for f in fetched(_weight_patterns(tmp_path)) if f.endswith(".safetensors")] == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    (tmp_path / "model.safetensors.index.json").unlink()  # no index: every top-level file but consolidated*
    assert fetched(_weight_patterns(tmp_path)) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model-fp8.safetensors"]


def test_path_that_does_not_exist_is_not_mistaken_for_a_hub_id(tmp_path):
    result = run_cli("hf", tmp_path / "nowhere", "-q", "q40", "-o", tmp_path / "out")
    assert_fails_cleanly(result, tmp_path / "out", "does not exist")
