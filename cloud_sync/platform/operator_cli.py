"""`edge-cloud operator create NAME` / `edge-cloud operator list`: console accounts.

Works on the platform's data dir directly (like `serve`), so it runs on the platform host and
needs no token: whoever can write the data dir is the platform's administrator anyway. The
password comes from the terminal (asked twice) or, with `--password-stdin`, from the first line
of stdin for scripts; never from an argument, which `ps` and shell history would show.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from pathlib import Path
from typing import Any


def add_parser(sub: Any) -> None:
    from cloud_sync.platform.settings import default_data_dir

    op = sub.add_parser("operator", help="console operator accounts")
    op_sub = op.add_subparsers(dest="operator_command", required=True)
    for name, help_text in (("create", "add an operator account"), ("list", "list accounts")):
        p = op_sub.add_parser(name, help=help_text)
        if name == "create":
            p.add_argument("name")
            p.add_argument("--password-stdin", action="store_true",
                           help="read the password from the first line of stdin")  # fmt: skip
        p.add_argument(
            "--data-dir", type=Path,
            default=Path(os.environ.get("EDGEFN_CLOUD_DATA_DIR", default_data_dir())),
        )  # fmt: skip
        p.add_argument(
            "--database",
            metavar="URL",
            default=os.environ.get("EDGEFN_DATABASE_URL"),
            help="the platform's PostgreSQL (as for serve); default: the data dir",
        )
        p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from cloud_sync.errors import CloudSyncError
    from cloud_sync.platform.operators import OperatorAccounts
    from cloud_sync.platform.settings import PlatformSettings
    from cloud_sync.platform.sql import Databases, refuse_password_in_url

    settings = PlatformSettings(data_dir=args.data_dir, database_url=args.database or None)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    databases = Databases(settings.database_url, settings.data_dir)
    try:
        if settings.database_url:
            refuse_password_in_url(settings.database_url)
        accounts = OperatorAccounts(databases.borrowed() or settings.db_path)
    except CloudSyncError as exc:
        databases.close()
        print(f"edge-cloud: {exc.one_line()}", file=sys.stderr)
        return 2
    try:
        if args.operator_command == "list":
            for name in accounts.names():
                print(name)
            return 0
        if args.password_stdin:
            password = sys.stdin.readline().rstrip("\r\n")
        else:
            password = getpass.getpass("password: ")
            if getpass.getpass("again: ") != password:
                print("edge-cloud: the passwords differ", file=sys.stderr)
                return 2
        accounts.create(args.name, password)
        print(f"operator {args.name} created; log in at <platform URL>/ui/login")
        return 0
    finally:
        accounts.close()
        databases.close()
