"""A signed function's directory on disk: its versions, their metadata, and which one is active.

```
functions/<name>/
  active                  the active version, one line (replaced atomically)
  <version>/              a complete unpacked version (edgefn.toml from the signed manifest)
  .versions/<version>.json  digest, arch, signers, installed_at, activated_at
  .staging-*, .trash-*    leftovers of an interrupted install: ignored, removed by the next one
```

Pure file-layout code shared by the installer (`edge_agent.install`) and `edge-agent fn list`;
the agent itself reads only `active` (`edge_agent.store`).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.store import read_active
from runtimes.fsio import atomic_write, fsync_dir
from runtimes.manifest import MANIFEST_NAME, SEMVER_RE, semver_key
from runtimes.unpack import remove_stale_staging

META_DIR = ".versions"
# Versions kept besides the active one, so `rollback` has somewhere to go (and one more step).
KEEP_PREVIOUS = 2
# What a bundle without per-architecture artifacts (Node: plain JavaScript) is recorded as.
ARCH_ANY = "any"

__all__ = [
    "ARCH_ANY",
    "KEEP_PREVIOUS",
    "META_DIR",
    "InstalledFunction",
    "InstalledVersion",
    "cleanup_leftovers",
    "list_installed",
    "prune",
    "read_active",
    "read_meta",
    "remove_tree",
    "unpacked_copy",
    "version_dirs",
    "write_meta",
]


@dataclass(frozen=True, slots=True)
class InstalledVersion:
    version: str
    active: bool
    digest: str
    arch: str
    installed_at: str
    activated_at: str


@dataclass(frozen=True, slots=True)
class InstalledFunction:
    name: str
    active: str | None
    versions: tuple[InstalledVersion, ...]
    development: bool  # an unsigned edgefn.toml directly in functions/<name>/


def _meta_path(root: Path, version: str) -> Path:
    return root / META_DIR / f"{version}.json"


def read_meta(root: Path, version: str) -> dict[str, Any]:
    try:
        data = json.loads(_meta_path(root, version).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_meta(root: Path, version: str, meta: dict[str, Any]) -> None:
    (root / META_DIR).mkdir(exist_ok=True)
    atomic_write(_meta_path(root, version), json.dumps(meta, sort_keys=True).encode())


def version_dirs(root: Path) -> list[str]:
    """Complete-looking version directories, oldest version first."""
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return []
    return sorted(
        (e.name for e in entries if e.is_dir(follow_symlinks=False) and SEMVER_RE.match(e.name)),
        key=semver_key,
    )


def unpacked_copy(root: Path, version: str, digest: str) -> dict[str, Any] | None:
    """The metadata of `version` when it is unpacked here from the bundle with `digest`.

    Such a copy was verified when it was first installed, and nothing but the installer
    writes under `functions/`: installing it again needs no download and no unpack.
    """
    meta = read_meta(root, version)
    if meta.get("digest") == digest and (root / version / MANIFEST_NAME).is_file():
        return meta
    return None


def remove_tree(path: Path) -> None:
    """Rename aside, then delete: a half-deleted tree never keeps a meaningful name."""
    if not os.path.lexists(path):
        return
    trash = path.with_name(f".trash-{secrets.token_hex(4)}")
    os.rename(path, trash)
    fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def cleanup_leftovers(functions_dir: Path, name: str) -> None:
    """Remove what interrupted installs of `name` left (call with the function's lock held)."""
    root = functions_dir / name
    for leftover in functions_dir.glob(f".staging.{name}.*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if not root.is_dir():
        return
    remove_stale_staging(root)
    for pattern in (".staging-*", ".trash-*"):
        for leftover in root.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)
    for tmp in [*root.glob(".*.tmp"), *(root / META_DIR).glob(".*.tmp")]:
        tmp.unlink(missing_ok=True)


def prune(root: Path, active: str) -> list[str]:
    """Keep `active` and the KEEP_PREVIOUS most recently active other versions."""
    others = [v for v in version_dirs(root) if v != active]
    others.sort(
        key=lambda v: (str(read_meta(root, v).get("activated_at", "")), semver_key(v)),
        reverse=True,
    )
    removed = []
    for version in others[KEEP_PREVIOUS:]:
        remove_tree(root / version)
        _meta_path(root, version).unlink(missing_ok=True)
        removed.append(version)
    return removed


def list_installed(data_dir: Path) -> list[InstalledFunction]:
    """What is installed under DATA_DIR/functions, signed versions and development copies."""
    functions = Path(data_dir) / "functions"
    out = []
    try:
        entries = sorted(os.scandir(functions), key=lambda e: e.name)
    except FileNotFoundError:
        return []
    for entry in entries:
        if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
            continue
        root = Path(entry.path)
        active = read_active(root, damaged_as_none=True)
        versions = []
        for v in reversed(version_dirs(root)):
            meta = read_meta(root, v)
            versions.append(
                InstalledVersion(
                    version=v,
                    active=v == active,
                    digest=str(meta.get("digest", "")),
                    arch=str(meta.get("arch", "")),
                    installed_at=str(meta.get("installed_at", "")),
                    activated_at=str(meta.get("activated_at", "")),
                )
            )
        out.append(
            InstalledFunction(
                name=entry.name,
                active=active,
                versions=tuple(versions),
                development=active is None and (root / MANIFEST_NAME).is_file(),
            )
        )
    return out
