"""`runtimes.sources`: what of a function directory goes into a bundle, and the sources' date."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from runtimes.sources import copy_function, prune_packages, rfc3339, source_epoch


def _tree(root: Path, files: list[str], mtime: int = 1_700_000_000) -> None:
    for rel in files:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(rel)
        os.utime(path, (mtime, mtime))


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_prune_removes_package_test_folders_but_keeps_a_package_named_test(tmp_path: Path) -> None:
    nm = tmp_path / "node_modules"
    _tree(
        nm,
        [
            "a/index.js",
            "a/test/a.test.js",
            "a/benchmark/run.js",
            "a/lib/test.js",
            "@scope/b/index.js",
            "@scope/b/__tests__/b.js",
            "@scope/b/.github/workflow.yml",
            "a/node_modules/c/index.js",
            "a/node_modules/c/tests/c.js",
            "test/index.js",  # the npm package called "test"
            ".package-lock.json",
        ],
    )
    removed = prune_packages(nm)
    assert len(removed) == 5
    assert _files(nm) == {
        "a/index.js",
        "a/lib/test.js",
        "@scope/b/index.js",
        "a/node_modules/c/index.js",
        "test/index.js",
        ".package-lock.json",
    }


def test_copy_leaves_out_the_functions_tests_and_never_copied_files(tmp_path: Path) -> None:
    src = tmp_path / "fn"
    _tree(
        src,
        [
            "edgefn.toml",
            "handler.js",
            "lib/util.js",
            "lib/util.spec.js",
            "handler.test.js",
            "test/more.js",
            "node_modules/x/index.js",
            ".git/HEAD",
            "old.efb",
        ],
    )
    copy_function(src, tmp_path / "payload", drop_tests=True)
    assert _files(tmp_path / "payload") == {"edgefn.toml", "handler.js", "lib/util.js"}
    copy_function(src, tmp_path / "for-tests", drop_tests=False)
    assert _files(tmp_path / "for-tests") == {
        "edgefn.toml",
        "handler.js",
        "lib/util.js",
        "lib/util.spec.js",
        "handler.test.js",
        "test/more.js",
    }


def test_source_epoch_is_the_newest_source_not_build_outputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    src = tmp_path / "fn"
    _tree(src, ["edgefn.toml", "main.go", "sub/data.json"], mtime=1_700_000_000)
    _tree(src, ["sub/newer.txt"], mtime=1_700_000_500)
    _tree(src, ["route", "route.so", "x.efb", ".git/index", "node_modules/m/i.js"], 1_800_000_000)
    assert source_epoch(src, exclude=("route", "route.so")) == 1_700_000_500
    assert source_epoch(src) == 1_800_000_000  # the entry counts when not excluded
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1767225600")
    assert source_epoch(src) == 1767225600
    assert rfc3339(1767225600) == "2026-01-01T00:00:00Z"
