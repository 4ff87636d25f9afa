"""`edge-agent discover` and the LAN options of `edge-agent invoke` (edge_agent.client)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

EXIT_ERROR = 1
EXIT_UNREACHABLE = 3


def add_parser(sub: Any) -> None:
    """Register `discover` on the top-level subparsers."""
    disc = sub.add_parser("discover", help="list edgefn agents advertised on the LAN (zeroconf)")
    disc.add_argument("--timeout", type=float, default=3.0, help="seconds to listen (default 3)")
    disc.add_argument("--json", action="store_true")


def add_invoke_options(inv: argparse.ArgumentParser) -> None:
    """`invoke` options for agents on the LAN: discovery, token, CA pin."""
    inv.add_argument(
        "--discover", action="store_true", help="find the agent on the LAN with zeroconf"
    )
    inv.add_argument("--device", help="with --discover: the device id to call")
    inv.add_argument(
        "--token",
        default=os.environ.get("EDGEFN_TOKEN"),
        help="bearer token for an agent run with --auth token (default: $EDGEFN_TOKEN)",
    )
    inv.add_argument("--cafile", type=Path, help="CA file to pin for an https agent")
    inv.add_argument("--client-cert", type=Path, help="client certificate (PEM), auth = mtls")
    inv.add_argument("--client-key", type=Path, help="its private key (PEM)")


def cmd_discover(args: argparse.Namespace) -> int:
    from edge_agent.discovery import discover

    found = asyncio.run(discover(args.timeout))
    if args.json:
        print(json.dumps([f.to_dict() for f in found], indent=2))
        return 0
    for f in found:
        print(f"{f.device_id:<24} {f.url:<28} auth={f.txt.get('auth', '?')} api={f.txt.get('api')}")
    if not found:
        print("no edgefn agents found", file=sys.stderr)
    return 0


def invoke_lan(args: argparse.Namespace, url: str, data: bytes, headers: dict[str, str]) -> int:
    """`invoke` through edge_agent.client: `url` unless --discover finds the agent."""
    from cloud_sync.errors import describe_http_error
    from edge_agent.client import ClientError, LanClient

    tls = {"cafile": args.cafile, "client_cert": args.client_cert, "client_key": args.client_key}
    try:
        if args.discover:
            client = LanClient.discover(
                device_id=args.device, token=args.token, timeout=args.timeout, **tls
            )
        else:
            client = LanClient(url, token=args.token, timeout=args.timeout, **tls)
        reply = client.request("POST", f"/v1/functions/{args.name}/invoke", data, headers)
    except ClientError as exc:
        print(f"edge-agent: {exc.message}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if not reply.ok:
        print(f"edge-agent: {describe_http_error(reply.status, reply.body)}", file=sys.stderr)
        return EXIT_ERROR
    sys.stdout.buffer.write(reply.body)
    if sys.stdout.isatty() and not reply.body.endswith(b"\n"):
        sys.stdout.buffer.write(b"\n")
    sys.stdout.flush()
    return 0
