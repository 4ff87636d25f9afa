"""Which functions are installed in a data dir: the one place that knows the on-disk layout.

Two layouts live side by side under `DATA_DIR/functions/<name>/`:

* **installed** (from signed bundles): `<version>/` directories plus an `active` file naming the
  active version. The installer writes `active` atomically (temp + fsync + rename), so a reader
  sees either the old or the new version, never a mix; older version dirs stay for rollback.
* **development**: an `edgefn.toml` directly in `<name>/` next to the built artifact. Refused when
  the device requires signed functions.

`scan()` is cheap (a few stats and small reads per function) and is called on an interval by the
agent, which reloads whatever changed; a broken function is reported, the others load.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from runtimes.errors import ManifestError
from runtimes.manifest import MANIFEST_NAME, NAME_RE, SEMVER_RE, Manifest, load_manifest

ACTIVE_FILE = "active"


@dataclass(frozen=True, slots=True)
class FunctionSource:
    manifest: Manifest
    directory: Path
    signed: bool
    # Changes whenever anything the running executor depends on changes on disk.
    fingerprint: tuple[object, ...]


@dataclass(frozen=True, slots=True)
class LoadProblem:
    name: str
    path: Path
    message: str


def _stat_key(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except OSError:
        return (0, 0)
    return (st.st_mtime_ns, st.st_size)


def read_active(function_root: Path, *, damaged_as_none: bool = False) -> str | None:
    """The active version named by `<root>/active`, None when there is none.

    Raises ManifestError when the pointer is damaged (bytes that are not a version, a path):
    the function is then reported as not loadable with that reason, the others load, and
    `fn install` of any version writes a good pointer again. Never followed as a path.
    `damaged_as_none`: for the installer and listings, which treat a damaged pointer as none
    (an install then writes a good one).
    """
    path = function_root / ACTIVE_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        if damaged_as_none:
            return None
        raise ManifestError(f"{path}: cannot read the active-version pointer: {exc}") from exc
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        text = None
    if text is None or (text and not SEMVER_RE.fullmatch(text)):
        if damaged_as_none:
            return None
        raise ManifestError(
            f"{path}: damaged active-version pointer ({len(raw)} bytes, not a version); "
            "reinstall a version to repair it"
        )
    return text or None


def _load_one(root: Path, require_signed: bool) -> FunctionSource:
    dev_manifest = root / MANIFEST_NAME
    active = read_active(root)
    if active is not None:
        directory = root / active
        path = directory / MANIFEST_NAME
        signed = True
    elif dev_manifest.is_file():
        if require_signed:
            raise ManifestError(
                f"{dev_manifest}: unsigned development function refused "
                "(this device sets require_signed = true; install a signed bundle instead)"
            )
        directory, path, signed = root, dev_manifest, False
    else:
        raise ManifestError(f"{root}: no {MANIFEST_NAME} and no active version")
    manifest = load_manifest(path)
    if manifest.name != root.name:
        raise ManifestError(
            f"{path}: field 'name' is {manifest.name!r} but the directory is {root.name!r}"
        )
    if active is not None and manifest.version != active:
        raise ManifestError(f"{path}: version {manifest.version} differs from active {active}")
    entry = directory / manifest.entry
    fingerprint = (active, _stat_key(path), _stat_key(entry), _stat_key(Path(str(entry) + ".so")))
    return FunctionSource(manifest, directory, signed, fingerprint)


def scan(
    functions_dir: Path, *, require_signed: bool
) -> tuple[list[FunctionSource], list[LoadProblem]]:
    """Every function under `functions_dir`, and a problem for each one that cannot load."""
    found: list[FunctionSource] = []
    problems: list[LoadProblem] = []
    try:
        entries = sorted(os.scandir(functions_dir), key=lambda e: e.name)
    except FileNotFoundError:
        return found, problems
    for entry in entries:
        if not entry.is_dir(follow_symlinks=False) or entry.name.startswith("."):
            continue
        root = Path(entry.path)
        if not NAME_RE.match(entry.name):
            problems.append(LoadProblem(entry.name, root, f"{root}: not a valid function name"))
            continue
        try:
            found.append(_load_one(root, require_signed))
        except ManifestError as exc:
            problems.append(LoadProblem(entry.name, root, exc.message))
    return found, problems
