"""`edge-cloud` command line: the platform server and the operator's commands.

    edge-cloud serve [--config FILE] [--data-dir D] [--host H] [--port N] [--blobs URL]
                     [--mqtt-port M | --broker URL] [--tls]
                     [--database postgresql://USER@HOST:PORT/DB]  run the platform
    edge-cloud broker config --data-dir D --out DIR [--port N]  Mosquitto config, ACL, certs
    edge-cloud device enroll ID --out FILE [--labels k=v,...]   device credentials file
    edge-cloud device config ID --set KEY=VALUE ...             change desired config (live)
    edge-cloud device revoke ID                                 revoke certificate and token
    edge-cloud group config NAME --set KEY=VALUE ...            a group's desired config
    edge-cloud devices [--json]                                 the fleet: online, versions
    edge-cloud metrics ID [--function F] [--json]               stored metrics of a device
    edge-cloud events ID [--function F] [--json]                what its functions published
    edge-cloud keys ... / fn new|test|build|sign|publish ...    the author's toolchain:
                                                                see cloud_sync/author/cli.py
    edge-cloud simulate --devices N --platform URL [--fault F]  simulated fleet (loopback)
    edge-cloud rollout start NAME@VERSION --target SEL ...      fleet rollouts: start, status,
                                                                list, pause, resume, abort
                                                                (cloud_sync/platform/rollout_cli.py)
    edge-cloud tuf init|rotate-root|add-publisher|revoke-publisher|status --data-dir D
                                                                the TUF repository
                                                                (cloud_sync/platform/tuf/cli.py)

Each subcommand imports what it needs when it runs. Exit status: 0 success; 1 refused or failed
(one line on stderr says why, ending in the stable code; an edgefn error no command expected
ends the same way, never as a traceback); 2 bad usage or bad local input; 3 the platform was
unreachable. Operator commands reach the platform through `operator_client`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from cloud_sync.platform import events_cli, operator_cli, secrets_cli, serve_cli, simulator_cli
from cloud_sync.platform.cli_exit import EXIT_ERROR, EXIT_UNREACHABLE, EXIT_USAGE
from cloud_sync.platform.cli_exit import fail as _fail


def _say(line: str) -> None:
    print(line, flush=True)


def build_parser() -> argparse.ArgumentParser:

    parser = argparse.ArgumentParser(prog="edge-cloud", description="edgefn cloud platform")
    sub = parser.add_subparsers(dest="command", required=True)

    serve_cli.add_parser(sub)

    broker = sub.add_parser("broker", help="external broker setup")
    broker_sub = broker.add_subparsers(dest="broker_command", required=True)
    bc = broker_sub.add_parser("config", help="write mosquitto.conf, ACL, CA, server cert, CRL")
    bc.add_argument("--data-dir", type=Path, required=True, help="platform data dir (its CA)")
    bc.add_argument("--out", type=Path, required=True)
    bc.add_argument("--port", type=int, default=8883)
    bc.add_argument("--listen", default="127.0.0.1", help="address to listen on ('' = all)")
    bc.add_argument("--hostname", action="append", default=[], help="name in the server cert")
    bc.add_argument("--no-persistence", action="store_true")

    def operator_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--platform", help="platform URL (default: from --data-dir)")
        p.add_argument("--token", help="operator token (default: $EDGEFN_TOKEN)")
        p.add_argument("--data-dir", type=Path, help="platform data dir on this host")

    device = sub.add_parser("device", help="one device: enroll, config, revoke")
    device_sub = device.add_subparsers(dest="device_command", required=True)
    de = device_sub.add_parser("enroll", help="issue a device's credentials file")
    de.add_argument("id")
    de.add_argument("--out", type=Path, required=True, help="credentials file to write (0600)")
    de.add_argument("--labels", default="", help="k=v,k=v (group=NAME joins a group)")
    de.add_argument(
        "--san",
        action="append",
        default=[],
        metavar="NAME_OR_IP",
        help="also name this in the device's LAN server certificate (repeatable; the device id "
        "is always named): the addresses LAN clients dial",
    )
    operator_args(de)
    dc = device_sub.add_parser("config", help="set desired config keys (dotted paths)")
    dc.add_argument("id")
    dc.add_argument("--set", action="append", required=True, metavar="KEY=VALUE")
    operator_args(dc)
    dr = device_sub.add_parser("revoke", help="revoke the device's certificate and token")
    dr.add_argument("id")
    operator_args(dr)
    group = sub.add_parser("group", help="group desired config")
    group_sub = group.add_subparsers(dest="group_command", required=True)
    gc = group_sub.add_parser("config", help="set desired config keys of a group")
    gc.add_argument("name")
    gc.add_argument("--set", action="append", required=True, metavar="KEY=VALUE")
    operator_args(gc)
    devs = sub.add_parser("devices", help="list devices")
    devs.add_argument("--json", action="store_true")
    operator_args(devs)
    met = sub.add_parser("metrics", help="a device's stored metrics")
    met.add_argument("id")
    met.add_argument("--function")
    met.add_argument("--json", action="store_true")
    operator_args(met)
    events_cli.add_parser(sub, operator_args)
    secrets_cli.add_parser(sub, operator_args, _api)

    from cloud_sync.author.cli import register

    register(sub)  # keys, fn: the author's toolchain (cloud_sync/author), handler in args
    simulator_cli.add_parser(sub)
    operator_cli.add_parser(sub)  # operator create/list: console accounts
    from cloud_sync.platform import rollout_cli

    rollout_cli.register(sub)  # rollout start|status|list|pause|resume|abort, handler in args
    from cloud_sync.platform.tuf import cli as tuf_cli

    tuf_cli.register(sub)  # tuf init|rotate-root|add-publisher|revoke-publisher|status
    return parser


# ---- fleet: broker config, device, group, devices, metrics -------------------------------------

FLEET_TIMEOUT_S = 30.0


def cmd_broker(args: argparse.Namespace) -> int:
    from cloud_sync.errors import CloudSyncError
    from cloud_sync.platform.broker_config import write_broker_files
    from cloud_sync.platform.pki import PlatformCA

    try:
        ca = PlatformCA.load_or_create(args.data_dir)
        files = write_broker_files(
            ca,
            args.out,
            port=args.port,
            host=args.listen or None,
            hostnames=args.hostname or ["localhost"],
            persistence=not args.no_persistence,
        )
    except (CloudSyncError, OSError, ValueError) as exc:
        return _fail(_reason(exc), EXIT_USAGE)
    _say(f"wrote {files.config}, {files.acl}, {files.cafile}, {files.certfile}, {files.crlfile}")
    _say(f"run: mosquitto -c {files.config}")
    _say(
        f"then: edge-cloud serve --data-dir {args.data_dir} --broker mqtts://localhost:{args.port}"
    )
    return 0


def _reason(exc: Exception) -> str:
    """An edgefn error with its stable code; a foreign one (OSError...) as it reads."""
    from hardware.errors import EdgefnError

    return exc.one_line() if isinstance(exc, EdgefnError) else str(exc)


def _platform_url(args: argparse.Namespace) -> str | None:
    from cloud_sync.platform.operator_client import platform_url

    return platform_url(args)


def _api(
    args: argparse.Namespace, method: str, path: str, body: Any = None
) -> tuple[int, Any] | int:
    """Call the platform as the operator: (status, JSON) or an exit code after printing why."""
    from cloud_sync.errors import CloudSyncError
    from cloud_sync.http_client import BadAnswer, RemoteError, Unreachable
    from cloud_sync.platform.operator_client import operator_client

    try:
        client = operator_client(args, timeout_s=FLEET_TIMEOUT_S)
        return client.call(method, path, body)
    except RemoteError as exc:
        return _fail(f"refused: {exc.message}", EXIT_ERROR)
    except Unreachable as exc:
        return _fail(exc.one_line(), EXIT_UNREACHABLE)
    except BadAnswer as exc:
        return _fail(exc.one_line(), EXIT_ERROR)
    except CloudSyncError as exc:  # OperatorSetupError (no URL/token), unreadable token file
        return _fail(exc.one_line(), EXIT_USAGE)


def _parse_labels(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--labels: {item!r} is not k=v")
        out[key] = value
    return out


def cmd_device(args: argparse.Namespace) -> int:
    from urllib.parse import quote

    from cloud_sync.credentials import from_dict, server_cert_paths
    from cloud_sync.errors import CloudSyncError
    from runtimes.fsio import atomic_write

    if args.device_command == "enroll":
        try:
            labels = _parse_labels(args.labels)
        except ValueError as exc:
            return _fail(str(exc), EXIT_USAGE)
        body = {"id": args.id, "labels": labels, "san": args.san}
        got = _api(args, "POST", "/v1/devices", body)
        if isinstance(got, int):
            return got
        doc = got[1]
        # The LAN server certificate goes in files of its own beside the credentials: the
        # listener loads PEM files, and the credentials file stays what sync reads.
        server = (doc.pop("server_cert_pem", None), doc.pop("server_key_pem", None))
        cert_path, key_path = server_cert_paths(args.out)
        try:
            from_dict(doc, "credentials from the platform")
            atomic_write(args.out, json.dumps(doc, indent=2).encode() + b"\n", mode=0o600)
            if server[0] and server[1]:
                atomic_write(key_path, server[1].encode(), mode=0o600)
                atomic_write(cert_path, server[0].encode(), mode=0o644)
                atomic_write(args.out.with_name("fleet-ca.pem"), doc["ca_pem"].encode(), mode=0o644)
        except (CloudSyncError, OSError) as exc:
            return _fail(_reason(exc), EXIT_ERROR)
        _say(f"enrolled {args.id}: credentials in {args.out} (mode 0600; it holds the key)")
        if server[0]:
            _say(
                f"LAN server certificate in {cert_path} (key {key_path}; `edge-agent run --tls "
                "auto` serves it); LAN clients pin "
                f"{args.out.with_name('fleet-ca.pem')} (--cafile)"
            )
        _say(f"run: edge-agent run --cloud {doc['platform_url']} --credentials {args.out}")
        return 0
    path = f"/v1/devices/{quote(args.id, safe='')}"
    if args.device_command == "revoke":
        got = _api(args, "POST", path + "/revoke", {})
        if isinstance(got, int):
            return got
        _say(f"revoked {args.id} (serial {got[1]['revoked_serial']}); CRL: {got[1]['crl']}")
        _say("an external broker needs the new CRL: copy it and reload (SIGHUP) the broker")
        return 0
    return _set_config(args, path + "/config")


def cmd_group(args: argparse.Namespace) -> int:
    from urllib.parse import quote

    return _set_config(args, f"/v1/groups/{quote(args.name, safe='')}/config")


def _set_config(args: argparse.Namespace, path: str) -> int:
    from cloud_sync.platform.fleet_store import parse_assignments

    try:
        sets = parse_assignments(args.set)
    except ValueError as exc:
        return _fail(str(exc), EXIT_USAGE)
    got = _api(args, "POST", path, {"set": sets})
    if isinstance(got, int):
        return got
    doc = got[1]
    how = "published" if doc.get("published") else "stored (published when the broker is back)"
    _say(f"desired version {doc['version']} {how}: {json.dumps(doc['config'], sort_keys=True)}")
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    got = _api(args, "GET", "/v1/devices")
    if isinstance(got, int):
        return got
    items = got[1]["devices"]
    if args.json:
        print(json.dumps(items, indent=2))
        return 0
    for d in items:
        cv = d["config_version"]
        fns = ",".join(f"{k}@{v}" for k, v in sorted(d["functions"].items())) or "-"
        seen = time.strftime("%H:%M:%S", time.localtime(d["last_seen"])) if d["last_seen"] else "-"
        state = "revoked" if d.get("revoked") else ("online" if d["online"] else "offline")
        print(
            f"{d['id']:<20} {state:<8} seen {seen:<9}"
            f" config {cv['reported']}/{cv['desired']}  {fns}"
        )
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    from urllib.parse import quote, urlencode

    query = f"?{urlencode({'function': args.function})}" if args.function else ""
    got = _api(args, "GET", f"/v1/devices/{quote(args.id, safe='')}/metrics{query}")
    if isinstance(got, int):
        return got
    doc = got[1]
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"{doc['device']}: {doc['records']} metrics records")
    for name, f in sorted(doc["functions"].items()):
        ratio = f["cache_hit_ratio"]
        print(
            f"  {name:<24} invocations={f['invocations']} errors={f['errors']}"
            f" avg={f['latency_ms_avg']} ms cache_hit_ratio={ratio}"
        )
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    return events_cli.run(args, _api)


def cmd_simulate(args: argparse.Namespace) -> int:
    from cloud_sync.platform.operator_client import operator_token

    return simulator_cli.run(args, operator_token(args))


COMMANDS = {
    "serve": serve_cli.cmd_serve,
    "broker": cmd_broker,
    "device": cmd_device,
    "group": cmd_group,
    "devices": cmd_devices,
    "metrics": cmd_metrics,
    "events": cmd_events,
    "simulate": cmd_simulate,
}


def main(argv: list[str] | None = None) -> int:
    from hardware.errors import EdgefnError

    args = build_parser().parse_args(argv)
    handler = getattr(args, "handler", None) or COMMANDS[args.command]
    try:
        return int(handler(args))
    except EdgefnError as exc:
        # The one root: whatever a command did not expect still ends as one line with the
        # stable code and the documented status, never as a traceback.
        return _fail(exc.one_line(), EXIT_ERROR)


if __name__ == "__main__":
    sys.exit(main())
