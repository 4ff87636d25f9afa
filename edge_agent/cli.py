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

from edge_agent.cli_common import (
    EXIT_ERROR,
    EXIT_STARTUP,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
)
from edge_agent.cli_common import add_data_dir as _add_data_dir
from edge_agent.cli_common import fail as _fail
from edge_agent.cli_fn import add_bundle_commands, cmd_fn, cmd_trust


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
    add_bundle_commands(sub)
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
