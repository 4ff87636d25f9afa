"""Installing signed bundles into the data dir, switching versions, and rolling back.

The install path, in order (each step named as the `EDGEFN_INSTALL_PAUSE_AT` test hook knows it):

1. **download**: from the registry into `DATA_DIR/staging/<name>@<digest>.part`, resuming a part
   an interrupted attempt left, never more than the size cap, and the file's sha256 checked
   against the registry's digest (`cloud_sync.registry_client`). A local bundle file is copied
   into staging with the same cap, so what is verified cannot change underneath us.
2. **verify**: signature against the keys in `DATA_DIR/trust/` and every payload digest
   (`runtimes.verify`), the name/version asked for, an artifact for this device's arch
   (`hardware.profile`), and the version order: only forward, unless `force_downgrade` or a
   rollback says otherwise (the same version with the same digest is "already installed").
   Nothing has been unpacked or parsed beyond the signed manifest yet.
3. **unpack**: with `runtimes.unpack`'s checks into `functions/<name>/.staging-<version>-<rand>/`.
4. **warm**: start the function once from the staging dir (one worker, or the in-process
   library) and stop it: a version that cannot start is never switched to.
5. **switch**: record the version's metadata in `functions/<name>/.versions/<version>.json`,
   rename the staging dir to `<version>/`, then replace `active` atomically (temp + fsync +
   rename + dir fsync). A running agent notices `active` changed, warms its own pool of the new
   version and swaps it in; requests never see a half-installed version.
6. **prune**: keep the active version and the `KEEP_PREVIOUS` most recently active others (for
   rollback); remove older ones (renamed to `.trash-*` first, so a half-deleted directory is
   never mistaken for a version).

Crash safety: every step before the rename of `active` only creates dot-named entries the agent
ignores (`.staging-*`, `.trash-*`, temp files) or a complete `<version>/` that is not active.
`kill -9` at any point leaves exactly the old version active (or the new one once the rename
happened); the next install or rollback of that function removes the leftovers. A function's
first install builds its whole directory as `functions/.staging.<name>.<rand>/` and renames it
into place, so it appears complete or not at all.

Installs of one function are serialised by `fcntl.flock` on `DATA_DIR/staging/<name>.lock`.
Blocking code (file I/O, subprocesses, urllib): the CLI calls it directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from runtimes.bundle import DEFAULT_MAX_BUNDLE_BYTES, BundleManifest, check_version_order
from runtimes.errors import BundleError, RuntimeErrorBase
from runtimes.fsio import atomic_write, fsync_dir
from runtimes.manifest import MANIFEST_NAME, NAME_RE, SEMVER_RE, Manifest, load_manifest, semver_key
from runtimes.unpack import DEFAULT_LIMITS, UnpackLimits, remove_stale_staging
from runtimes.verify import VerifiedBundle

STAGING_DIR = "staging"
META_DIR = ".versions"
# Versions kept besides the active one, so `rollback` has somewhere to go (and one more step).
KEEP_PREVIOUS = 2
# A warm start that takes longer than this is a function that does not start.
WARM_TIMEOUT_S = 60.0
# How long a second install of the same function waits for the first one to finish.
LOCK_WAIT_S = 120.0
# Test hook (docs/registry.md): EDGEFN_INSTALL_PAUSE_AT=<step> makes the installer write a marker
# file (EDGEFN_INSTALL_PAUSE_MARKER, default DATA_DIR/staging/paused-at-<step>) and sleep there,
# so a test can kill -9 it at exactly that step.
PAUSE_ENV = "EDGEFN_INSTALL_PAUSE_AT"
PAUSE_MARKER_ENV = "EDGEFN_INSTALL_PAUSE_MARKER"
PAUSE_S = 300.0
STEPS = ("download", "verify", "unpack", "warm", "switch", "prune")

Outcome = Literal["installed", "already_installed", "rolled_back"]
Say = Callable[[str], None]


class InstallError(RuntimeErrorBase):
    """An install or rollback was refused or failed; `code` says why, nothing was changed."""

    code = "install_failed"
    status = 422


@dataclass(frozen=True, slots=True)
class InstallOptions:
    data_dir: Path
    max_bundle_bytes: int = DEFAULT_MAX_BUNDLE_BYTES
    limits: UnpackLimits = DEFAULT_LIMITS
    force_downgrade: bool = False
    warm_timeout_s: float = WARM_TIMEOUT_S
    say: Say | None = None  # progress lines for a human

    @property
    def functions_dir(self) -> Path:
        return self.data_dir / "functions"

    @property
    def staging_dir(self) -> Path:
        return self.data_dir / STAGING_DIR

    def tell(self, line: str) -> None:
        if self.say is not None:
            self.say(line)


@dataclass(frozen=True, slots=True)
class InstallResult:
    name: str
    version: str
    previous: str | None
    arch: str
    digest: str
    outcome: Outcome


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


# ---------------------------------------------------------------------------------------------
# Small pieces


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def pause_point(step: str, data_dir: Path) -> None:
    """Test hook: stop here (marker file, then sleep) when EDGEFN_INSTALL_PAUSE_AT names `step`."""
    if os.environ.get(PAUSE_ENV) != step:
        return
    marker = os.environ.get(PAUSE_MARKER_ENV) or str(data_dir / STAGING_DIR / f"paused-at-{step}")
    Path(marker).write_text(str(os.getpid()))
    time.sleep(PAUSE_S)


def _remove_tree(path: Path) -> None:
    """Rename aside, then delete: a half-deleted tree never keeps a meaningful name."""
    if not os.path.lexists(path):
        return
    trash = path.with_name(f".trash-{secrets.token_hex(4)}")
    os.rename(path, trash)
    fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def function_lock(opts: InstallOptions, name: str) -> Iterator[None]:
    """Exclusive per-function lock; a second installer waits up to LOCK_WAIT_S."""
    opts.staging_dir.mkdir(parents=True, exist_ok=True)
    path = opts.staging_dir / f"{name}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + LOCK_WAIT_S
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            if time.monotonic() > deadline:
                raise InstallError(
                    f"another install or rollback of {name} is still running "
                    f"(lock {path} held for over {LOCK_WAIT_S:g} s)",
                    code="locked",
                )
            if not told:
                opts.tell(f"waiting for another install of {name} to finish")
                told = True
            time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # releases the flock


def _meta_path(root: Path, version: str) -> Path:
    return root / META_DIR / f"{version}.json"


def read_meta(root: Path, version: str) -> dict[str, Any]:
    try:
        data = json.loads(_meta_path(root, version).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_meta(root: Path, version: str, meta: dict[str, Any]) -> None:
    (root / META_DIR).mkdir(exist_ok=True)
    atomic_write(_meta_path(root, version), json.dumps(meta, sort_keys=True).encode())


def read_active(root: Path) -> str | None:
    from edge_agent.store import read_active as store_read_active

    return store_read_active(root)


def _version_dirs(root: Path) -> list[str]:
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return []
    return sorted(
        (e.name for e in entries if e.is_dir(follow_symlinks=False) and SEMVER_RE.match(e.name)),
        key=semver_key,
    )


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _cleanup_leftovers(opts: InstallOptions, name: str) -> None:
    """Remove what interrupted installs of `name` left (call with the function's lock held)."""
    root = opts.functions_dir / name
    for leftover in opts.functions_dir.glob(f".staging.{name}.*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if not root.is_dir():
        return
    remove_stale_staging(root)
    for pattern in (".staging-*", ".trash-*"):
        for leftover in root.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)
    for tmp in [*root.glob(".*.tmp"), *(root / META_DIR).glob(".*.tmp")]:
        tmp.unlink(missing_ok=True)


def _device_arch_keys(data_dir: Path) -> tuple[str, ...]:
    from hardware.errors import HardwareError
    from hardware.profile import detect

    try:
        return detect(data_dir).artifact_keys
    except HardwareError as exc:
        raise InstallError(exc.message, code="wrong_arch") from exc


def _pick_arch(manifest: BundleManifest, keys: tuple[str, ...]) -> str:
    for key in keys:
        if manifest.supports(key):
            return key
    raise BundleError(
        f"{manifest.name} {manifest.version} has no artifact for this device "
        f"({', '.join(keys)}); the bundle has: {', '.join(manifest.arches) or 'none'}",
        code="wrong_arch",
    )


# ---------------------------------------------------------------------------------------------
# Warm check


@contextlib.contextmanager
def _worker_output_hidden() -> Iterator[None]:
    """Workers inherit stderr; their noise would bury the one-line reason a refusal prints
    (the reason already carries the worker's own first error line)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def warm_check(manifest: Manifest, directory: Path, timeout_s: float, data_dir: Path) -> None:
    """Start the function once from `directory` and stop it: proof that it loads and runs.

    One worker even when the manifest says min_instances = 0 (a lazy pool would prove nothing),
    started inside a `Sandbox` (parent-death signal and the manifest's rlimits), so a killed
    installer never leaves the worker behind.
    """
    from runtimes.launchers import make_executor
    from runtimes.sandbox import Sandbox

    probe = dataclasses.replace(manifest, pool=dataclasses.replace(manifest.pool, min_instances=1))

    async def run() -> None:
        sandbox = Sandbox()
        executor = make_executor(probe, directory, sandbox=sandbox)
        try:
            await asyncio.wait_for(executor.start(), timeout_s)
            if os.environ.get(PAUSE_ENV) == "warm":
                await asyncio.to_thread(pause_point, "warm", data_dir)
        finally:
            await executor.close(1.0)
            await sandbox.close()

    try:
        with _worker_output_hidden():
            asyncio.run(run())
    except RuntimeErrorBase as exc:
        raise InstallError(
            f"{manifest.name} {manifest.version} does not start: {exc.message}",
            code="warm_failed",
        ) from exc
    except TimeoutError as exc:
        raise InstallError(
            f"{manifest.name} {manifest.version} did not start within {timeout_s:g} s",
            code="warm_failed",
        ) from exc


# ---------------------------------------------------------------------------------------------
# Install


def _stage_local_file(src: Path, opts: InstallOptions) -> tuple[Path, str]:
    """Copy a bundle file into staging (size-capped) and hash it; returns (copy, sha256)."""
    try:
        fd = os.open(src, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise InstallError(f"cannot read {src}: {exc.strerror}", code="bad_request") from exc
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise InstallError(f"{src} is not a regular file", code="bad_request")
        if st.st_size > opts.max_bundle_bytes:
            raise BundleError(
                f"{src} is {st.st_size} bytes, over this device's limit of "
                f"{opts.max_bundle_bytes} bytes",
                code="too_large",
            )
        opts.staging_dir.mkdir(parents=True, exist_ok=True)
        dest = opts.staging_dir / f"file-{secrets.token_hex(6)}.efb"
        h = hashlib.sha256()
        copied = 0
        try:
            with open(dest, "xb") as out:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    copied += len(chunk)
                    if copied > opts.max_bundle_bytes:
                        raise BundleError(
                            f"{src} grew past this device's limit of {opts.max_bundle_bytes} "
                            "bytes while being read",
                            code="too_large",
                        )
                    h.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            pause_point("download", opts.data_dir)
        except BaseException:
            dest.unlink(missing_ok=True)
            raise
    return dest, h.hexdigest()


def install_file(src: Path, opts: InstallOptions) -> InstallResult:
    """Install the bundle file `src`."""
    from edge_agent.trust import load_verifier

    load_verifier(opts.data_dir)  # no trusted key: refuse before copying anything
    staged, digest = _stage_local_file(Path(src), opts)
    try:
        vb = _verify(staged, opts, expect_name=None, expect_version=None)
        with function_lock(opts, vb.name):
            return _install_verified(vb, digest, opts)
    finally:
        staged.unlink(missing_ok=True)


def install_from_registry(
    url: str, name: str, version: str | None, opts: InstallOptions
) -> InstallResult:
    """Install `name@version` (None: the latest) from the registry at `url`."""
    from cloud_sync.registry_client import RegistryClient
    from edge_agent.trust import load_verifier

    load_verifier(opts.data_dir)  # no trusted key: refuse before downloading anything
    client = RegistryClient(url)
    info = client.resolve(name, version)
    with function_lock(opts, name):
        root = opts.functions_dir / name
        _cleanup_leftovers(opts, name)
        done = _already_installed(root, info.version, info.digest)
        if done is not None:
            _remove_parts(opts, name)
            _prune(root, info.version)  # an earlier run may have died before pruning
            return done
        active = read_active(root)
        if active is not None and active != info.version:
            check_version_order(info.version, active, allow_rollback=opts.force_downgrade)
        opts.staging_dir.mkdir(parents=True, exist_ok=True)
        part = opts.staging_dir / f"{name}@{info.digest}.part"
        have = part.stat().st_size if part.exists() else 0
        if 0 < have < info.size:
            opts.tell(f"resuming download of {name}@{info.version} at byte {have} of {info.size}")
        else:
            opts.tell(f"downloading {name}@{info.version} ({info.size} bytes)")
        paused = False

        def progress(done_bytes: int, total: int) -> None:
            nonlocal paused
            if not paused:
                paused = True
                pause_point("download", opts.data_dir)

        # DownloadInterrupted keeps the part: the next attempt resumes it.
        client.download(info, part, max_bytes=opts.max_bundle_bytes, progress=progress)
        try:
            vb = _verify(part, opts, expect_name=name, expect_version=info.version)
            result = _install_verified(vb, info.digest, opts)
        except Exception:
            part.unlink(missing_ok=True)  # refused or failed after a complete download
            raise
        _remove_parts(opts, name)
        return result


def _remove_parts(opts: InstallOptions, name: str) -> None:
    """Downloads of `name` that can no longer be useful (call with its lock held)."""
    for part in opts.staging_dir.glob(f"{name}@*.part"):
        part.unlink(missing_ok=True)


def _already_installed(root: Path, version: str, digest: str) -> InstallResult | None:
    active = read_active(root)
    if active != version:
        return None
    meta = read_meta(root, version)
    if meta.get("digest") == digest:
        return InstallResult(
            root.name, version, None, str(meta.get("arch", "")), digest, "already_installed"
        )
    raise InstallError(
        f"{root.name} {version} is already installed with other contents (sha256 "
        f"{meta.get('digest', 'unknown')}, this bundle {digest}); publish a new version",
        code="version_conflict",
    )


def _verify(
    staged: Path, opts: InstallOptions, *, expect_name: str | None, expect_version: str | None
) -> VerifiedBundle:
    """Signature and digests against the device's trusted keys, before anything is unpacked."""
    from edge_agent.trust import load_verifier

    pause_point("verify", opts.data_dir)
    return load_verifier(opts.data_dir).verify(
        staged,
        max_bytes=opts.max_bundle_bytes,
        expect_name=expect_name,
        expect_version=expect_version,
    )


def _install_verified(vb: VerifiedBundle, digest: str, opts: InstallOptions) -> InstallResult:
    """Steps 2 (the rest) to 6 for a verified bundle; the function's lock is held."""
    manifest: BundleManifest = vb.manifest
    name, version = manifest.name, manifest.version
    arch = _pick_arch(manifest, _device_arch_keys(opts.data_dir))
    opts.functions_dir.mkdir(parents=True, exist_ok=True)
    _cleanup_leftovers(opts, name)
    root = opts.functions_dir / name
    if (root / MANIFEST_NAME).exists():
        raise InstallError(
            f"{root} holds an unsigned development copy of {name}; move it away before "
            "installing signed bundles of it",
            code="dev_function",
        )
    done = _already_installed(root, version, digest)
    if done is not None:
        return dataclasses.replace(done, arch=done.arch or arch)
    previous = read_active(root)
    check_version_order(version, previous, allow_rollback=opts.force_downgrade)
    _check_space(manifest, arch, opts)

    first = not root.exists()
    work = opts.functions_dir / f".staging.{name}.{secrets.token_hex(4)}" if first else root
    staging = work / f".staging-{version}-{secrets.token_hex(4)}"
    try:
        if first:
            work.mkdir(mode=0o755)
        existing = work / version
        if existing.is_dir():
            # Installed before (kept for rollback, or an install that died before its switch):
            # reuse it when it holds these very bytes, else replace it.
            if (
                read_meta(work, version).get("digest") == digest
                and (existing / MANIFEST_NAME).is_file()
            ):
                opts.tell(f"{name} {version} is already unpacked; switching to it")
                os.rename(existing, staging)
            else:
                _remove_tree(existing)
        if not staging.exists():
            opts.tell(f"unpacking {name} {version} ({arch})")
            vb.unpack(arch, staging, limits=opts.limits)
        pause_point("unpack", opts.data_dir)
        opts.tell(f"warming {name} {version}")
        warm_check(
            load_manifest(staging / MANIFEST_NAME), staging, opts.warm_timeout_s, opts.data_dir
        )
        _write_meta(
            work,
            version,
            {
                "version": version,
                "digest": digest,
                "arch": arch,
                "signers": list(vb.signers),
                "installed_at": _now(),
            },
        )
        os.rename(staging, work / version)
        fsync_dir(work)
        pause_point("switch", opts.data_dir)
        atomic_write(work / "active", f"{version}\n".encode())
        if first:
            os.rename(work, root)
            fsync_dir(opts.functions_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if first:
            shutil.rmtree(work, ignore_errors=True)
        raise
    meta = read_meta(root, version)
    meta["activated_at"] = _now()
    _write_meta(root, version, meta)
    pause_point("prune", opts.data_dir)
    _prune(root, version)
    return InstallResult(name, version, previous, arch, digest, "installed")


def _check_space(manifest: BundleManifest, arch: str, opts: InstallOptions) -> None:
    """Refuse before unpacking what the signed sizes say will not fit (unpack checks again)."""
    parts = [manifest.common, manifest.artifacts.get(arch)]
    need = sum(p.unpacked_size for p in parts if p is not None)
    if need > opts.limits.max_total_bytes:
        raise BundleError(
            f"{manifest.name} {manifest.version} unpacks to {need} bytes, over this device's "
            f"limit of {opts.limits.max_total_bytes} bytes",
            code="too_large",
        )
    free = shutil.disk_usage(opts.functions_dir).free
    if need + (1 << 20) > free:
        raise InstallError(
            f"not enough disk space for {manifest.name} {manifest.version}: needs {need} bytes, "
            f"{free} free in {opts.functions_dir}",
            code="no_space",
        )


def _prune(root: Path, active: str) -> list[str]:
    """Keep `active` and the KEEP_PREVIOUS most recently active other versions."""
    others = [v for v in _version_dirs(root) if v != active]
    others.sort(
        key=lambda v: (str(read_meta(root, v).get("activated_at", "")), semver_key(v)),
        reverse=True,
    )
    removed = []
    for version in others[KEEP_PREVIOUS:]:
        _remove_tree(root / version)
        _meta_path(root, version).unlink(missing_ok=True)
        removed.append(version)
    return removed


# ---------------------------------------------------------------------------------------------
# Rollback and listing


def rollback(name: str, opts: InstallOptions, *, to: str | None = None) -> InstallResult:
    """Make the previously active version (or `to`) active again; explicitly allowed backwards."""
    if not NAME_RE.match(name):
        raise InstallError(f"not a function name: {name!r}", code="bad_request")
    root = opts.functions_dir / name
    with function_lock(opts, name):
        _cleanup_leftovers(opts, name)
        current = read_active(root)
        if current is None:
            raise InstallError(f"{name} has no installed active version", code="not_installed")
        if to is not None:
            if not SEMVER_RE.match(to):
                raise InstallError(f"not a version: {to!r}", code="bad_request")
            if to == current:
                raise InstallError(f"{name} {to} is already active", code="already_active")
            if not (root / to / MANIFEST_NAME).is_file():
                installed = ", ".join(_version_dirs(root))
                raise InstallError(
                    f"{name} {to} is not installed (installed: {installed})", code="not_installed"
                )
            target = to
        else:
            candidates = [
                (str(m["activated_at"]), v)
                for v in _version_dirs(root)
                if v != current
                and (root / v / MANIFEST_NAME).is_file()
                and (m := read_meta(root, v)).get("activated_at")
            ]
            if not candidates:
                raise InstallError(
                    f"{name} has no previous version to roll back to (active: {current})",
                    code="no_previous_version",
                )
            target = max(candidates)[1]
        opts.tell(f"warming {name} {target}")
        warm_check(
            load_manifest(root / target / MANIFEST_NAME),
            root / target,
            opts.warm_timeout_s,
            opts.data_dir,
        )
        atomic_write(root / "active", f"{target}\n".encode())
        meta = read_meta(root, target)
        meta["activated_at"] = _now()
        _write_meta(root, target, meta)
        return InstallResult(
            name,
            target,
            current,
            str(meta.get("arch", "")),
            str(meta.get("digest", "")),
            "rolled_back",
        )


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
        active = read_active(root)
        versions = []
        for v in reversed(_version_dirs(root)):
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
