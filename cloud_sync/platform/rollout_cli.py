"""`edge-cloud rollout ...`: the operator's face of `/v1/rollouts` (`rollout_api.py`).

    edge-cloud rollout start NAME@VERSION --target SELECTOR [--waves 10,50,100] [--bake S]
        [--gate 'error_rate<=0.05'] ... [--min-invocations N] [--on-failure rollback|pause|abort]
        [--dry-run] [--json] [--supersede]       prints the rollout id as its last line
    edge-cloud rollout status ID [--json] [--watch]
    edge-cloud rollout list [--json]
    edge-cloud rollout pause|resume|abort ID

Each takes `--platform URL` / `--token` / `--data-dir D` as the other operator commands
(`operator_client`). Exit status as `edge-cloud`'s: 0 ok, 1 refused, 2 bad usage, 3
unreachable. `--watch` redraws `cloud_sync.rollout.render` every `WATCH_S` until the rollout
ends or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

# Poll period of `status --watch`: a person reads it; faster only loads the platform.
WATCH_S = 1.0
# The answers are small, but a create plans the whole fleet: allow it time on a large one.
TIMEOUT_S = 60.0
EXIT_ERROR, EXIT_USAGE, EXIT_UNREACHABLE = 1, 2, 3


def _operator_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--platform", help="platform URL (default: from --data-dir)")
    p.add_argument("--token", help="operator token (default: $EDGEFN_TOKEN)")
    p.add_argument("--data-dir", type=Path, help="platform data dir on this host")


def register(sub: Any) -> None:
    """Add `rollout` to `edge-cloud`'s subparsers; each command sets `handler`."""
    ro = sub.add_parser("rollout", help="fleet rollouts: start, status, list, pause, abort")
    ro_sub = ro.add_subparsers(dest="rollout_command", required=True)
    st = ro_sub.add_parser("start", help="roll NAME@VERSION out in waves")
    st.add_argument("ref", metavar="NAME@VERSION")
    st.add_argument("--target", required=True, help="selector, e.g. group=west,arch=aarch64 or *")
    st.add_argument("--waves", help="cumulative percentages, e.g. 10,50,100")
    st.add_argument("--bake", type=float, help="seconds a settled wave runs before advancing")
    st.add_argument("--gate", action="append", default=[], help="e.g. 'error_rate<=0.05'")
    st.add_argument("--min-invocations", type=int)
    st.add_argument("--failure-limit", type=int)
    st.add_argument("--interval", type=float, help="seconds between gate checks")
    st.add_argument("--device-timeout", type=float, help="seconds a device has to install")
    st.add_argument("--rate", type=int, help="devices notified per minute")
    st.add_argument("--max-downloads", type=int, help="devices downloading at once")
    st.add_argument("--on-failure", choices=("rollback", "pause", "abort"))
    st.add_argument("--dry-run", action="store_true", help="list the waves; start nothing")
    st.add_argument("--supersede", action="store_true", help="abort the function's active one")
    st.add_argument("--json", action="store_true")
    _operator_args(st)
    st.set_defaults(handler=cmd_start)
    ss = ro_sub.add_parser("status", help="one rollout: state, reason, waves, devices")
    ss.add_argument("id")
    ss.add_argument("--json", action="store_true")
    ss.add_argument("--watch", action="store_true", help="live view until it ends or Ctrl-C")
    _operator_args(ss)
    ss.set_defaults(handler=cmd_status)
    ls = ro_sub.add_parser("list", help="every rollout")
    ls.add_argument("--json", action="store_true")
    _operator_args(ls)
    ls.set_defaults(handler=cmd_list)
    for verb in ("pause", "resume", "abort"):
        v = ro_sub.add_parser(verb, help=f"{verb} a rollout")
        v.add_argument("id")
        _operator_args(v)
        v.set_defaults(handler=cmd_command, verb=verb)


def _fail(message: str, code: int) -> int:
    print(f"edge-cloud: {' '.join(message.split())}", file=sys.stderr)
    return code


def _api(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any | int:
    """The decoded answer, or an exit status after printing why (one line, stable code)."""
    from cloud_sync.errors import CloudSyncError
    from cloud_sync.http_client import BadAnswer, RemoteError, Unreachable
    from cloud_sync.platform.operator_client import operator_client

    try:
        return operator_client(args, timeout_s=TIMEOUT_S).call(method, path, body)[1]
    except RemoteError as exc:
        return _fail(f"refused: {exc.message}", EXIT_ERROR)
    except Unreachable as exc:
        return _fail(exc.one_line(), EXIT_UNREACHABLE)
    except BadAnswer as exc:
        return _fail(exc.one_line(), EXIT_ERROR)
    except CloudSyncError as exc:  # no URL or token
        return _fail(exc.one_line(), EXIT_USAGE)


def spec_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The spec dict (`RolloutSpec.from_dict`'s input) of `rollout start`'s flags; flags not
    given are left out, so the platform's defaults apply."""
    from cloud_sync.rollout.spec import parse_function_ref

    name, version = parse_function_ref(args.ref)
    spec: dict[str, Any] = {"function": name, "version": version, "target": args.target}
    optional = {
        "waves": args.waves,
        "bake_s": args.bake,
        "min_invocations": args.min_invocations,
        "failure_limit": args.failure_limit,
        "interval_s": args.interval,
        "device_timeout_s": args.device_timeout,
        "rate_per_minute": args.rate,
        "max_concurrent_downloads": args.max_downloads,
        "on_failure": args.on_failure,
    }
    spec.update({k: v for k, v in optional.items() if v is not None})
    if args.gate:
        spec["gates"] = list(args.gate)
    return spec


def cmd_start(args: argparse.Namespace) -> int:
    from cloud_sync.rollout.errors import RolloutError

    try:
        body = spec_from_args(args)
    except RolloutError as exc:
        return _fail(exc.one_line(), EXIT_USAGE)
    body.update(dry_run=args.dry_run, supersede=args.supersede)
    doc = _api(args, "POST", "/v1/rollouts", body)
    if isinstance(doc, int):
        return doc
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    for index, devices in enumerate(doc.get("waves") or []):
        shown = ", ".join(devices[:20]) + (
            f" ... (+{len(devices) - 20})" if len(devices) > 20 else ""
        )
        print(f"wave {index + 1}: {len(devices)} devices: {shown or '-'}")
    for bad in doc.get("ineligible") or []:
        print(f"cannot take it: {bad['device']}: {bad['code']} ({bad['reason']})")
    for old in doc.get("superseded") or []:
        print(f"superseded: {old}")
    if args.dry_run:
        print("dry run: nothing started")
        return 0
    print(doc["id"])
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from urllib.parse import quote

    from cloud_sync.rollout.render import render
    from cloud_sync.rollout.states import TERMINAL_ROLLOUT_STATES

    path = f"/v1/rollouts/{quote(args.id, safe='')}"
    ended = {s.value for s in TERMINAL_ROLLOUT_STATES}
    if not args.watch:
        view = _api(args, "GET", path)
        if isinstance(view, int):
            return view
        print(json.dumps(view, indent=2) if args.json else render(view))
        return 0
    try:
        while True:
            view = _api(args, "GET", path)
            if isinstance(view, int):
                return view
            if sys.stdout.isatty():
                print("\x1b[H\x1b[2J", end="")
            print(render(view), flush=True)
            if view["state"] in ended:
                return 0
            time.sleep(WATCH_S)
    except KeyboardInterrupt:
        return 0


def cmd_list(args: argparse.Namespace) -> int:
    doc = _api(args, "GET", "/v1/rollouts")
    if isinstance(doc, int):
        return doc
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    for r in doc["rollouts"]:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(r["counts"].items()))
        print(
            f"{r['id']:<12} {r['function']}@{r['version']:<10} {r['state']:<16}"
            f" wave {r['wave'] + 1}/{len(r['waves'])}  {counts}"
        )
    return 0


def cmd_command(args: argparse.Namespace) -> int:
    from urllib.parse import quote

    view = _api(args, "POST", f"/v1/rollouts/{quote(args.id, safe='')}/{args.verb}", {})
    if isinstance(view, int):
        return view
    print(f"{view['id']}: {view['state']}" + (f" ({view['reason']})" if view["reason"] else ""))
    return 0
