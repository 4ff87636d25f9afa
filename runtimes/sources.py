"""What of an author's function directory is source, what goes into a bundle, and its date.

Two rules every builder shares (docs/bundle-format.md, "What goes into a bundle"):

- **What is left out.** A bundle carries what the function needs at run time, nothing else:
  never VCS data, built bundles or our scratch dirs (`NEVER_COPIED`); not the function's own
  tests (`FUNCTION_TESTS`); not the test and benchmark folders npm packages publish
  (`PACKAGE_CLUTTER`, pruned inside `node_modules/<package>/` only: a *package* named `test`
  is kept).
- **When it was built.** `created_at` in the signed manifest is the same for the same sources,
  so the same source and key give the same bundle bytes (publishing them again is a no-op):
  `SOURCE_DATE_EPOCH` when set (reproducible-builds.org), else the newest mtime among the
  sources. Never the clock.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import stat
import time
from collections.abc import Callable, Iterable
from pathlib import Path

# Never part of a function's sources or payload, at any depth. node_modules is rebuilt by npm
# from package.json (with --omit=dev), never copied from the author's machine.
NEVER_COPIED: tuple[str, ...] = (".git", ".hg", ".svn", "node_modules", "*.efb", ".edgefn-*")
# The function's own tests: `edge-cloud fn test` runs them; devices never do.
FUNCTION_TESTS: tuple[str, ...] = (
    "test",
    "tests",
    "__tests__",
    "*.test.js",
    "*.test.mjs",
    "*.test.cjs",
    "*.spec.js",
    "*.spec.mjs",
    "*.spec.cjs",
    "*_test.go",
)
# Folders npm packages often publish although nothing requires them at run time.
PACKAGE_CLUTTER: tuple[str, ...] = (
    "test",
    "tests",
    "__tests__",
    "benchmark",
    "benchmarks",
    ".github",
)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def payload_ignore(*, drop_tests: bool) -> Callable[[str, list[str]], set[str]]:
    """A `shutil.copytree` ignore function applying NEVER_COPIED (and FUNCTION_TESTS)."""
    patterns = NEVER_COPIED + (FUNCTION_TESTS if drop_tests else ())

    def ignore(_dir: str, names: list[str]) -> set[str]:
        return {n for n in names if _matches(n, patterns)}

    return ignore


def copy_function(src: Path, dest: Path, *, drop_tests: bool) -> None:
    """Copy the function's files (symlinks as links: the bundle packer refuses them)."""
    shutil.copytree(src, dest, ignore=payload_ignore(drop_tests=drop_tests), symlinks=True)


def prune_packages(node_modules: Path) -> list[Path]:
    """Delete PACKAGE_CLUTTER folders inside installed packages; returns what was removed."""
    removed: list[Path] = []
    if not node_modules.is_dir():
        return removed
    for package in _packages(node_modules):
        for child in sorted(package.iterdir()):
            if child.is_dir() and not child.is_symlink() and _matches(child.name, PACKAGE_CLUTTER):
                shutil.rmtree(child)
                removed.append(child)
        nested = package / "node_modules"
        if nested.is_dir():
            removed += prune_packages(nested)
    return removed


def _packages(node_modules: Path) -> list[Path]:
    """node_modules/<name> and node_modules/@scope/<name> (npm's two layouts)."""
    out: list[Path] = []
    for entry in sorted(node_modules.iterdir()):
        if entry.name.startswith(".") or not entry.is_dir() or entry.is_symlink():
            continue
        if entry.name.startswith("@"):
            out += [p for p in sorted(entry.iterdir()) if p.is_dir() and not p.is_symlink()]
        else:
            out.append(entry)
    return out


def source_epoch(src: Path, *, exclude: Iterable[str] = ()) -> int:
    """SOURCE_DATE_EPOCH, else the newest mtime (whole seconds) of the sources under `src`.

    `exclude` names top-level build outputs to disregard (a Go/C++ entry built in place would
    otherwise date the sources by the last build).
    """
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if epoch.isdigit():
        return int(epoch)
    skip = set(exclude)
    newest = 0
    for root, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if not _matches(d, NEVER_COPIED))
        top = Path(root) == src
        for name in files:
            if _matches(name, NEVER_COPIED) or (top and name in skip):
                continue
            st = os.lstat(os.path.join(root, name))
            if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
                newest = max(newest, int(st.st_mtime))
    return newest


def rfc3339(epoch: int) -> str:
    """The manifest's `created_at` form: 2026-11-27T12:00:00Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
