"""Version order for installs: versions only move forward unless a rollback says so."""

from __future__ import annotations

from runtimes.bundle.layout import fail
from runtimes.manifest import semver_key


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1 as semver `a` sorts before, equal to or after `b`."""
    ka, kb = semver_key(a), semver_key(b)
    return (ka > kb) - (ka < kb)


def check_version_order(new: str, installed: str | None, *, allow_rollback: bool = False) -> None:
    """The installer's downgrade rule: versions only move forward unless a rollback says so.

    Installing the same version again is allowed (idempotent retries); whether its bytes match
    the installed copy is for the installer to compare by digest.
    """
    if installed is not None and compare_versions(new, installed) < 0 and not allow_rollback:
        raise fail(
            "downgrade",
            f"version {new} is older than the installed {installed}; only a rollback may do that",
        )
