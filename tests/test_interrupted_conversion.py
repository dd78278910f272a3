"""Interrupted conversions leave nothing behind (issue 28): SIGTERM and SIGHUP clean up as Ctrl-C
does, a SIGKILLed run's temp file is removed by the next run into the folder, a live run's is not,
and the data reaches the disk before the rename."""
from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CONFORMANCE

from dllama.converter.synthetic import tiny_config, write_checkpoint
from dllama.formats import atomic_output
from dllama.formats.atomic import remove_stale_partials

ROOT = Path(__file__).resolve().parent.parent
NAME = "interrupted"
MODEL = f"dllama_model_{NAME}_f32.m"


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory) -> Path:
    """~60 MB of bf16 weights: its f32 conversion streams for long enough to be interrupted midway."""
    config = tiny_config("llama", hidden_size=1024, intermediate_size=2816, num_hidden_layers=2,
                         num_attention_heads=16, num_key_value_heads=4)
    return write_checkpoint(tmp_path_factory.mktemp("big"), config, tokenizer=CONFORMANCE / "tiny-llama")


def start_conversion(source: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "dllama.cli.dllama_convert", "hf", str(source), "-q", "f32",
                             "--name", NAME, "-o", str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for_model_partial(proc: subprocess.Popen, out: Path, deadline_s: float = 120.0) -> Path:
    """The model's temp file once it holds data: the conversion is midway."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        partials = [p for p in out.glob(f".{MODEL}.*.partial") if p.stat().st_size > 0]
        if partials:
            return partials[0]
        assert proc.poll() is None, f"the conversion ended before it was interrupted: {proc.communicate()}"
        time.sleep(0.01)  # polling a file the child writes, bounded by the deadline
    proc.kill()
    raise AssertionError("no model .partial appeared")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_termination_midway_leaves_no_file(tmp_path, big_checkpoint, signum):
    proc = start_conversion(big_checkpoint, tmp_path)
    wait_for_model_partial(proc, tmp_path)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert stderr.strip().splitlines()[-1] == "error: interrupted; no output was written"
    assert list(tmp_path.iterdir()) == []


def test_a_killed_runs_partial_is_removed_by_the_next_run(tmp_path, big_checkpoint):
    proc = start_conversion(big_checkpoint, tmp_path)
    stale = wait_for_model_partial(proc, tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert stale.exists()  # SIGKILL cannot be handled: the next run must clean up
    rerun = start_conversion(CONFORMANCE / "tiny-llama", tmp_path)
    _, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [MODEL, f"dllama_tokenizer_{NAME}.t"]


def test_a_live_writers_partial_survives_another_run(tmp_path):
    target = tmp_path / "model.m"
    live = tmp_path / ".model.m.abcd1234.partial"
    dead = tmp_path / ".model.m.dead5678.partial"
    other = tmp_path / ".other.m.dead5678.partial"
    for p in (live, dead, other):
        p.write_bytes(b"half")
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a running conversion holds its own
    try:
        with atomic_output(target) as f:
            f.write(b"whole")
        assert target.read_bytes() == b"whole"
        assert live.exists() and other.exists() and not dead.exists()
    finally:
        os.close(fd)
    assert remove_stale_partials(target) == [live]  # its writer gone, the next write removes it


def test_data_is_synced_before_the_rename(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b))[1])
    with atomic_output(tmp_path / "x.m") as f:
        f.write(b"data")
    assert calls == ["fsync", "replace"]
