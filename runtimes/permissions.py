"""The manifest's `[permissions]` table: what building blocks a function may use.

Pure code. Least privilege: a function without the table may use none of them (only `config()`,
which reads what the platform already gave this very function). Example::

    [permissions]
    invoke = ["eta-node"]            # functions it may call
    publish = ["traffic/#"]          # MQTT-style topic filters it may publish on
    state = { max_bytes = 1048576 }  # its own key-value store, bounded in bytes
    secrets = ["maps-api-key"]       # secret names it may read

The checks themselves are made by the agent's capability broker (`edge_agent.capabilities`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from runtimes.errors import ManifestError

# A state store larger than this is a database, not function state: 64 MiB keeps one
# function from filling a gateway's flash.
MAX_STATE_BYTES = 64 * 1024 * 1024
_TOPIC_RE = re.compile(r"^[A-Za-z0-9_./+#-]{1,200}$")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_KEYS = {"invoke", "publish", "state", "secrets"}


@dataclass(frozen=True, slots=True)
class Permissions:
    invoke: tuple[str, ...] = ()
    publish: tuple[str, ...] = ()  # topic filters, `+` one level, `#` the rest
    state_max_bytes: int = 0  # 0: no state store
    state_keep_on_switch: bool = True  # false: a new version starts with empty state
    secrets: tuple[str, ...] = ()

    def may_invoke(self, function: str) -> bool:
        return function in self.invoke

    def may_publish(self, topic: str) -> bool:
        return any(topic_matches(f, topic) for f in self.publish)


def topic_matches(pattern: str, topic: str) -> bool:
    """MQTT filter semantics: `+` matches one level, a trailing `#` matches the rest."""
    pat = pattern.split("/")
    top = topic.split("/")
    for i, part in enumerate(pat):
        if part == "#":
            return True
        if i >= len(top):
            return False
        if part != "+" and part != top[i]:
            return False
    return len(pat) == len(top)


def valid_topic(topic: str) -> bool:
    """A topic a function publishes on: no wildcards, no empty levels."""
    return (
        bool(_TOPIC_RE.match(topic))
        and "+" not in topic
        and "#" not in topic
        and ("" not in topic.split("/"))
    )


def _names(where: str, value: Any, key: str, pattern: re.Pattern[str]) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ManifestError(f"{where}: field '{key}' must be a list of strings")
    for v in value:
        if not pattern.match(v):
            raise ManifestError(f"{where}: field '{key}' has an invalid entry {v!r}")
    return tuple(value)


def parse_permissions(table: Any, where: str) -> Permissions:
    """Validate `[permissions]` (None: the table is absent)."""
    if table is None:
        return Permissions()
    w = f"{where} [permissions]"
    if not isinstance(table, Mapping):
        raise ManifestError(f"{where}: 'permissions' must be a table")
    unknown = set(table) - _KEYS
    if unknown:
        raise ManifestError(f"{w}: unknown field(s) {', '.join(sorted(unknown))}")
    publish = _names(w, table.get("publish", []), "publish", _TOPIC_RE)
    for f in publish:
        if ("#" in f and not (f == "#" or f.endswith("/#"))) or f.count("#") > 1:
            raise ManifestError(f"{w}: '#' may only end a publish filter, got {f!r}")
    state = table.get("state", {})
    if not isinstance(state, Mapping) or set(state) - {"max_bytes", "keep_on_switch"}:
        raise ManifestError(f"{w}: 'state' must be a table with 'max_bytes' (and 'keep_on_switch')")
    max_bytes = state.get("max_bytes", 0)
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int):
        raise ManifestError(f"{w}: field 'state.max_bytes' must be an integer")
    if not 0 <= max_bytes <= MAX_STATE_BYTES:
        raise ManifestError(f"{w}: 'state.max_bytes' must be between 0 and {MAX_STATE_BYTES}")
    keep = state.get("keep_on_switch", True)
    if not isinstance(keep, bool):
        raise ManifestError(f"{w}: field 'state.keep_on_switch' must be true or false")
    return Permissions(
        invoke=_names(w, table.get("invoke", []), "invoke", _NAME_RE),
        publish=publish,
        state_max_bytes=max_bytes,
        state_keep_on_switch=keep,
        secrets=_names(w, table.get("secrets", []), "secrets", _NAME_RE),
    )


def valid_secret_name(name: str) -> bool:
    """A name `[permissions] secrets` may list, and so a name a secret may have on the platform."""
    return isinstance(name, str) and bool(_NAME_RE.match(name))
