"""Shared test fixtures: paths into ../shared/fixtures, skipping with a reason when absent."""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT.parent / "shared" / "fixtures"
CONFORMANCE = FIXTURES / "conformance"
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
