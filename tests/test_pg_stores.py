"""Registry metadata (`LocalStore`'s versions) and operator accounts on both backends, through
the store classes the platform uses (the blob side of LocalStore is the filesystem either way)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from cloud_sync.platform.operators import OperatorAccountError, OperatorAccounts
from cloud_sync.platform.store import FunctionSummary, LocalStore, VersionConflict, VersionRecord
from tests.platform_backends import Backend


def _record(version: str, digest: str = "a" * 64) -> VersionRecord:
    return VersionRecord("resize", version, digest, 1234, "node", ("x86_64", "aarch64"),
                         "key-1", "2026-12-01T00:00:00Z", "")  # fmt: skip


def _store(backend: Backend, tmp_path: Path) -> LocalStore:
    engine = backend.engine("registry.db")
    return LocalStore(tmp_path / "registry.db", tmp_path / "blobs", engine=engine)


def test_versions_are_immutable_listed_by_semver_and_survive_reopening(
    backend: Backend, tmp_path: Path
) -> None:
    store = _store(backend, tmp_path)
    assert store.add_version(_record("1.10.0"))
    assert store.add_version(_record("1.2.0", "b" * 64))
    assert not store.add_version(_record("1.10.0"))  # the same bytes again: not new, no error
    with pytest.raises(VersionConflict):
        store.add_version(_record("1.10.0", "c" * 64))
    store.close()
    again = _store(backend, tmp_path)
    try:
        got = again.get_version("resize", "1.10.0")
        assert got is not None and got.arches == ("x86_64", "aarch64") and got.published_at
        assert dataclasses.replace(got, published_at="") == _record("1.10.0")
        assert [r.version for r in again.list_versions("resize")] == ["1.2.0", "1.10.0"]
        assert again.list_functions() == [FunctionSummary("resize", "1.10.0", 2)]
        assert again.get_version("resize", "9.9.9") is None
    finally:
        again.close()


def test_operator_accounts_on_both_backends(backend: Backend) -> None:
    accounts = OperatorAccounts(backend.engine("registry.db"))
    try:
        accounts.create("alice", "correct horse battery")
        with pytest.raises(OperatorAccountError, match="exists"):
            accounts.create("alice", "another long password")
        assert accounts.names() == ["alice"]
        assert accounts.verify("alice", "correct horse battery")
        assert not accounts.verify("alice", "wrong password!!")
        assert not accounts.verify("nobody", "correct horse battery")
    finally:
        accounts.close()
