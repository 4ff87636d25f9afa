"""`edge-cloud simulate`: the simulator's command line, kept apart so `edge-cloud` starts fast
(the simulator itself, with aiohttp and paho, is imported only when the command runs)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "simulate", help="run N simulated devices against a platform on loopback"
    )
    p.add_argument("--devices", type=int, required=True)
    p.add_argument("--platform", required=True, help="platform URL (loopback)")
    p.add_argument("--broker", help="broker URL (default: from the enrolment credentials)")
    p.add_argument("--token", help="operator token (default: $EDGEFN_TOKEN)")
    p.add_argument("--data-dir", type=Path, help="platform data dir on this host: reads its token")
    p.add_argument("--labels", default="", help="k=v,k=v for every simulated device")
    p.add_argument("--prefix", default="sim", help="device id prefix (ids: PREFIX-00000 ...)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds to run (bounded)")
    p.add_argument("--metrics-interval", type=float, default=1.0)
    p.add_argument("--arch", default="x86_64", help="architecture the devices report")
    p.add_argument(
        "--connect-rate", type=float, default=0.0,
        help="devices connecting per second at start (default 0: all at once)",
    )  # fmt: skip
    p.add_argument(
        "--fault", action="append", default=[], metavar="VERSION:KIND[=V][@F]",
        help="misbehave on purpose, e.g. 1.4.0:crash@0.5, 1.4.0:errors=0.3, 1.4.0:latency=300",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    return p


def run(args: argparse.Namespace, token: str | None) -> int:
    """Exit status as the other commands: 0 ok, 1 refused or failed, 2 bad usage."""
    from cloud_sync.errors import CloudSyncError
    from cloud_sync.platform import simulator

    if not token:
        print(
            "edge-cloud simulate: no operator token: pass --token, set EDGEFN_TOKEN or --data-dir"
        )
        return 2
    try:
        labels = dict(_pair(kv) for kv in args.labels.split(",") if kv.strip())
        settings = simulator.SimSettings(
            devices=args.devices, platform_url=args.platform, token=token,
            broker_url=args.broker, labels=labels, prefix=args.prefix,
            duration_s=args.duration, metrics_interval_s=args.metrics_interval, arch=args.arch,
            connect_rate=args.connect_rate,
            faults=tuple(simulator.parse_fault(f) for f in args.fault),
        )  # fmt: skip
    except (CloudSyncError, ValueError) as exc:
        print(f"edge-cloud simulate: {exc}", file=sys.stderr)
        return 2
    try:
        summary = asyncio.run(simulator.Simulator(settings).run())
    except CloudSyncError as exc:
        print(f"edge-cloud simulate: {exc.message} ({exc.code})", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2))
    else:
        print(
            f"{summary.devices} devices for {summary.seconds:.1f} s: {summary.reports} status "
            f"reports, {summary.downloads} downloads, {summary.metrics} metrics records"
        )
    return 0


def _pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"bad label {text!r}: expected k=v")
    return key.strip(), value.strip()
