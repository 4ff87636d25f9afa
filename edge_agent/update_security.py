"""Which trust model an install uses (`update_security`), and what `fn list` says about it.

Two models (docs/update-security.md, "Device verification"):

* `"tuf"`: every install from the registry first refreshes the TUF metadata (root rotation,
  timestamp, snapshot, targets, the publisher's delegated role: `cloud_sync.tuf_client`); the
  bundle must be a target there with exactly its length and sha256, and a fleet instruction's
  digest must be that sha256 (`runtimes.tuf_verify`); then the Ed25519 bundle signature is
  checked as before. A platform without TUF is refused (`tuf_unavailable`).
* `"signatures"`: the Ed25519 signature against `DATA_DIR/trust/` only (what every device did
  before TUF); for platforms that do not serve TUF metadata.

The setting: `update_security` in the agent's config file (the packaged
/etc/edgefn/agent.toml says `"tuf"`) or `edge-agent fn install --update-security`. Left unset
(library and development use), the device's own state decides, never the network: `tuf` once
the device has a pinned root (the credentials file's `tuf_root`) or trusted metadata in
`DATA_DIR/tuf/`, else `signatures`. A registry cannot talk a device out of TUF: the pinned root
and the cache are local files.

Local bundle files (`fn install FILE`) are checked with signatures only: whoever can run that
command can already write the data dir and its trust store.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

UpdateSecurity = Literal["tuf", "signatures"]
CHOICES: tuple[UpdateSecurity, ...] = ("tuf", "signatures")


@dataclass(frozen=True, slots=True)
class UpdatePolicy:
    """The resolved model of one device, passed to every install it makes."""

    mode: UpdateSecurity = "signatures"
    pinned_root: bytes | None = None  # root.json pinned at enrolment (bootstraps the cache)
    token: str = ""
    ssl_context: ssl.SSLContext | None = None

    @property
    def tuf(self) -> bool:
        return self.mode == "tuf"


def resolve(
    setting: str | None,
    data_dir: Path,
    credentials_file: Path | None = None,
    *,
    token: str = "",
    ssl_context: ssl.SSLContext | None = None,
) -> UpdatePolicy:
    """The policy for `setting` ("tuf", "signatures" or None: decided by the device's state)."""
    from cloud_sync.credentials import read_tuf_root
    from cloud_sync.tuf_client import current_dir

    root = read_tuf_root(credentials_file) if credentials_file is not None else None
    if setting is None:
        setting = "tuf" if root is not None or current_dir(data_dir) is not None else "signatures"
    if setting not in CHOICES:
        raise ValueError(f"update_security must be one of {', '.join(CHOICES)}, got {setting!r}")
    mode: UpdateSecurity = "tuf" if setting == "tuf" else "signatures"
    return UpdatePolicy(mode, root, token, ssl_context)


def status(data_dir: Path, installed: list[Any]) -> dict[str, Any] | None:
    """For `fn list`: the cached metadata's expiry and the installed versions it no longer names.

    `installed` are `edge_agent.versions.InstalledFunction`s. None when the device has no TUF
    metadata. Offline: reads only what the last refresh stored.
    """
    if not (Path(data_dir) / "tuf" / "current").is_symlink():
        return None  # never refreshed: and python-tuf (slow to import) is not needed
    from cloud_sync.tuf_client import trusted_view
    from runtimes.tuf_verify import TufError, target_path

    try:
        view = trusted_view(data_dir)
    except (OSError, ValueError, TufError) as exc:
        return {"error": f"the cached TUF metadata cannot be read: {exc}"}
    if view is None:
        return None
    first = view.earliest_expiry()
    roles = {
        e.role: {"version": e.version, "expires": _iso(e.expires), "expired": e.expired}
        for e in view.expiries()
    }
    unlisted = []
    for item in installed:
        for v in getattr(item, "versions", []):
            if view.find(target_path(item.name, v.version)) is None:
                unlisted.append({"name": item.name, "version": v.version, "active": v.active})
    return {
        "expires": _iso(first.expires),
        "expires_role": first.role,
        "expired": first.expired,
        "roles": roles,
        "not_in_metadata": unlisted,
    }


def _iso(when: Any) -> str:
    return str(when.strftime("%Y-%m-%dT%H:%M:%SZ"))


def status_lines(info: dict[str, Any] | None) -> list[str]:
    """`status` for a human, one fact per line."""
    if info is None:
        return []
    if "error" in info:
        return [f"update security: {info['error']}"]
    state = (
        "EXPIRED: new installs are refused until it is refreshed" if info["expired"] else "valid"
    )
    lines = [f"TUF metadata {state}; expires {info['expires']} ({info['expires_role']})"]
    for row in info["not_in_metadata"]:
        mark = " (active)" if row["active"] else ""
        lines.append(
            f"{row['name']} {row['version']}{mark}: not in the trusted TUF metadata (withdrawn "
            "or its publisher key revoked); it keeps serving until replaced"
        )
    return lines
