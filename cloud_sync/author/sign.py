"""`edge-cloud fn sign BUNDLE --key FILE [--add] [--out B]`: re-sign, or add a signature.

Replacing makes the key the publisher (the manifest names it, so its bytes change); `--add`
keeps the manifest bytes and every signature, adding one (key rotation: devices trusting either
key accept the bundle). The payload is copied byte for byte by `runtimes.bundle`'s writer, and
the result is verified as a device trusting the key would before the command says "signed".
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
from pathlib import Path

from cloud_sync.author.output import EXIT_ERROR, fail, say


def cmd_fn_sign(args: argparse.Namespace) -> int:
    from runtimes.bundle import (
        BundleManifest,
        canonical_json,
        check_payload,
        parse_signatures,
        read_bundle,
        rewrite_signatures,
        sign_manifest,
    )
    from runtimes.errors import RuntimeErrorBase
    from runtimes.signing import key_id, load_private_key
    from runtimes.verify import Ed25519Verifier

    out: Path = (args.out or args.bundle).absolute()
    try:
        key = load_private_key(args.key)
        raw = read_bundle(args.bundle)
        manifest = BundleManifest.from_bytes(raw.manifest_bytes)
        check_payload(raw, manifest)  # never sign bytes that do not match their manifest
        if args.add:
            manifest_bytes = raw.manifest_bytes
            sigs = {
                kid: base64.b64encode(s).decode()
                for kid, s in parse_signatures(raw.signature_bytes)
            }
            new = json.loads(sign_manifest(manifest_bytes, [key]))["signatures"][0]
            sigs[new["keyid"]] = new["sig"]
            sig_bytes = canonical_json(
                {"signatures": [{"keyid": k, "sig": v} for k, v in sorted(sigs.items())]}
            )
        else:
            manifest_bytes = dataclasses.replace(manifest, publisher=key_id(key)).to_bytes()
            sig_bytes = sign_manifest(manifest_bytes, [key])
        rewrite_signatures(raw, out, manifest_bytes, sig_bytes)
        Ed25519Verifier([key.public_key()]).verify(out)  # what a device trusting the key does
    except RuntimeErrorBase as exc:
        return fail(f"cannot sign {args.bundle}: {exc.message}", EXIT_ERROR)
    except OSError as exc:
        return fail(f"cannot sign {args.bundle}: {exc}", EXIT_ERROR)
    say(f"signed {manifest.name} {manifest.version} with key {key_id(key)}")
    say(str(out))
    return 0
