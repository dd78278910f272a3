"""The readers against corrupted real files (issue 28; tests/fuzz_inputs.py says how): over 500
generated cases, no traceback, hang, allocation past 1 GiB or broken file accepted, and every
refusal one `error:` line naming the file. docs/ROBUSTNESS.md has a run's numbers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import fuzz_inputs as fz
import pytest

from dllama.cli.edge import fail

ROOT = Path(__file__).resolve().parent.parent


def test_every_reader_refuses_corrupted_files_with_one_line(tmp_path, smollm2_gguf):
    out = tmp_path / "fuzz.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "fuzz_inputs.py"), "--jobs", "2", "--json", str(out),
                           "--smollm2", str(smollm2_gguf)], env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=1800)
    report = json.loads(out.read_text())
    assert report["bad"] == [], proc.stdout[-3000:]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert report["cases"] >= 500
    assert set(report["cases_by_base"]) == set(fz.QUOTAS)  # every format, SmolLM2's header included
    assert report["must_refuse_cases"] >= 250
    for reader, outcomes in report["by_reader"].items():  # each reader refused something, cleanly
        assert outcomes.get("error", 0) + outcomes.get("check", 0) > 0, reader


# --------------------------------------------------------------------------------------------
# The harness itself sees every kind of failure (a suite that cannot fail would prove nothing)

def _raise(inputs, out):
    raise ValueError("a bug")


def _allocate(inputs, out):
    return bytearray(2 << 30)


def _spin(inputs, out):
    while True:
        pass


def _accept(inputs, out):
    return None


def _refuse_naming(inputs, out):
    fail(f"{inputs['mutated']} is broken")


def _refuse_vaguely(inputs, out):
    fail("something is broken")


@pytest.mark.parametrize("reader, outcome", [
    (_raise, "traceback"), (_allocate, "over-memory"), (_spin, "hang"), (_accept, "accepted-bad"),
    (_refuse_naming, "error"), (_refuse_vaguely, "unclear"),
])
def test_the_harness_classifies_each_outcome(tmp_path, monkeypatch, reader, outcome):
    monkeypatch.setitem(fz.FUNCTION_READERS, reader.__name__, reader)
    mutated = tmp_path / "case.m"
    mutated.write_bytes(b"x")
    case = fz.Case("m_llama_q40", "a test", (), must_refuse=True)
    [result] = fz.run_all([fz.Run(case, reader.__name__, {"mutated": mutated}, mutated, tmp_path / "out")], jobs=1,
                          deadline_s=3.0, scratch=tmp_path)
    assert result.outcome == outcome, result
