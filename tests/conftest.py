"""Shared test fixtures: tests/fixtures first (in the repository), ../shared/fixtures for what cannot be.

With CI=true a skipped test fails the run unless CI_MAY_SKIP names it (tests/fixtures/README.md)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT.parent / "shared" / "fixtures"  # what stays outside: the Llama 2 tokenizer (its licence)
CONFORMANCE = ROOT / "tests" / "fixtures" / "conformance"  # copied from FIXTURES, SHA256SUMS beside it
CHECKPOINTS = ("tiny-llama", "tiny-qwen3")


def require_fixtures(path: Path = FIXTURES) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent: the shared conformance fixtures are not checked out beside this clone")
    return path


@pytest.fixture(params=CHECKPOINTS)
def conformance_dir(request) -> Path:
    return require_fixtures(CONFORMANCE / request.param)


@pytest.fixture
def llama2_tokenizer_dir() -> Path:
    return require_fixtures(FIXTURES / "tokenizers" / "llama2")


# --------------------------------------------------------------------------------------------
# CI's skip policy: a skip hides a test that did not run, so in CI (CI=true) it fails the run
# unless the test is here, with the reason it may skip (documented in tests/fixtures/README.md).

CI_MAY_SKIP = {
    "tests/test_convert_cli.py::test_read_only_output_folder_is_refused": "root (as CI runs) can write into read-only folders",
    "tests/test_runtime.py::test_portable_kernels_compute_the_same_bits_as_the_cpus_dot_products":
        "the CPU has no dot-product instructions (x86 without AVX512-VNNI, Pi 3B+/4): only the portable path",
    "tests/test_compute.py::test_the_dot_product_path_gives_the_portable_paths_bits*":
        "the CPU has no dot-product instructions (x86 without AVX512-VNNI, Pi 3B+/4): only the portable path",
}
_skipped: list[str] = []


def _may_skip(nodeid: str) -> bool:
    from fnmatch import fnmatchcase

    return any(fnmatchcase(nodeid, pattern) for pattern in CI_MAY_SKIP)


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail") and not _may_skip(report.nodeid):
        _skipped.append(report.nodeid)


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("CI") == "true" and _skipped and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if os.environ.get("CI") == "true" and _skipped:
        terminalreporter.section("skipped in CI but not on CI_MAY_SKIP (tests/conftest.py): this run fails", red=True)
        for nodeid in _skipped:
            terminalreporter.line(nodeid)
