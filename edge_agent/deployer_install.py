"""The deployer's blocking side: the existing install path, rollback, and stable codes.

Everything here runs in a worker thread (`asyncio.to_thread`): the installer is synchronous
(downloads, fsync, the warm check's own event loop). It adds no install logic of its own: it
calls `edge_agent.install` and translates what that raises into the rollout contract's stable
codes (`cloud_sync.rollout.states.REJECT_CODES` / `FAILURE_CODES`):

* *rejected* (nothing changed, retrying cannot help): the bundle's signature, digest, format,
  architecture, version order, disk space;
* *failed* (something went wrong on the way): the download, the warm start, anything else.

Install progress reaches the deployer through the installer's step seam
(`InstallOptions.faults`): `_Progress` reports each step and then behaves exactly as the
faults the environment asks for (`EDGEFN_INSTALL_PAUSE_AT`, used by the kill -9 tests).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cloud_sync.rollout.states import REJECT_CODES, DeviceState
from edge_agent.install import InstallOptions, install_from_registry, rollback
from edge_agent.install_faults import InstallFaults, Step
from edge_agent.staging import function_lock
from edge_agent.store import read_active
from edge_agent.update_security import UpdatePolicy
from hardware.errors import EdgefnError
from runtimes.fsio import fsync_dir

# Installer / registry / bundle codes -> the contract's stable codes.
_REJECT_ALIASES = {
    "no_space": "disk_full",
    "too_large": "disk_full",
    "unknown_signer": "signature",
    "missing_signature": "signature",
    "bad_signature": "signature",
    "downgrade": "downgrade_refused",
    "version_conflict": "bad_bundle",
    "dev_function": "bad_bundle",
    "unexpected_bundle": "bad_bundle",
    "bad_manifest": "bad_bundle",
    "bad_payload": "bad_bundle",
    "malformed_bundle": "bad_bundle",
    "unsafe_path": "bad_bundle",
    "special_file": "bad_bundle",
    "duplicate_entry": "bad_bundle",
    "too_many_entries": "bad_bundle",
    "truncated": "bad_bundle",
    "missing_toolchain": "no_runtime",
}
# TUF refusals (runtimes.tuf_verify.CODES) report as "signature": the registry's signed
# metadata did not vouch for the bundle; the message keeps the precise tuf_* code.
_TUF_REJECT = "signature"
_FAILURE_ALIASES = {
    "warm_failed": "warm_failed",
    "registry_unreachable": "download_failed",
    "registry_error": "download_failed",
    "registry_garbage": "download_failed",
    "download_interrupted": "download_failed",
    "download_overrun": "download_failed",
    "tuf_unreachable": "download_failed",
    "tuf_cache": "install_failed",
}


@dataclass(frozen=True, slots=True)
class InstallOutcome:
    ok: bool
    state: DeviceState = DeviceState.ACTIVE
    code: str | None = None
    message: str = ""


def classify(exc: Exception) -> InstallOutcome:
    """An installer exception as (rejected | failed, stable code, reason)."""
    raw = exc.code if isinstance(exc, EdgefnError) else "install_failed"
    message = exc.message if isinstance(exc, EdgefnError) else f"{type(exc).__name__}: {exc}"
    if raw in REJECT_CODES:
        return InstallOutcome(False, DeviceState.REJECTED, raw, message)
    if raw in _REJECT_ALIASES:
        return InstallOutcome(False, DeviceState.REJECTED, _REJECT_ALIASES[raw], message)
    if raw.startswith("tuf_"):
        from runtimes.tuf_verify import FAILURE_CODES as TUF_FAILURES  # python-tuf: imported late

        if raw not in TUF_FAILURES:
            return InstallOutcome(False, DeviceState.REJECTED, _TUF_REJECT, f"{message} ({raw})")
    return InstallOutcome(
        False, DeviceState.FAILED, _FAILURE_ALIASES.get(raw, "install_failed"), message
    )


@dataclass(frozen=True, slots=True)
class _Progress(InstallFaults):
    """The installer's step seam, used for progress: report, then the environment's faults."""

    report: Callable[[str], None] = field(default=lambda step: None)

    def at(self, step: Step, data_dir: Path) -> None:
        self.report(step)
        super(_Progress, self).at(step, data_dir)


def _options(
    data_dir: Path,
    progress: Callable[[str], None],
    *,
    downgrade: bool,
    security: UpdatePolicy | None = None,
) -> InstallOptions:
    env = InstallFaults.from_env()
    faults = _Progress(env.pause_at, env.marker, report=progress)
    return InstallOptions(
        data_dir=data_dir,
        force_downgrade=downgrade,
        faults=faults,
        security=security or UpdatePolicy(),
    )


def install_version(
    data_dir: Path,
    registry_url: str | tuple[str, ...],
    name: str,
    version: str,
    *,
    rollback: bool,
    progress: Callable[[str], None],
    security: UpdatePolicy | None = None,
    expected_digest: str | None = None,
) -> InstallOutcome:
    """Run the install path for `name@version`; never raises for an install that failed."""
    opts = _options(data_dir, progress, downgrade=rollback, security=security)
    try:
        install_from_registry(registry_url, name, version, opts, expected_digest=expected_digest)
    except Exception as exc:  # every refusal becomes a report, never a crash of the deployer
        return classify(exc)
    return InstallOutcome(True)


def read_active_version(data_dir: Path, name: str) -> str | None:
    return read_active(data_dir / "functions" / name)


def deactivate(data_dir: Path, name: str) -> None:
    """No version active any more (a first install rolled back): the agent unloads it. The
    unpacked versions stay for a later rollout."""
    staging = data_dir / "staging"
    root = data_dir / "functions" / name
    with function_lock(staging, name, lambda line: None), contextlib.suppress(FileNotFoundError):
        os.unlink(root / "active")
        fsync_dir(root)


def local_rollback(data_dir: Path, name: str, previous: str | None, bad: str) -> None:
    """Leave `bad` for `previous` (already unpacked: no network), or deactivate a first
    install. Nothing to do when `bad` is not active (the switch never happened)."""
    if read_active_version(data_dir, name) != bad:
        return
    if previous is None:
        deactivate(data_dir, name)
        return
    opts = InstallOptions(data_dir=data_dir, faults=InstallFaults())
    rollback(name, opts, to=previous)
