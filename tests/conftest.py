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
# SmolLM2-135M-Instruct, a real trained model (../shared/fixtures/smollm2/README.md). Its GGUF is
# fetched into the cache by `python -m dllama.samples` (the README's test command and .ci/run do
# it); tests never download. In CI a missing file fails instead of skipping.

SMOLLM2 = CONFORMANCE.parent / "smollm2"  # copied from FIXTURES (Apache-2.0, tests/fixtures/README.md)
SMOLLM2_QUANTS = ("f32", "q80", "q40")


def _missing(reason: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI must provide it)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from dllama.samples import cached

    path = cached()
    if path is None:
        _missing("SmolLM2's GGUF is not in the cache: run `python -m dllama.samples` once")
    return path


@pytest.fixture(scope="session")
def smollm2_fixture_dir() -> Path:
    if not SMOLLM2.is_dir():
        _missing(f"{SMOLLM2} is absent: the shared fixtures are not checked out beside this clone")
    return SMOLLM2


@pytest.fixture(scope="session")
def smollm2_files(smollm2_gguf, tmp_path_factory) -> dict[str, Path]:
    """SmolLM2 converted from its GGUF once per session: "f32", "q80", "q40" -> .m, "tokenizer" -> .t. The
    q40 is the reference converter's encoding (--exact): the error-aware one is smollm2_q40_error_aware."""
    from dllama.converter.convert import convert

    out = tmp_path_factory.mktemp("smollm2")
    files: dict[str, Path] = {}
    for quant in SMOLLM2_QUANTS:
        result = convert(smollm2_gguf, quant, out, name="smollm2", exact=True)
        files[quant] = result.plan.model_path
        files["tokenizer"] = result.plan.tokenizer_path
    return files


@pytest.fixture(scope="session")
def smollm2_q40_error_aware(smollm2_gguf, tmp_path_factory) -> Path:
    """SmolLM2's q40 from its GGUF with the default, error-aware encoder (its .t is smollm2_files'), once."""
    from dllama.converter.convert import convert

    return convert(smollm2_gguf, "q40", tmp_path_factory.mktemp("smollm2_aware"), name="smollm2",
                   with_tokenizer=False).plan.model_path


@pytest.fixture(scope="session")
def smollm2_expected(smollm2_fixture_dir) -> dict:
    """transformers' greedy continuations on SmolLM2's float32 weights."""
    import json

    return json.loads((smollm2_fixture_dir / "expected_greedy.json").read_text())


@pytest.fixture(scope="session")
def reference_dllama() -> Path:
    """The reference C++ runtime built from ../shared/reference (cached per machine)."""
    from reference_runtime import build_reference, tarball

    if tarball() is None:
        _missing("../shared/reference is absent: the reference runtime's source is not beside this clone")
    return build_reference()


# --------------------------------------------------------------------------------------------
# CI's skip policy: a skip hides a test that did not run, so in CI (CI=true) it fails the run
# unless the test is here, with the reason it may skip (documented in tests/fixtures/README.md).

CI_MAY_SKIP = {
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
