"""`edge-cloud tuf ...`: the operator's TUF repository commands, on the platform host.

    edge-cloud tuf init --data-dir D [--threshold N] [--exist-ok]
    edge-cloud tuf rotate-root --data-dir D [--threshold N] [--online] [--offline-keys DIR]
    edge-cloud tuf add-publisher --data-dir D --key PUB.pem --functions a,b [--offline-keys DIR]
    edge-cloud tuf revoke-publisher --data-dir D (--key PUB.pem | --role NAME) [--offline-keys DIR]
    edge-cloud tuf status --data-dir D [--json]

Exit status: 0 done; 1 refused (one stderr line ending in the stable code); 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

EXIT_ERROR = 1
EXIT_USAGE = 2


def register(sub: Any) -> None:
    """Add the `tuf` command group to `edge-cloud`'s subparsers."""
    tuf = sub.add_parser("tuf", help="the registry's TUF repository: keys, roles, publishers")
    tuf_sub = tuf.add_subparsers(dest="tuf_command", required=True)

    def common(p: argparse.ArgumentParser, offline: bool = True) -> None:
        p.add_argument("--data-dir", type=Path, required=True, help="the platform's data dir")
        if offline:
            p.add_argument(
                "--offline-keys",
                type=Path,
                help="where the offline keys are now (default: DATA_DIR/tuf/offline-keys)",
            )
        p.set_defaults(handler=run)

    init = tuf_sub.add_parser("init", help="create the keys and version 1 of every role")
    common(init, offline=False)
    init.add_argument("--threshold", type=int, default=1, help="root keys needed (and made)")
    init.add_argument("--exist-ok", action="store_true", help="already initialised: exit 0")
    rot = tuf_sub.add_parser("rotate-root", help="new root keys, signed by the old threshold")
    common(rot)
    rot.add_argument("--threshold", type=int, help="new threshold (default: the current one)")
    rot.add_argument(
        "--online", action="store_true", help="also replace the snapshot and timestamp keys"
    )
    add = tuf_sub.add_parser("add-publisher", help="delegate functions to a publisher key")
    common(add)
    add.add_argument("--key", type=Path, required=True, help="the publisher's KEY.pub (PEM)")
    add.add_argument("--functions", required=True, help="comma separated function names")
    rev = tuf_sub.add_parser("revoke-publisher", help="remove a publisher's delegation")
    common(rev)
    who = rev.add_mutually_exclusive_group(required=True)
    who.add_argument("--key", type=Path, help="the publisher's KEY.pub (PEM)")
    who.add_argument("--role", help="the role name, publisher-<16 hex>")
    status = tuf_sub.add_parser("status", help="versions and expiry of every role")
    common(status, offline=False)
    status.add_argument("--json", action="store_true")


def _fail(message: str, code: int) -> int:
    print(f"edge-cloud: {' '.join(message.split())}", file=sys.stderr)
    return code


def run(args: argparse.Namespace) -> int:
    from cloud_sync.platform.tuf.errors import AlreadyInitialised, TufError

    try:
        return _run(args)
    except AlreadyInitialised as exc:
        if getattr(args, "exist_ok", False):
            print(f"TUF already initialised in {args.data_dir}: nothing to do", flush=True)
            return 0
        return _fail(exc.one_line(), EXIT_ERROR)
    except TufError as exc:
        return _fail(exc.one_line(), EXIT_ERROR)
    except (OSError, ValueError) as exc:
        return _fail(str(exc), EXIT_USAGE)


def _run(args: argparse.Namespace) -> int:
    from cloud_sync.platform.tuf import admin

    data_dir: Path = args.data_dir
    if args.tuf_command == "init":
        result = admin.init(data_dir, threshold=args.threshold)
        print(f"TUF repository created in {data_dir / 'tuf'}: root threshold {args.threshold}")
        print(
            f"WARNING: {result.offline_dir} holds the root and targets keys. Move it to offline "
            "storage (and back only for rotate-root / add-publisher / revoke-publisher, or pass "
            "--offline-keys DIR); anyone with these keys can sign software for every device.",
            file=sys.stderr,
        )
        print(f"online keys (the platform signs snapshot and timestamp): {result.online_dir}")
        return 0
    if args.tuf_command == "rotate-root":
        new = admin.rotate_root(
            data_dir, keys_dir=args.offline_keys, threshold=args.threshold, online=args.online
        )
        role = new.signed.roles["root"]
        print(
            f"root version {new.signed.version}: {len(role.keyids)} new root keys, threshold "
            f"{role.threshold}; the old root keys were deleted"
            + ("; new snapshot and timestamp keys" if args.online else "")
        )
        return 0
    if args.tuf_command == "add-publisher":
        functions = [f.strip() for f in args.functions.split(",") if f.strip()]
        name = admin.add_publisher(data_dir, args.key, functions, keys_dir=args.offline_keys)
        print(f"{name} may publish {', '.join(functions)}")
        return 0
    if args.tuf_command == "revoke-publisher":
        name = admin.revoke_publisher(
            data_dir, public_pem=args.key, role=args.role, keys_dir=args.offline_keys
        )
        print(f"{name} revoked: its targets are no longer trusted by devices")
        return 0
    return _status(data_dir, as_json=args.json)


def _status(data_dir: Path, *, as_json: bool) -> int:
    from cloud_sync.platform.tuf.repository import TufRepository

    store = TufRepository(data_dir).store
    ts = store.timestamp()
    snap = store.snapshot(ts)
    root = store.root()
    targets = store.role("targets", snap)
    assert targets is not None
    roles: dict[str, Any] = {
        "root": {"version": root.signed.version, "expires": root.signed.expires.isoformat()},
        "timestamp": {"version": ts.signed.version, "expires": ts.signed.expires.isoformat()},
        "snapshot": {"version": snap.signed.version, "expires": snap.signed.expires.isoformat()},
        "targets": {
            "version": targets.signed.version,
            "expires": targets.signed.expires.isoformat(),
        },
    }
    delegations = targets.signed.delegations
    for role in (delegations.roles or {}).values() if delegations else ():
        md = store.role(role.name, snap)
        roles[role.name] = {
            "version": md.signed.version if md else 0,
            "expires": md.signed.expires.isoformat() if md else None,
            "functions": [p.removesuffix("/*") for p in role.paths or ()],
        }
    if as_json:
        print(json.dumps(roles, indent=2))
        return 0
    for name, info in roles.items():
        extra = f"  {','.join(info['functions'])}" if "functions" in info else ""
        print(f"{name:<28} v{info['version']:<5} expires {info['expires']}{extra}")
    return 0
