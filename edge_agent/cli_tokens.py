"""`edge-agent token create|list|revoke`: the local API's bearer tokens (edge_agent.tokens).

These work on the data dir's token file directly, with or without a running agent; a running
agent picks changes up within 2 s (edge_agent.auth).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from edge_agent.tokens import TokenError, TokenStore

TOKENS_FILE = "tokens.json"  # = Settings.tokens_file, without building a Settings


def add_parser(sub: Any, add_data_dir: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register `token` on the top-level subparsers (`add_data_dir` is the CLI's --data-dir)."""
    tok = sub.add_parser("token", help="bearer tokens for the local API (--auth token)")
    tok_sub = tok.add_subparsers(dest="token_command", required=True)
    create = tok_sub.add_parser("create", help="make a token; it is printed once, last line")
    create.add_argument(
        "--scope",
        action="append",
        required=True,
        help="invoke:NAME, invoke:* or admin (repeatable)",
    )
    create.add_argument("--expires", type=float, metavar="SECONDS", help="lifetime (default: none)")
    create.add_argument(
        "--client-cn",
        metavar="CN",
        help="grant the scopes to client certificates with this subject CN (auth = mtls) "
        "instead of making a token",
    )
    add_data_dir(create)
    lst = tok_sub.add_parser("list", help="token ids, scopes and expiry (never the tokens)")
    lst.add_argument("--json", action="store_true")
    add_data_dir(lst)
    rev = tok_sub.add_parser("revoke", help="revoke a token by id")
    rev.add_argument("id")
    add_data_dir(rev)


def _when(ts: float | None) -> str:
    if ts is None:
        return "never"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def cmd_token(args: argparse.Namespace) -> int:
    store = TokenStore(args.data_dir / TOKENS_FILE)
    try:
        if args.token_command == "create":
            if args.expires is not None and args.expires <= 0:
                print("edge-agent: --expires must be > 0 seconds", file=sys.stderr)
                return 2
            expires_at = time.time() + args.expires if args.expires is not None else None
            if args.client_cn:
                grant = store.grant_certificate(args.client_cn, args.scope, expires_at=expires_at)
                print(
                    f"granted {' '.join(grant.scopes)} to client certificates with "
                    f"CN={grant.client_cn} (id {grant.id}), expires {_when(grant.expires_at)}"
                )
                return 0
            record, token = store.create(args.scope, expires_at=expires_at)
            print(
                f"created token {record.id}: scopes {' '.join(record.scopes)}, expires "
                f"{_when(record.expires_at)}"
            )
            print(
                "This is the only time the token is shown; clients send it as "
                "'Authorization: Bearer TOKEN':"
            )
            print(token)
        elif args.token_command == "revoke":
            record = store.revoke(args.id)
            print(f"revoked token {record.id} ({' '.join(record.scopes)})")
        else:
            records = store.read()
            if args.json:
                print(json.dumps([r.public() for r in records], indent=2))
                return 0
            now = time.time()
            for r in records:
                state = " (expired)" if r.expired(now) else ""
                who = f"  CN={r.client_cn}" if r.client_cn else ""
                who += "  (from the platform)" if r.source == "platform" else ""
                print(f"{r.id}  expires {_when(r.expires_at)}{state}  {' '.join(r.scopes)}{who}")
    except TokenError as exc:
        print(f"edge-agent: token {args.token_command} refused: {exc.message}", file=sys.stderr)
        return 1
    return 0
