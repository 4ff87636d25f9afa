"""`edge-cloud fn publish BUNDLE --platform URL [--token T | --data-dir D] [--key KEY]`: upload.

With `--key` (the publisher's private key, the one that signed the bundle) and a platform that
serves TUF metadata, the key also signs the next version of its delegated TUF role with this
bundle's target in it (`cloud_sync.platform.tuf.publisher`); such a platform refuses a publish
without it (`tuf_signature_required`).

The registry answers 201 for a new bundle and 200 when the same bytes (same digest) are already
published: publishing a reproducible build again is a no-op, not an error. A different bundle
for a published version is refused (versions are immutable).

The platform is reached like every operator command reaches it (`operator_client`): the same
token lookup and, with `--data-dir` and an https URL, HTTPS checked against the platform's CA.
The file is streamed, not read into memory.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from cloud_sync.author.output import EXIT_ERROR, EXIT_UNREACHABLE, EXIT_USAGE, fail, say

if TYPE_CHECKING:
    from cloud_sync.http_client import SyncHttpClient

# A bundle is at most a few hundred MB; five minutes covers a slow uplink, not a dead one.
PUBLISH_TIMEOUT_S = 300.0
# A TUF role signed against a version another publish just replaced is re-signed this often.
ROLE_ATTEMPTS = 5


def _tuf_headers(client: SyncHttpClient, key_file: Path, bundle: Path) -> dict[str, str]:
    """The signed role claim when the platform serves TUF; none when it does not."""
    from cloud_sync.platform.tuf.publisher import make_claim, tuf_enabled
    from runtimes.signing import load_private_key

    if not tuf_enabled(client):
        return {}
    return make_claim(client, load_private_key(key_file), bundle).headers()


def cmd_fn_publish(args: argparse.Namespace) -> int:
    from cloud_sync.errors import CloudSyncError
    from cloud_sync.http_client import BadAnswer, RemoteError, Unreachable
    from cloud_sync.platform.operator_client import operator_client
    from cloud_sync.platform.registry import BUNDLE_MEDIA_TYPE

    try:
        client = operator_client(args, timeout_s=PUBLISH_TIMEOUT_S)
    except CloudSyncError as exc:  # no token, unreadable token file
        return fail(exc.message, EXIT_USAGE)
    try:
        size = args.bundle.stat().st_size
        f = open(args.bundle, "rb")  # noqa: SIM115 - closed below, after the request
    except OSError as exc:
        return fail(f"cannot read {args.bundle}: {exc.strerror}", EXIT_USAGE)
    headers = {"Content-Type": BUNDLE_MEDIA_TYPE, "Content-Length": str(size)}
    say(f"publishing {args.bundle} ({size} bytes) to {client.endpoint.base_url}")
    try:
        with f:
            for attempt in range(ROLE_ATTEMPTS):
                if args.key is not None:  # TUF: the key signs its role's next version
                    headers.update(_tuf_headers(client, args.key, args.bundle))
                f.seek(0)
                try:
                    status, doc = client.call(
                        "POST", "/v1/registry/bundles", data=f, headers=headers
                    )
                    break
                except RemoteError as exc:  # another publish by this key won: sign again
                    if exc.code != "tuf_role_conflict" or attempt + 1 == ROLE_ATTEMPTS:
                        raise
    except RemoteError as exc:
        return fail(f"publish refused: {exc.message}", EXIT_ERROR)
    except Unreachable as exc:  # refused, DNS, TLS (an untrusted certificate), timeout
        return fail(exc.one_line(), EXIT_UNREACHABLE)
    except BadAnswer as exc:
        return fail(exc.one_line(), EXIT_ERROR)
    except CloudSyncError as exc:  # a CA file that cannot be used, and the like
        return fail(exc.one_line(), EXIT_USAGE)
    from cloud_sync.author.build import arch_label

    what = "published" if status == 201 else "already published (same digest)"
    arches = arch_label(tuple(doc.get("arches") or ()))
    say(f"{what}: {doc['name']}@{doc['version']} {doc['digest']} ({doc['size']} bytes, {arches})")
    return 0
