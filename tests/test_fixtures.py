"""The fixtures copied into the repository are the shared ones, unchanged (tests/fixtures/README.md)."""
from __future__ import annotations

import hashlib

import pytest
from conftest import CONFORMANCE, FIXTURES

LOCAL = CONFORMANCE.parent


def listed() -> dict[str, str]:
    lines = (LOCAL / "SHA256SUMS").read_text().splitlines()
    return {name: digest for digest, name in (line.split(maxsplit=1) for line in lines)}


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_copied_fixture_has_its_listed_sha256():
    files = {str(p.relative_to(LOCAL)) for p in CONFORMANCE.rglob("*") if p.is_file()}
    assert files == set(listed())
    assert {name: sha256(LOCAL / name) for name in files} == listed()


def test_copies_equal_the_shared_fixtures_where_they_are_checked_out():
    shared = FIXTURES / "SHA256SUMS"
    if not shared.exists():
        pytest.skip("../shared/fixtures is not beside this clone")
    shared_sums = {name: digest for digest, name in (line.split(maxsplit=1) for line in shared.read_text().splitlines())}
    assert {name: shared_sums.get(name) for name in listed()} == listed()
