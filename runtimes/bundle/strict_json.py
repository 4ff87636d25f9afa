"""JSON for signed documents: one canonical byte string per value, and a strict parser.

A signed document must mean one thing to every reader, so the parser refuses what JSON parsers
disagree on (duplicate keys, NaN/Infinity, invalid UTF-8).
"""

from __future__ import annotations

import json
import math
from typing import Any

from runtimes.bundle.layout import fail


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8, no NaN/Infinity: one byte string per value."""
    try:
        text = json.dumps(
            obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
        return text.encode("utf-8")
    except (TypeError, ValueError, UnicodeEncodeError) as exc:
        raise fail("bad_manifest", f"value cannot be stored in a bundle manifest: {exc}") from exc


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            # JSON parsers disagree on which duplicate wins; a signed document must mean one thing.
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number out of range: {text}")
    return value


def _no_constant(text: str) -> Any:
    raise ValueError(f"{text} is not JSON")


def loads_strict(data: bytes, where: str) -> Any:
    """Parse JSON refusing duplicate keys, NaN/Infinity and invalid UTF-8."""
    try:
        return json.loads(
            data.decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_float=_finite,
            parse_constant=_no_constant,
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise fail("malformed_bundle", f"{where}: not valid JSON: {exc}") from exc
