"""`edge-cloud keys create`: a publisher's Ed25519 signing key pair (FILE 0600, FILE.pub)."""

from __future__ import annotations

import argparse

from cloud_sync.author.output import EXIT_USAGE, fail, say


def cmd_keys(args: argparse.Namespace) -> int:
    from runtimes.errors import BundleError
    from runtimes.signing import create_keypair

    try:
        files = create_keypair(args.out)
    except (BundleError, OSError) as exc:
        return fail(getattr(exc, "message", str(exc)), EXIT_USAGE)
    say(f"private key: {files.private} (mode 0600; keep it secret)")
    say(f"public key:  {files.public} (give it to devices: edge-agent trust add)")
    say(f"key id:      {files.key_id}")
    return 0
