"""The fixtures copied into the repository are the shared ones, unchanged (tests/fixtures/README.md)."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONFORMANCE, FIXTURES

LOCAL = CONFORMANCE.parent
NOT_COPIES = {"README.md", "SHA256SUMS"}  # this folder's own
MADE_HERE = "transformers_gguf"  # made by its own script in this repository, not a copy


def listed() -> dict[str, str]:
    lines = (LOCAL / "SHA256SUMS").read_text().splitlines()
    return {name: digest for digest, name in (line.split(maxsplit=1) for line in lines)}


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_copied_fixture_has_its_listed_sha256():
    files = {str(p.relative_to(LOCAL)) for p in LOCAL.rglob("*")
             if p.is_file() and p.name not in NOT_COPIES and p.relative_to(LOCAL).parts[0] != MADE_HERE}
    files |= {str(p.relative_to(LOCAL)) for p in LOCAL.glob("*/README.md")}  # the copies' own READMEs count
    assert files == set(listed())
    assert {name: sha256(LOCAL / name) for name in files} == listed()


def test_copies_equal_the_shared_fixtures_where_they_are_checked_out():
    if not FIXTURES.is_dir():
        pytest.skip("../shared/fixtures is not beside this clone")
    assert {name: sha256(FIXTURES / name) for name in listed() if (FIXTURES / name).exists()} == listed()


LISTED = "test_portable_kernels_compute_the_same_bits_as_the_cpus_dot_products"
PROBE = f"""import pytest
def {LISTED}():
    pytest.skip("on CI_MAY_SKIP")
def test_probe():
    pytest.skip("a missing fixture, say")
"""


def run_ci_probe(tmp_path, name: str, ci: str) -> subprocess.CompletedProcess:
    tests = tmp_path / "tests"
    tests.mkdir(exist_ok=True)
    shutil.copy(Path(__file__).parent / "conftest.py", tests / "conftest.py")
    (tests / "test_runtime.py").write_text(PROBE)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           f"tests/test_runtime.py::{name}"],
                          cwd=tmp_path, capture_output=True, text=True, env=dict(os.environ, CI=ci))


def test_in_ci_a_skip_fails_the_run_unless_it_is_on_the_list(tmp_path):
    listed = run_ci_probe(tmp_path, LISTED, "true")
    assert listed.returncode == 0, listed.stdout
    unlisted = run_ci_probe(tmp_path, "test_probe", "true")
    assert unlisted.returncode == 1 and "tests/test_runtime.py::test_probe" in unlisted.stdout
    assert "not on CI_MAY_SKIP" in unlisted.stdout
    assert run_ci_probe(tmp_path, "test_probe", "").returncode == 0  # outside CI a skip is a skip
