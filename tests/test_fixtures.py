"""The fixtures copied into the repository are the shared ones, unchanged (tests/fixtures/README.md)."""
from __future__ import annotations

import hashlib

import pytest
from conftest import CONFORMANCE, FIXTURES

LOCAL = CONFORMANCE.parent
NOT_COPIES = {"README.md", "SHA256SUMS"}  # this folder's own


def listed() -> dict[str, str]:
    lines = (LOCAL / "SHA256SUMS").read_text().splitlines()
    return {name: digest for digest, name in (line.split(maxsplit=1) for line in lines)}


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_copied_fixture_has_its_listed_sha256():
    files = {str(p.relative_to(LOCAL)) for p in LOCAL.rglob("*") if p.is_file() and p.name not in NOT_COPIES}
    files |= {str(p.relative_to(LOCAL)) for p in LOCAL.glob("*/README.md")}  # the copies' own READMEs count
    assert files == set(listed())
    assert {name: sha256(LOCAL / name) for name in files} == listed()


def test_copies_equal_the_shared_fixtures_where_they_are_checked_out():
    if not FIXTURES.is_dir():
        pytest.skip("../shared/fixtures is not beside this clone")
    assert {name: sha256(FIXTURES / name) for name in listed() if (FIXTURES / name).exists()} == listed()
