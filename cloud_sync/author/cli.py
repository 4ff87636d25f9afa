"""The author's commands of `edge-cloud`: `keys` and `fn new/test/build/sign/publish`.

    edge-cloud keys create --out FILE                           Ed25519 signing key + FILE.pub
    edge-cloud fn new NAME --runtime cpp|go|node [--dir PATH]   scaffold a function
    edge-cloud fn test DIR                                      run its tests (real toolchain)
    edge-cloud fn build DIR --key FILE [--out B] [--arch LIST]  compile, pack, sign
    edge-cloud fn sign BUNDLE --key FILE [--add]                re-sign (or add a signature)
    edge-cloud fn publish BUNDLE --platform URL [--token T]     upload to the registry

`register(sub)` adds them to the `edge-cloud` parser (`cloud_sync.platform.cli` calls it);
each parser carries its handler (`args.handler`). One module per step; each imports what it
needs when it runs, so `edge-cloud --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

Handler = Callable[[argparse.Namespace], int]


def _lazy(module: str, name: str) -> Handler:
    def run(args: argparse.Namespace) -> int:
        import importlib

        handler: Handler = getattr(importlib.import_module(module), name)
        return handler(args)

    return run


def register(sub: Any) -> None:
    """Add `keys` and `fn` to an argparse subparsers object; sets `handler` on each command."""
    keys = sub.add_parser("keys", help="signing keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    kc = keys_sub.add_parser("create", help="create an Ed25519 signing key (FILE, FILE.pub)")
    kc.add_argument("--out", type=Path, required=True)
    kc.set_defaults(handler=_lazy("cloud_sync.author.keys", "cmd_keys"))

    fn = sub.add_parser("fn", help="author functions: new, test, build, sign, publish")
    fn_sub = fn.add_subparsers(dest="fn_command", required=True)
    new = fn_sub.add_parser("new", help="scaffold a function whose handler echoes its input")
    new.add_argument("name")
    new.add_argument("--runtime", required=True, choices=("cpp", "go", "node"))
    new.add_argument("--dir", type=Path, help="where (default: ./NAME)")
    new.set_defaults(handler=_lazy("cloud_sync.author.new", "cmd_fn_new"))

    test = fn_sub.add_parser("test", help="run a function's own tests")
    test.add_argument("dir", type=Path)
    test.set_defaults(handler=_lazy("cloud_sync.author.testing", "cmd_fn_test"))

    build = fn_sub.add_parser("build", help="compile, pack and sign a bundle")
    build.add_argument("dir", type=Path)
    build.add_argument("--key", type=Path, required=True, help="private signing key")
    build.add_argument("--out", type=Path, help="bundle path (default: ./NAME-VERSION.efb)")
    build.add_argument(
        "--arch", default="", help="extra target arches, comma separated: x86_64,aarch64,armv7"
    )
    build.set_defaults(handler=_lazy("cloud_sync.author.build", "cmd_fn_build"))

    sign = fn_sub.add_parser("sign", help="re-sign a bundle with another key")
    sign.add_argument("bundle", type=Path)
    sign.add_argument("--key", type=Path, required=True)
    sign.add_argument("--out", type=Path, help="default: replace BUNDLE")
    sign.add_argument(
        "--add", action="store_true", help="add a signature, keep the existing ones (rotation)"
    )
    sign.set_defaults(handler=_lazy("cloud_sync.author.sign", "cmd_fn_sign"))

    pub = fn_sub.add_parser("publish", help="upload a bundle to the registry")
    pub.add_argument("bundle", type=Path)
    pub.add_argument("--platform", required=True, help="platform URL")
    pub.add_argument("--token", help="operator token (default: $EDGEFN_TOKEN)")
    pub.add_argument(
        "--data-dir", type=Path, help="platform data dir on this host: reads its token"
    )
    pub.add_argument(
        "--key", type=Path, help="publisher key: signs its TUF role when the platform has TUF"
    )
    pub.set_defaults(handler=_lazy("cloud_sync.author.publish", "cmd_fn_publish"))


def main(argv: list[str] | None = None) -> int:
    """`python -m cloud_sync.author.cli fn ...`: the author commands alone."""
    parser = argparse.ArgumentParser(prog="edge-cloud", description="edgefn function authoring")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
