"""`edge-agent` command line. Each subcommand imports what it needs when it runs, so quick
commands (`invoke`, `functions`) start fast and `run` does not pay for unused features.

Exit status: 0 success; 1 the agent or function answered with an error, or a command failed
with an edgefn error (one line on stderr ending in its stable code, never a traceback); 2 bad
usage or bad local input; 3 the agent could not be reached; 4 the agent could not start.

HTTP calls to the agent go through `cloud_sync.http_client` (the agent CLI may import
cloud_sync; it never imports the platform).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cloud_sync.http_client import HttpClientError, SyncHttpClient

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_STARTUP = 4


def _fail(message: str, code: int) -> int:
    print(f"edge-agent: {message}", file=sys.stderr)
    return code


def _add_data_dir(p: argparse.ArgumentParser) -> None:
    from edge_agent.settings import default_data_dir

    p.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("EDGEFN_DATA_DIR", default_data_dir())),
        help="agent data directory (default: $EDGEFN_DATA_DIR or ~/.local/share/edgefn)",
    )


def build_parser() -> argparse.ArgumentParser:

    parser = argparse.ArgumentParser(prog="edge-agent", description="edgefn edge agent")
    sub = parser.add_subparsers(dest="command", required=True)

    # ---- `run` and its config file live in edge_agent/cli_run.py (issue 14) ----
    from edge_agent import cli_run

    cli_run.add_parser(sub)
    from edge_agent import cli_tokens  # `token create|list|revoke` (issue 14)

    cli_tokens.add_parser(sub, _add_data_dir)

    cache = sub.add_parser("cache", help="result cache maintenance")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True)
    purge = cache_sub.add_parser("purge", help="delete a function's cached results")
    purge.add_argument("name")
    purge.add_argument("--url", help="agent URL (default: from the data dir's agent.json)")
    _add_client_auth(purge)
    _add_data_dir(purge)

    prof = sub.add_parser("profile", help="print this device's hardware profile")
    prof.add_argument("--json", action="store_true")
    prof.add_argument("--label", action="append", default=[], help="device label KEY=VALUE")
    _add_data_dir(prof)

    inv = sub.add_parser(
        "invoke",
        help="invoke a function on a running agent",
        description="Invoke a function on a running agent and write its answer to stdout, "
        "byte for byte. When stdout is a terminal and the answer does not end with a newline, "
        "one is added so the prompt starts on its own line; piped or redirected output is "
        "never changed.",
    )
    inv.add_argument("name")
    inv.add_argument("--data", default="", help="payload text, or @FILE to send a file's bytes")
    inv.add_argument(
        "--content-type",
        default="",
        help="Content-Type of the payload. Default: application/json when --data parses as "
        "a JSON object or array, else application/octet-stream",
    )
    inv.add_argument("--url", help="agent URL (default: from the data dir's agent.json)")
    inv.add_argument("--timeout", type=float, default=60.0, help="client timeout in seconds")
    _add_data_dir(inv)
    from edge_agent import cli_discover  # `discover`, `invoke --discover/--token` (issue 14)

    cli_discover.add_invoke_options(inv)
    cli_discover.add_parser(sub)

    fns = sub.add_parser("functions", help="list functions on a running agent")
    fns.add_argument("--url")
    fns.add_argument("--json", action="store_true")
    _add_client_auth(fns)
    _add_data_dir(fns)
    _add_bundle_commands(sub)
    return parser


def _add_client_auth(p: argparse.ArgumentParser) -> None:
    """`--token`/`--cafile` for commands that call an agent run with --auth token or TLS."""
    p.add_argument(
        "--token",
        default=os.environ.get("EDGEFN_TOKEN"),
        help="bearer token (admin scope for cache purge; default: $EDGEFN_TOKEN)",
    )
    p.add_argument("--cafile", type=Path, help="CA file to pin for an https agent (fleet CA)")


def _agent_url(args: argparse.Namespace) -> str:
    if args.url:
        return str(args.url).rstrip("/")
    state = args.data_dir / "agent.json"
    try:
        return str(json.loads(state.read_bytes())["url"])
    except (OSError, ValueError, KeyError, TypeError):  # a damaged agent.json: the default
        return "http://127.0.0.1:8680"


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


def _client(args: argparse.Namespace, timeout_s: float) -> SyncHttpClient:
    from cloud_sync.http_client import Endpoint, SyncHttpClient

    endpoint = Endpoint(
        _agent_url(args),
        token=getattr(args, "token", None) or "",
        cafile=getattr(args, "cafile", None),
        timeout_s=timeout_s,
        name="the agent",
    )
    return SyncHttpClient(endpoint)


def _guess_content_type(data: bytes) -> str:
    """application/json for a payload that parses as a JSON object or array (documented in
    `invoke --help`); anything else is opaque bytes."""
    if data[:1] in (b"{", b"["):
        try:
            json.loads(data)
            return "application/json"
        except ValueError:
            pass
    return "application/octet-stream"


def _http_failure(exc: HttpClientError) -> int:
    """The one-line message and exit status for a failed call to the agent.

    A refusal's message already names the agent's stable code and the HTTP status.
    """
    from cloud_sync.http_client import RemoteError, Unreachable

    code = EXIT_UNREACHABLE if isinstance(exc, Unreachable) else EXIT_ERROR
    return _fail(exc.message if isinstance(exc, RemoteError) else exc.one_line(), code)


def cmd_invoke(args: argparse.Namespace) -> int:
    from cloud_sync.http_client import HttpClientError

    data: bytes
    if args.data.startswith("@"):
        try:
            data = Path(args.data[1:]).read_bytes()
        except OSError as exc:
            return _fail(f"cannot read {args.data[1:]}: {exc.strerror}", EXIT_USAGE)
    else:
        data = args.data.encode()
    headers = {"Content-Type": args.content_type or _guess_content_type(data)}
    if args.discover or args.token or args.cafile:  # LAN client (edge_agent.cli_discover)
        from edge_agent.cli_discover import invoke_lan

        return invoke_lan(args, "" if args.discover else _agent_url(args), data, headers)
    try:
        resp = _client(args, args.timeout).request(
            "POST", f"/v1/functions/{args.name}/invoke", data=data, headers=headers
        )
        resp.raise_for_status()
    except HttpClientError as exc:
        return _http_failure(exc)
    body = resp.body
    sys.stdout.buffer.write(body)
    # Only for a terminal: piped output must stay the function's exact bytes (binary payloads).
    if sys.stdout.isatty() and not body.endswith(b"\n"):
        sys.stdout.buffer.write(b"\n")
    sys.stdout.flush()
    return 0


def cmd_functions(args: argparse.Namespace) -> int:
    from cloud_sync.http_client import HttpClientError

    try:
        items = _client(args, 10).call("GET", "/v1/functions")[1]["functions"]
    except HttpClientError as exc:
        return _http_failure(exc)
    except (KeyError, TypeError):
        return _fail("the agent answered a function list without 'functions'", EXIT_ERROR)
    if args.json:
        print(json.dumps(items, indent=2))
        return 0
    for item in items:
        status = item.get("status", {})
        line = f"{item['name']:<24} {item.get('version', '-'):<12} {item.get('runtime', '-'):<6} "
        line += f"{status.get('health', '-'):<10} instances={status.get('instances', 0)}"
        if item.get("error"):
            line += f"  error: {item['error']}"
        print(line)
    return 0


def _labels(items: list[str]) -> tuple[tuple[str, str], ...] | None:
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            return None
        out.append((key, value))
    return tuple(out)


def cmd_cache(args: argparse.Namespace) -> int:
    """Purge through the running agent; with no agent running, purge the file directly."""
    from cloud_sync.http_client import HttpClientError, Unreachable

    try:
        purged = _client(args, 30).call("DELETE", f"/v1/cache/{args.name}")[1]["purged"]
    except Unreachable as exc:
        if args.url:
            return _fail(exc.one_line(), EXIT_UNREACHABLE)
        purged = _purge_offline(args.data_dir / "cache.db", args.name)
    except HttpClientError as exc:
        return _http_failure(exc)
    print(f"purged {purged} cached results of {args.name}")
    return 0


def _purge_offline(path: Path, name: str) -> int:
    import asyncio

    from edge_agent.cache import ResultCache

    async def purge() -> int:
        cache = await ResultCache.open(path)
        try:
            return await cache.purge(name)
        finally:
            await cache.close()

    return asyncio.run(purge())


def cmd_profile(args: argparse.Namespace) -> int:
    from hardware.profile import detect, human_text

    labels = _labels(args.label)
    if labels is None:
        return _fail("--label takes KEY=VALUE", EXIT_USAGE)
    profile = detect(args.data_dir, dict(labels))  # an EdgefnError ends in main: one line
    print(json.dumps(profile.to_dict(), indent=2) if args.json else human_text(profile))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import logging

    from edge_agent import logs
    from edge_agent.agent import Agent
    from edge_agent.cli_run import settings_from_args
    from edge_agent.errors import StartupError

    try:  # config file, environment and flags; refused before anything starts (issue 14)
        settings = settings_from_args(args)
    except StartupError as exc:
        return _fail(exc.message, EXIT_STARTUP)
    logs.setup(settings.log_format, settings.log_level)
    try:
        agent = Agent(settings)
        _run_loop(agent.run())
    except StartupError as exc:
        return _fail(exc.one_line(), EXIT_STARTUP)
    # The drain deadline has passed: an in-process C++ call that never returns still holds a
    # thread, and interpreter exit would wait for it forever. Leave now.
    logging.shutdown()
    sys.stdout.flush()
    os._exit(0)


def _run_loop(coro: Any) -> None:
    """uvloop when installed (measured faster on the pipe and HTTP paths), else asyncio."""
    import asyncio

    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(coro)


# ---- signed bundles: fn install|list|rollback, trust add|list|remove (edge_agent/install.py) ----


def _add_bundle_commands(sub: Any) -> None:
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


def _cmd_discover(args: argparse.Namespace) -> int:
    from edge_agent.cli_discover import cmd_discover

    return cmd_discover(args)


def _cmd_token(args: argparse.Namespace) -> int:
    from edge_agent.cli_tokens import cmd_token

    return cmd_token(args)


COMMANDS = {
    "run": cmd_run,
    "invoke": cmd_invoke,
    "functions": cmd_functions,
    "profile": cmd_profile,
    "cache": cmd_cache,
    "fn": cmd_fn,
    "trust": cmd_trust,
    "token": _cmd_token,
    "discover": _cmd_discover,
}


def main(argv: list[str] | None = None) -> int:
    from hardware.errors import EdgefnError

    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except EdgefnError as exc:
        # The one root: whatever a command did not expect still ends as one line with the
        # stable code and the documented status, never as a traceback.
        return _fail(exc.one_line(), EXIT_ERROR)


if __name__ == "__main__":
    sys.exit(main())
