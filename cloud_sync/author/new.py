"""`edge-cloud fn new NAME --runtime cpp|go|node`: scaffold a function (templates: `scaffold`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cloud_sync.author.output import EXIT_USAGE, fail, say


def cmd_fn_new(args: argparse.Namespace) -> int:
    from cloud_sync.author.scaffold import scaffold
    from runtimes.errors import ManifestError

    directory = args.dir or Path(args.name)
    try:
        files = scaffold(args.name, args.runtime, directory)
    except (ManifestError, OSError) as exc:
        return fail(getattr(exc, "message", str(exc)), EXIT_USAGE)
    for f in files:
        say(f"created {f}")
    say(f"next: edge-cloud fn test {directory} && edge-cloud fn build {directory} --key KEY")
    return 0
