"""`edge-agent fn install|list|rollback` and `edge-agent trust`: signed bundles on this device.

Installs go through `edge_agent.install` (verify before unpack; TUF first where the device's
policy says so, `edge_agent.update_security`); every refusal is one line with its stable code.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from edge_agent.cli_common import EXIT_ERROR, EXIT_UNREACHABLE, EXIT_USAGE
from edge_agent.cli_common import add_data_dir as _add_data_dir
from edge_agent.cli_common import fail as _fail


def _not_running(data_dir: Path) -> dict[str, str]:
    """What the agent running on `data_dir` does not run, with why ({} when none runs).

    Installed is not serving: a full worker budget or a load failure must show in `fn list`.
    Only the agent of this data dir (its agent.json) is asked, briefly; a stale file is no agent.
    """
    from cloud_sync.http_client import Endpoint, HttpClientError, SyncHttpClient

    try:
        url = str(json.loads((data_dir / "agent.json").read_text())["url"])
        client = SyncHttpClient(Endpoint(url, timeout_s=2.0, name="the agent"))
        items = client.call("GET", "/v1/functions")[1]["functions"]
        return {
            str(f["name"]): f"{f['status'].get('state') or f['status']['health']}: {f['error']}"
            for f in items
            if f.get("error") and f.get("status", {}).get("health") in ("waiting", "failed")
        }
    except (OSError, ValueError, KeyError, TypeError, HttpClientError):
        return {}


def add_bundle_commands(sub: Any) -> None:
    from runtimes.bundle import DEFAULT_MAX_BUNDLE_BYTES
    from runtimes.unpack import DEFAULT_LIMITS

    fn = sub.add_parser("fn", help="install, list and roll back signed function bundles")
    fn_sub = fn.add_subparsers(dest="fn_command", required=True)
    ins = fn_sub.add_parser("install", help="install a bundle file or NAME@VERSION from --cloud")
    ins.add_argument("source", help="a bundle file (.efb), or NAME@VERSION / NAME with --cloud")
    ins.add_argument("--cloud", help="registry URL to fetch NAME@VERSION from")
    ins.add_argument("--force-downgrade", action="store_true", help="allow an older version")
    ins.add_argument("--max-bundle-bytes", type=int, default=DEFAULT_MAX_BUNDLE_BYTES)
    ins.add_argument("--max-unpacked-bytes", type=int, default=DEFAULT_LIMITS.max_total_bytes)
    ins.add_argument(
        "--credentials", type=Path, help="the device credentials file (its pinned TUF root)"
    )
    ins.add_argument(
        "--update-security",
        choices=("tuf", "signatures"),
        help="TUF metadata and signatures, or signatures only (default: the config file's, "
        "else tuf when the device has a pinned TUF root)",
    )
    _add_data_dir(ins)
    lst = fn_sub.add_parser("list", help="installed functions and versions")
    lst.add_argument("--json", action="store_true")
    _add_data_dir(lst)
    rb = fn_sub.add_parser("rollback", help="switch back to the previously active version")
    rb.add_argument("name")
    rb.add_argument("--to", metavar="VERSION", help="an installed version (default: previous)")
    _add_data_dir(rb)

    trust = sub.add_parser("trust", help="publisher keys this device accepts bundles from")
    trust_sub = trust.add_subparsers(dest="trust_command", required=True)
    add = trust_sub.add_parser("add", help="trust a publisher's public key (PEM .pub file)")
    add.add_argument("pubfile", type=Path)
    _add_data_dir(add)
    tl = trust_sub.add_parser("list", help="list trusted keys")
    _add_data_dir(tl)
    rm = trust_sub.add_parser("remove", help="stop trusting a key")
    rm.add_argument("key_id")
    _add_data_dir(rm)


def _refused(what: str, exc: Any) -> int:
    """One line on stderr: what was refused, the stable code and the reason."""
    from cloud_sync.registry_client import RegistryUnreachable

    message = " ".join(str(exc.message).split())
    code = EXIT_UNREACHABLE if isinstance(exc, RegistryUnreachable) else EXIT_ERROR
    return _fail(f"{what} refused ({exc.code}): {message}", code)


def cmd_fn(args: argparse.Namespace) -> int:
    import dataclasses

    from edge_agent import install
    from hardware.errors import EdgefnError
    from runtimes.unpack import DEFAULT_LIMITS

    if args.fn_command == "list":
        from edge_agent.update_security import status, status_lines

        items = install.list_installed(args.data_dir)
        idle = _not_running(args.data_dir)
        tuf = status(args.data_dir, items)
        if args.json:
            rows = [{**dataclasses.asdict(i), "not_running": idle.get(i.name)} for i in items]
            if tuf is not None:  # per row, so the list keeps its shape with or without TUF
                for row in rows:
                    row["tuf"] = {
                        k: v for k, v in tuf.items() if k in ("expires", "expired", "error")
                    } | {
                        "not_in_metadata": [
                            u["version"]
                            for u in tuf.get("not_in_metadata", [])
                            if u["name"] == row["name"]
                        ]
                    }
            print(json.dumps(rows, indent=2))
            return 0
        for line in status_lines(tuf):
            print(line)
        for item in items:
            if item.name in idle:
                print(f"{item.name:<24} (installed, not running: {idle[item.name]})")
            if item.development:
                print(f"{item.name:<24} (development copy, unsigned)")
                continue
            for v in item.versions:
                mark = "*" if v.active else " "
                print(f"{item.name:<24} {mark} {v.version:<12} {v.arch:<16} {v.digest[:16]}")
            if not item.versions:
                print(f"{item.name:<24}   (no complete version)")
        return 0
    opts = install.InstallOptions(
        data_dir=args.data_dir.resolve(),
        force_downgrade=getattr(args, "force_downgrade", False),
        say=lambda line: print(line, flush=True),
    )
    try:
        if args.fn_command == "rollback":
            result = install.rollback(args.name, opts, to=args.to)
            print(f"rolled back {result.name} {result.previous} -> {result.version}")
            return 0
        if args.max_bundle_bytes <= 0 or args.max_unpacked_bytes <= 0:
            return _fail("--max-bundle-bytes and --max-unpacked-bytes must be positive", EXIT_USAGE)
        opts = dataclasses.replace(
            opts,
            max_bundle_bytes=args.max_bundle_bytes,
            limits=dataclasses.replace(DEFAULT_LIMITS, max_total_bytes=args.max_unpacked_bytes),
        )
        if args.cloud:
            name, _, version = args.source.partition("@")
            opts = dataclasses.replace(opts, security=_update_policy(args))
            result = install.install_from_registry(args.cloud, name, version or None, opts)
        elif "@" in args.source and not Path(args.source).exists():
            return _fail(f"{args.source}: to install NAME@VERSION pass --cloud URL", EXIT_USAGE)
        else:
            result = install.install_file(Path(args.source), opts)
    except EdgefnError as exc:
        return _refused("rollback" if args.fn_command == "rollback" else "install", exc)
    if result.outcome == "already_installed":
        print(f"{result.name} {result.version} is already installed and active")
    else:
        was = f" (was {result.previous})" if result.previous else ""
        print(f"installed {result.name} {result.version} for {result.arch}{was}; active")
    return 0


def _update_policy(args: argparse.Namespace) -> Any:
    """`--update-security`, else the packaged config file's, else the device's pinned root."""
    from edge_agent import config_file
    from edge_agent.settings import DEFAULT_CONFIG_FILE
    from edge_agent.update_security import resolve

    setting = args.update_security
    if setting is None and DEFAULT_CONFIG_FILE.is_file():
        setting = config_file.load(DEFAULT_CONFIG_FILE).get("update_security")
    return resolve(setting, args.data_dir.resolve(), args.credentials)


def cmd_trust(args: argparse.Namespace) -> int:
    from edge_agent import trust
    from hardware.errors import EdgefnError

    try:
        if args.trust_command == "add":
            key, new = trust.add_key(args.data_dir, args.pubfile)
            print(f"{'trusted' if new else 'already trusted'}: {key.key_id} ({key.path})")
        elif args.trust_command == "remove":
            print(f"removed {trust.remove_key(args.data_dir, args.key_id)}")
        else:
            for key in trust.list_keys(args.data_dir):
                print(f"{key.key_id}  {key.path}")
    except EdgefnError as exc:
        return _refused(f"trust {args.trust_command}", exc)
    return 0
