"""A small TOML writer for the `edgefn.toml` generated from a signed manifest.

tomllib only reads; this writes JSON-like tables so that `tomllib.loads(toml_dumps(t)) == t`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from runtimes.bundle.layout import fail
from runtimes.manifest import MANIFEST_NAME

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}
_INT64 = (-(1 << 63), (1 << 63) - 1)


def _toml_str(s: str, where: str) -> str:
    out = ['"']
    for ch in s:
        o = ord(ch)
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif o < 0x20 or o == 0x7F:
            out.append(f"\\u{o:04x}")
        elif 0xD800 <= o <= 0xDFFF:
            raise fail("malformed_bundle", f"{where}: lone surrogate in string {s!r}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _toml_key(k: str, where: str) -> str:
    return k if _BARE_KEY.match(k) else _toml_str(k, where)


def _toml_value(v: Any, where: str) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        if not _INT64[0] <= v <= _INT64[1]:
            raise fail("malformed_bundle", f"{where}: integer {v} does not fit TOML's 64 bits")
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise fail("malformed_bundle", f"{where}: non-finite number")
        return repr(v)
    if isinstance(v, str):
        return _toml_str(v, where)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x, where) for x in v) + "]"
    if isinstance(v, dict):
        items = (f"{_toml_key(k, where)} = {_toml_value(x, where)}" for k, x in sorted(v.items()))
        return "{" + ", ".join(items) + "}"
    raise fail("malformed_bundle", f"{where}: {type(v).__name__} value cannot be written as TOML")


def toml_dumps(table: Mapping[str, Any], where: str = MANIFEST_NAME) -> str:
    """TOML for a JSON-like table (what tomllib gives back equals the input); sorted keys."""
    lines: list[str] = []

    def emit(path: list[str], t: Mapping[str, Any]) -> None:
        subtables = []
        for k in sorted(t):
            v = t[k]
            if isinstance(v, dict):
                subtables.append(k)
            else:
                lines.append(f"{_toml_key(k, where)} = {_toml_value(v, f'{where} {k!r}')}")
        for k in subtables:
            sub = [*path, k]
            lines.append("")
            lines.append("[" + ".".join(_toml_key(p, where) for p in sub) + "]")
            emit(sub, t[k])

    emit([], table)
    return "\n".join(lines).lstrip("\n") + "\n"
