"""Installing signed bundles into the data dir, switching versions, and rolling back.

The install path, in order (each step named as `edge_agent.install_faults.STEPS` knows it):

1. **download**: from the registry into `DATA_DIR/staging/<name>@<digest>.part`, resuming a part
   an interrupted attempt left, never more than the size cap, and the file's sha256 checked
   against the registry's digest (`cloud_sync.registry_client`). A local bundle file is copied
   into staging with the same cap, so what is verified cannot change underneath us.
2. **verify**: with `update_security = "tuf"` first the bundle's length and sha256 against
   the refreshed TUF targets metadata (`edge_agent.tuf_install`); then the signature against
   the keys in `DATA_DIR/trust/` and every payload digest (`runtimes.verify`), the
   name/version asked for, an artifact for this device's arch (`hardware.profile`), and the
   version order: only forward, unless `force_downgrade` or a rollback says otherwise (the
   same version with the same digest is "already installed").
   Nothing has been unpacked or parsed beyond the signed manifest yet. The checks that need
   only the name, version and digest (already installed, version order, a development copy in
   the way) run once, before the download; a version still unpacked on disk from the same
   bytes (kept for rollback) is switched to without downloading or unpacking it again.
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
Blocking code (file I/O, subprocesses, urllib): the CLI calls it directly. The directory layout
is `edge_agent.versions`; the warm check `edge_agent.warm`; the fault-injection seam tests use
(`InstallOptions.faults`) `edge_agent.install_faults`.
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from edge_agent.install_faults import STEPS, InstallFaults, Step
from edge_agent.staging import (
    STAGING_DIR,
    InstallError,
    function_lock,
    remove_parts,
    staged_copy,
    sweep,
)
from edge_agent.update_security import UpdatePolicy
from edge_agent.versions import (
    ARCH_ANY,
    KEEP_PREVIOUS,
    InstalledFunction,
    InstalledVersion,
    cleanup_leftovers,
    list_installed,
    prune,
    read_active,
    read_meta,
    remove_tree,
    unpacked_copy,
    version_dirs,
    write_meta,
)
from edge_agent.warm import WARM_TIMEOUT_S, warm_check
from runtimes.bundle import DEFAULT_MAX_BUNDLE_BYTES, BundleManifest, check_version_order
from runtimes.errors import BundleError
from runtimes.fsio import atomic_write, fsync_dir
from runtimes.manifest import MANIFEST_NAME, NAME_RE, SEMVER_RE, load_manifest
from runtimes.unpack import DEFAULT_LIMITS, UnpackLimits
from runtimes.verify import VerifiedBundle

if TYPE_CHECKING:
    from runtimes.verify import Verifier

__all__ = [
    "KEEP_PREVIOUS",
    "STEPS",
    "InstallError",
    "InstallOptions",
    "InstallResult",
    "InstalledFunction",
    "InstalledVersion",
    "install_file",
    "install_from_registry",
    "list_installed",
    "rollback",
]

Outcome = Literal["installed", "already_installed", "rolled_back"]
Say = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class InstallOptions:
    data_dir: Path
    max_bundle_bytes: int = DEFAULT_MAX_BUNDLE_BYTES
    limits: UnpackLimits = DEFAULT_LIMITS
    force_downgrade: bool = False
    warm_timeout_s: float = WARM_TIMEOUT_S
    say: Say | None = None  # progress lines for a human
    # The fault-injection seam (edge_agent.install_faults): by default from the environment,
    # read once, here; tests in the same process pass their own.
    faults: InstallFaults = field(default_factory=InstallFaults.from_env)
    # Which trust model registry installs use (edge_agent.update_security); files: signatures.
    security: UpdatePolicy = field(default_factory=UpdatePolicy)

    @property
    def functions_dir(self) -> Path:
        return self.data_dir / "functions"

    @property
    def staging_dir(self) -> Path:
        return self.data_dir / STAGING_DIR

    def tell(self, line: str) -> None:
        if self.say is not None:
            self.say(line)

    def reached(self, step: Step) -> None:
        self.faults.at(step, self.data_dir)


@dataclass(frozen=True, slots=True)
class InstallResult:
    name: str
    version: str
    previous: str | None
    arch: str  # the artifact key installed, or "any" for a bundle without per-arch artifacts
    digest: str
    outcome: Outcome


@dataclass(frozen=True, slots=True)
class _Target:
    """What is being installed, known before any byte of the bundle is read."""

    name: str
    version: str
    digest: str


# ---------------------------------------------------------------------------------------------
# Entry points: where the bytes come from differs, the steps after that are one path


def install_file(src: Path, opts: InstallOptions) -> InstallResult:
    """Install the bundle file `src`."""
    verifier = _load_verifier(opts)  # no trusted key: refuse before copying anything
    for left in sweep(opts.staging_dir):  # copies of interrupted installs: nobody holds them
        opts.tell(f"removed {left}, left in staging by an interrupted install")
    with staged_copy(
        Path(src), opts.staging_dir, opts.max_bundle_bytes, lambda: opts.reached("download")
    ) as (staged, digest):
        # A file names itself only in its signed manifest: verify first, then check.
        vb = _verify(verifier, staged, opts, expect_name=None, expect_version=None)
        target = _Target(vb.name, vb.version, digest)
        with function_lock(opts.staging_dir, target.name, opts.tell):
            return _precheck(opts, target) or _install(opts, target, lambda: vb)


def install_from_registry(
    url: str | tuple[str, ...],
    name: str,
    version: str | None,
    opts: InstallOptions,
    *,
    expected_digest: str | None = None,
) -> InstallResult:
    """Install `name@version` (None: the latest) from the registry at `url` (several URLs:
    the platform's replicas, the next tried when one fails).

    `expected_digest`: the sha256 a fleet instruction names; the bundle must be exactly that.
    With `opts.security.tuf` the length and sha256 come from the refreshed TUF targets metadata
    (`edge_agent.tuf_install`), not from the registry's version document.
    """
    from cloud_sync.registry_client import RegistryClient
    from edge_agent.tuf_install import download_refusals, what_to_download

    verifier = _load_verifier(opts)  # no trusted key: refuse before downloading anything
    urls = (url,) if isinstance(url, str) else url
    client = RegistryClient(urls[0], fallback_urls=urls[1:])
    # What to download and how to verify it: from TUF metadata, or the registry's word.
    info, verifier = what_to_download(client, name, version, verifier, opts, expected_digest)
    target = _Target(name, info.version, info.digest)
    with function_lock(opts.staging_dir, name, opts.tell):
        done = _precheck(opts, target)
        if done is not None:
            remove_parts(opts.staging_dir, name)
            return done
        opts.staging_dir.mkdir(parents=True, exist_ok=True)
        part = opts.staging_dir / f"{name}@{info.digest}.part"
        downloaded = False

        def fetch() -> VerifiedBundle:
            nonlocal downloaded
            have = part.stat().st_size if part.exists() else 0
            if 0 < have < info.size:
                opts.tell(
                    f"resuming download of {name}@{info.version} at byte {have} of {info.size}"
                )
            else:
                opts.tell(f"downloading {name}@{info.version} ({info.size} bytes)")
            first_chunk = True

            def progress(done_bytes: int, total: int) -> None:
                nonlocal first_chunk
                if first_chunk:  # a part is on disk now: the step a resume is tested at
                    first_chunk = False
                    opts.reached("download")

            # DownloadInterrupted keeps the part: the next attempt resumes it.
            with download_refusals(part, info, tuf=opts.security.tuf):
                client.download(info, part, max_bytes=opts.max_bundle_bytes, progress=progress)
            downloaded = True
            return _verify(verifier, part, opts, expect_name=name, expect_version=info.version)

        try:
            result = _install(opts, target, fetch)
        except Exception:
            if downloaded:
                part.unlink(missing_ok=True)  # refused or failed after a complete download
            raise
        remove_parts(opts.staging_dir, name)
        return result


# ---------------------------------------------------------------------------------------------
# The steps


def _precheck(opts: InstallOptions, target: _Target) -> InstallResult | None:
    """Everything decided by name, version and digest alone (the function's lock is held):
    leftovers removed, a development copy in the way, already installed, the version order."""
    name, version = target.name, target.version
    root = opts.functions_dir / name
    cleanup_leftovers(opts.functions_dir, name)
    if (root / MANIFEST_NAME).exists():
        raise InstallError(
            f"{root} holds an unsigned development copy of {name}; move it away before "
            "installing signed bundles of it",
            code="dev_function",
        )
    active = read_active(root, damaged_as_none=True)
    if active == version:
        meta = read_meta(root, version)
        if meta.get("digest") != target.digest:
            raise InstallError(
                f"{name} {version} is already installed with other contents (sha256 "
                f"{meta.get('digest', 'unknown')}, this bundle {target.digest}); publish a new "
                "version",
                code="version_conflict",
            )
        prune(root, version)  # an earlier run may have died before pruning
        arch = str(meta.get("arch", ""))
        return InstallResult(name, version, None, arch, target.digest, "already_installed")
    check_version_order(version, active, allow_rollback=opts.force_downgrade)
    return None


def _install(
    opts: InstallOptions, target: _Target, fetch: Callable[[], VerifiedBundle]
) -> InstallResult:
    """Steps 2 (the rest) to 6; `fetch` downloads and verifies, called only when needed."""
    name, version, digest = target.name, target.version, target.digest
    opts.functions_dir.mkdir(parents=True, exist_ok=True)
    root = opts.functions_dir / name
    previous = read_active(root, damaged_as_none=True)
    kept = unpacked_copy(root, version, digest)
    fill: Callable[[Path], None] | None = None
    if kept is not None:
        # Kept for rollback, or an install that died before its switch: the same bytes were
        # verified when they were unpacked, so neither a download nor an unpack is needed.
        opts.tell(f"{name} {version} is already unpacked; switching to it")
        arch = str(kept.get("arch", ""))
        signers = [str(s) for s in kept.get("signers", [])]
    else:
        vb = fetch()
        manifest: BundleManifest = vb.manifest
        key = _pick_arch(manifest, _device_arch_keys(opts.data_dir))
        arch = key if manifest.artifacts else ARCH_ANY
        signers = list(vb.signers)
        _check_space(manifest, key, opts)

        def fill(staging: Path) -> None:
            opts.tell(f"unpacking {name} {version} ({arch})")
            vb.unpack(key, staging, limits=opts.limits)
            if manifest.artifacts:  # an arch's artifact: its binaries must be for that arch
                from runtimes.elfcheck import check_tree

                check_tree(staging, key)

    first = not root.exists()
    work = opts.functions_dir / f".staging.{name}.{secrets.token_hex(4)}" if first else root
    staging = work / f".staging-{version}-{secrets.token_hex(4)}"
    try:
        if first:
            work.mkdir(mode=0o755)
        if fill is None:
            os.rename(work / version, staging)
        else:
            remove_tree(work / version)  # other bytes under this version's name: replaced
            fill(staging)
        opts.reached("unpack")
        opts.tell(f"warming {name} {version}")
        warm_check(
            load_manifest(staging / MANIFEST_NAME),
            staging,
            opts.warm_timeout_s,
            while_running=lambda: opts.reached("warm"),
        )
        meta = {
            "version": version,
            "digest": digest,
            "arch": arch,
            "signers": signers,
            "installed_at": _now(),
        }
        write_meta(work, version, meta)
        os.rename(staging, work / version)
        fsync_dir(work)
        opts.reached("switch")
        atomic_write(work / "active", f"{version}\n".encode())
        if first:
            os.rename(work, root)
            fsync_dir(opts.functions_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if first:
            shutil.rmtree(work, ignore_errors=True)
        raise
    write_meta(root, version, {**meta, "activated_at": _now()})
    opts.reached("prune")
    prune(root, version)
    return InstallResult(name, version, previous, arch, digest, "installed")


# ---------------------------------------------------------------------------------------------
# Small pieces


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _load_verifier(opts: InstallOptions) -> Verifier:
    from edge_agent.trust import load_verifier

    return load_verifier(opts.data_dir)


def _verify(
    verifier: Verifier,
    staged: Path,
    opts: InstallOptions,
    *,
    expect_name: str | None,
    expect_version: str | None,
) -> VerifiedBundle:
    """Signature and digests against the device's trusted keys, before anything is unpacked."""
    opts.reached("verify")
    return verifier.verify(
        staged,
        max_bytes=opts.max_bundle_bytes,
        expect_name=expect_name,
        expect_version=expect_version,
    )


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


# ---------------------------------------------------------------------------------------------
# Rollback


def rollback(name: str, opts: InstallOptions, *, to: str | None = None) -> InstallResult:
    """Make the previously active version (or `to`) active again; explicitly allowed backwards."""
    if not NAME_RE.match(name):
        raise InstallError(f"not a function name: {name!r}", code="bad_request")
    if to is not None and not SEMVER_RE.match(to):
        raise InstallError(f"not a version: {to!r}", code="bad_request")
    root = opts.functions_dir / name
    if not root.is_dir():
        # Refused before the lock: taking it would leave a staging/<name>.lock for a function
        # that does not exist (an install creates the directory under the lock, so this
        # answer can only be early, never wrong).
        raise InstallError(f"{name} is not installed", code="not_installed")
    with function_lock(opts.staging_dir, name, opts.tell):
        cleanup_leftovers(opts.functions_dir, name)
        current = read_active(root)
        if current is None:
            raise InstallError(f"{name} has no installed active version", code="not_installed")
        target = _rollback_target(root, name, current, to)
        opts.tell(f"warming {name} {target}")
        warm_check(load_manifest(root / target / MANIFEST_NAME), root / target, opts.warm_timeout_s)
        atomic_write(root / "active", f"{target}\n".encode())
        meta = read_meta(root, target)
        meta["activated_at"] = _now()
        write_meta(root, target, meta)
        return InstallResult(
            name,
            target,
            current,
            str(meta.get("arch", "")),
            str(meta.get("digest", "")),
            "rolled_back",
        )


def _rollback_target(root: Path, name: str, current: str, to: str | None) -> str:
    if to is not None:
        if to == current:
            raise InstallError(f"{name} {to} is already active", code="already_active")
        if not (root / to / MANIFEST_NAME).is_file():
            installed = ", ".join(version_dirs(root))
            raise InstallError(
                f"{name} {to} is not installed (installed: {installed})", code="not_installed"
            )
        return to
    candidates = [
        (str(m["activated_at"]), v)
        for v in version_dirs(root)
        if v != current
        and (root / v / MANIFEST_NAME).is_file()
        and (m := read_meta(root, v)).get("activated_at")
    ]
    if not candidates:
        raise InstallError(
            f"{name} has no previous version to roll back to (active: {current})",
            code="no_previous_version",
        )
    return max(candidates)[1]
