"""`edge-cloud events DEVICE [--function F] [--json]`: what a device's functions published.

Functions publish through the building blocks (`publish(topic, payload)`, docs/building-blocks.md);
the agent puts each one in its outbox as an `events` record of type `function_event`, and the
platform stores it like any device record (deduplicated on the outbox key). This module only
selects and renders those records from `GET /v1/devices/{id}/records?kind=events`.
"""

from __future__ import annotations

import argparse
import base64
import json
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import quote

# The most records one listing asks for (the platform's own per-request bound).
LIST_LIMIT = 1000

Api = Callable[[argparse.Namespace, str, str], "tuple[int, Any] | int"]


def function_events(
    records: Iterable[Mapping[str, Any]], function: str | None
) -> list[dict[str, Any]]:
    """The `function_event` records, oldest first, optionally of one function."""
    out: list[dict[str, Any]] = []
    for rec in records:
        value = rec.get("value")
        if not isinstance(value, Mapping) or value.get("type") != "function_event":
            continue
        if function and value.get("function") != function:
            continue
        out.append(
            {
                "at": value.get("at"),
                "function": value.get("function"),
                "version": value.get("version"),
                "topic": value.get("topic"),
                "size": value.get("size"),
                "request_id": value.get("request_id"),
                "payload_b64": value.get("payload_b64", ""),
                "received_at": rec.get("received_at"),
            }
        )
    out.sort(key=lambda e: e["at"] or 0)
    return out


def add_parser(sub: Any, operator_args: Callable[[argparse.ArgumentParser], None]) -> None:
    ev = sub.add_parser("events", help="events a device's functions published")
    ev.add_argument("id")
    ev.add_argument("--function")
    ev.add_argument("--json", action="store_true")
    operator_args(ev)


def run(args: argparse.Namespace, api: Api) -> int:
    got = api(
        args, "GET", f"/v1/devices/{quote(args.id, safe='')}/records?kind=events&limit={LIST_LIMIT}"
    )
    if isinstance(got, int):
        return got
    events = function_events(got[1].get("records", []), args.function)
    if args.json:
        print(json.dumps({"device": args.id, "events": events}, indent=2))
        return 0
    print(f"{args.id}: {len(events)} function events")
    for e in events:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(e["at"] or 0))
        size = e["size"] if e["size"] is not None else len(base64.b64decode(e["payload_b64"]))
        print(f"  {when}  {e['function']}@{e['version']}  {e['topic']}  {size} bytes")
    return 0
