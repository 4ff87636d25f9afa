"""How the operator commands reach the platform: URL, operator token, CA, one HTTP client.

Shared by every `edge-cloud` command that calls the platform's HTTP API (device, group,
devices, metrics, and `fn publish`), so they all find the platform and its token the same way
and all check HTTPS against the platform's own CA when they run on the platform host:

* URL: `--platform URL`, else the `url` in `<data-dir>/platform.json` of a running platform;
* token: `--token`, else `$EDGEFN_TOKEN`, else the admin token file in `--data-dir`;
* TLS: for an https URL and a `--data-dir`, the platform CA (`<data-dir>/pki/ca.crt`); without
  a data dir, the system's CAs.

`operator_endpoint(args)` raises `OperatorSetupError` (a usage problem: exit 2) when the URL or
the token cannot be found; the rest is `cloud_sync.http_client`.
"""

from __future__ import annotations

import argparse
import json

from cloud_sync.errors import Category, CloudSyncError
from cloud_sync.http_client import DEFAULT_TIMEOUT_S, Endpoint, SyncHttpClient


class OperatorSetupError(CloudSyncError):
    """No platform URL or no operator token: the command cannot start."""

    code = "operator_setup"
    category: Category = "config"


def operator_token(args: argparse.Namespace) -> str | None:
    """--token, $EDGEFN_TOKEN, or the token file of --data-dir; None when there is none."""
    import os

    if getattr(args, "token", None):
        return str(args.token)
    if os.environ.get("EDGEFN_TOKEN"):
        return os.environ["EDGEFN_TOKEN"]
    if getattr(args, "data_dir", None) is not None:
        from cloud_sync.platform.auth import read_token
        from cloud_sync.platform.settings import PlatformSettings

        return read_token(PlatformSettings(data_dir=args.data_dir).token_file)
    return None


def platform_url(args: argparse.Namespace) -> str | None:
    """--platform, or the URL a running platform wrote into --data-dir; None when neither."""
    if getattr(args, "platform", None):
        return str(args.platform).rstrip("/")
    if getattr(args, "data_dir", None) is not None:
        from cloud_sync.platform.settings import PlatformSettings

        try:
            state = json.loads(PlatformSettings(data_dir=args.data_dir).state_file.read_text())
            return str(state["url"]).rstrip("/")
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return None


def operator_endpoint(
    args: argparse.Namespace, *, timeout_s: float = DEFAULT_TIMEOUT_S
) -> Endpoint:
    """The platform as the operator reaches it (see the module docstring)."""
    token = operator_token(args)
    if token is None:
        raise OperatorSetupError(
            "no operator token: pass --token, set EDGEFN_TOKEN, or --data-dir of the platform",
            code="no_operator_token",
        )
    base = platform_url(args)
    if base is None:
        raise OperatorSetupError(
            "no platform: pass --platform URL (or --data-dir of a running one)",
            code="no_platform",
        )
    data_dir = getattr(args, "data_dir", None)
    cafile = data_dir / "pki" / "ca.crt" if data_dir is not None else None
    return Endpoint(base, token=token, cafile=cafile, timeout_s=timeout_s, name="the platform")


def operator_client(
    args: argparse.Namespace, *, timeout_s: float = DEFAULT_TIMEOUT_S
) -> SyncHttpClient:
    return SyncHttpClient(operator_endpoint(args, timeout_s=timeout_s))
