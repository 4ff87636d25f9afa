"""Desired-config edits as `KEY=VALUE` assignments (`edge-cloud config set`): pure, no I/O.

`parse_assignments` reads the pairs, `apply_assignments` applies them to a copy of a config
(dotted paths; null removes a key so the device's local default applies again).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any


def parse_assignments(items: Iterable[str]) -> dict[str, Any]:
    """`KEY=VALUE` pairs; VALUE is JSON when it parses (3, true, null, {...}), else a string."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{item!r}: expected KEY=VALUE")
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        out[key.strip()] = value
    return out


def apply_assignments(config: Mapping[str, Any], sets: Mapping[str, Any]) -> dict[str, Any]:
    """Set dotted paths in a copy of `config`; a null value removes the key (local default)."""
    out: dict[str, Any] = json.loads(json.dumps(dict(config)))
    for path, value in sets.items():
        parts = path.split(".")
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        if value is None:
            node.pop(parts[-1], None)
        else:
            node[parts[-1]] = value
    return _prune(out)


def _prune(node: dict[str, Any]) -> dict[str, Any]:
    for key in list(node):
        if isinstance(node[key], dict):
            _prune(node[key])
            if not node[key]:
                del node[key]
    return node
