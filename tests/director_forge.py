"""Crafting director instructions in tests: signed with the platform's own key (what a test
that plays the platform needs, and the "captured, since expired" attack), or with any other key
(the forgery). The envelope format is `cloud_sync.director_check`'s."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud_sync.director_check import ENVELOPE_TYPE, canonical, key_id
from cloud_sync.platform.director import load_director_key

# Above any counter the platform hands out in one test, so a crafted instruction is "newer".
HIGH_COUNTER = 1_000_000


def envelope(
    key: Ed25519PrivateKey,
    device: str,
    document: dict[str, Any],
    *,
    counter: int = HIGH_COUNTER,
    expires_in_s: float = 3600.0,
    targets: dict[str, Any] | None = None,
) -> dict[str, Any]:
    now = int(time.time())
    signed = {
        "_type": ENVELOPE_TYPE,
        "device": device,
        "counter": counter,
        "issued": now,
        "expires": int(now + expires_in_s),
        "document": document,
        "targets": targets or {},
    }
    sig = base64.b64encode(key.sign(canonical(signed))).decode()
    return {"signed": signed, "signatures": [{"keyid": key_id(key.public_key()), "sig": sig}]}


def as_platform(data_dir: Path, device: str, document: dict[str, Any], **kw: Any) -> bytes:
    """An instruction signed with the director key in the platform's data dir, as MQTT bytes."""
    return json.dumps(envelope(load_director_key(data_dir), device, document, **kw)).encode()
