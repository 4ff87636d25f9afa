"""`edge-cloud fn publish BUNDLE --platform URL [--token T | --data-dir D]`: upload a bundle.

The registry answers 201 for a new bundle and 200 when the same bytes (same digest) are already
published: publishing a reproducible build again is a no-op, not an error. A different bundle
for a published version is refused (versions are immutable).

The operator token and the error-body wording come from the operator CLI for now
(`cloud_sync.platform.cli`); they move to the shared HTTP client with it.
"""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.request

from cloud_sync.author.output import EXIT_ERROR, EXIT_UNREACHABLE, EXIT_USAGE, fail, say

# A bundle is at most a few hundred MB; five minutes covers a slow uplink, not a dead one.
PUBLISH_TIMEOUT_S = 300.0


def cmd_fn_publish(args: argparse.Namespace) -> int:
    from cloud_sync.errors import CloudSyncError
    from cloud_sync.platform.cli import _http_error, _operator_token
    from cloud_sync.platform.registry import BUNDLE_MEDIA_TYPE

    try:
        token = _operator_token(args)
    except CloudSyncError as exc:
        return fail(exc.message, EXIT_USAGE)
    if token is None:
        return fail(
            "no operator token: pass --token, set EDGEFN_TOKEN, or --data-dir of the platform",
            EXIT_USAGE,
        )
    url = f"{args.platform.rstrip('/')}/v1/registry/bundles"
    try:
        size = args.bundle.stat().st_size
        f = open(args.bundle, "rb")  # noqa: SIM115 - closed below, after the request
    except OSError as exc:
        return fail(f"cannot read {args.bundle}: {exc.strerror}", EXIT_USAGE)
    headers = {
        "Authorization": f"Bearer {token}",
        "Content-Type": BUNDLE_MEDIA_TYPE,
        "Content-Length": str(size),
    }
    req = urllib.request.Request(url, data=f, headers=headers, method="POST")
    say(f"publishing {args.bundle} ({size} bytes) to {args.platform}")
    try:
        with f, urllib.request.urlopen(req, timeout=PUBLISH_TIMEOUT_S) as resp:
            doc = json.loads(resp.read())
            status = resp.status
    except urllib.error.HTTPError as exc:
        return fail(f"publish refused: {_http_error(exc)}", EXIT_ERROR)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return fail(f"cannot reach the platform at {url}: {reason}", EXIT_UNREACHABLE)
    except ValueError:
        return fail(f"the platform at {url} answered garbage", EXIT_ERROR)
    from cloud_sync.author.build import arch_label

    what = "published" if status == 201 else "already published (same digest)"
    arches = arch_label(tuple(doc.get("arches") or ()))
    say(f"{what}: {doc['name']}@{doc['version']} {doc['digest']} ({doc['size']} bytes, {arches})")
    return 0
