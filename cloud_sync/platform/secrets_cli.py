"""`edge-cloud secret set|list`: store a secret for a device or a group, list what is stored.

    edge-cloud secret set NAME --device ID|--group G --from-file F
    edge-cloud secret list [--device ID|--group G] [--json]

The value is read from a file (never a command-line argument, which `ps` and shell history
show) and sealed here to the platform's secrets key (`GET /v1/secrets/key`) before it is sent,
so it is not in clear in the HTTP body either (docs/building-blocks.md, "Secrets"). `list` shows
names, targets, versions, sizes and which version each device acknowledged; the platform has no
route that returns a value to anybody but the device it is sealed to.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from cloud_sync.sealbox import MAX_VALUE_BYTES, SealError, platform_aad, public_key_from_pem, seal
from runtimes.permissions import valid_secret_name

Api = Callable[..., "tuple[int, Any] | int"]
EXIT_ERROR = 1
EXIT_USAGE = 2


def _fail(message: str, code: int) -> int:
    print(f"edge-cloud: {message}", file=sys.stderr)
    return code


def add_parser(
    sub: Any, operator_args: Callable[[argparse.ArgumentParser], None], api: Api
) -> None:
    sec = sub.add_parser("secret", help="secrets for devices' functions: set, list")
    sec_sub = sec.add_subparsers(dest="secret_command", required=True)
    st = sec_sub.add_parser("set", help="store a new version of a secret (value from a file)")
    st.add_argument("name")
    target = st.add_mutually_exclusive_group(required=True)
    target.add_argument("--device")
    target.add_argument("--group")
    st.add_argument("--from-file", type=Path, required=True, help="file holding the value")
    operator_args(st)
    st.set_defaults(handler=lambda args: cmd_set(args, api))
    ls = sec_sub.add_parser("list", help="names, targets and versions (never values)")
    which = ls.add_mutually_exclusive_group()
    which.add_argument("--device")
    which.add_argument("--group")
    ls.add_argument("--json", action="store_true")
    operator_args(ls)
    ls.set_defaults(handler=lambda args: cmd_list(args, api))


def cmd_set(args: argparse.Namespace, api: Api) -> int:
    name = args.name
    if not valid_secret_name(name):
        return _fail(f"{name!r} is not a secret name: 1-63 of a-z 0-9 _ - (bad_secret_name)", 2)
    scope, target = ("device", args.device) if args.device else ("group", args.group)
    try:
        value = args.from_file.read_bytes()
    except OSError as exc:
        return _fail(f"cannot read {args.from_file}: {exc.strerror} (unreadable_file)", EXIT_USAGE)
    if len(value) > MAX_VALUE_BYTES:
        return _fail(f"a secret is at most {MAX_VALUE_BYTES} bytes (too_large)", EXIT_USAGE)
    got = api(args, "GET", "/v1/secrets/key")
    if isinstance(got, int):
        return got
    try:
        key = public_key_from_pem(str(got[1].get("public_pem", "")))
    except SealError as exc:
        return _fail(exc.one_line(), EXIT_ERROR)
    box = seal(key, value, platform_aad(scope, target, name))
    body = {"scope": scope, "target": target, "box": box, "size": len(value)}
    got = api(args, "PUT", f"/v1/secrets/{quote(name, safe='')}", body)
    if isinstance(got, int):
        return got
    print(f"secret {name} for {scope} {target}: version {got[1]['version']}")
    return 0


def cmd_list(args: argparse.Namespace, api: Api) -> int:
    query = {k: v for k, v in (("device", args.device), ("group", args.group)) if v}
    got = api(args, "GET", "/v1/secrets" + (f"?{urlencode(query)}" if query else ""))
    if isinstance(got, int):
        return got
    rows = got[1].get("secrets", [])
    if args.json:
        print(json.dumps({"secrets": rows}, indent=2))
        return 0
    if not rows:
        print("no secrets")
        return 0
    print(f"{'NAME':<24} {'VERSION':>7} {'TARGET':<28} {'SIZE':>6}  UPDATED               HELD BY")
    for r in rows:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r.get("updated_at") or 0))
        held = r.get("acknowledged") or {}
        by = ", ".join(f"{d}@v{v}" for d, v in sorted(held.items())) or "-"
        tgt = f"{r['scope']}:{r['target']}"
        print(f"{r['name']:<24} {r['version']:>7} {tgt:<28} {r['size']:>6}  {when}  {by}")
    return 0
