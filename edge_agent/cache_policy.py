"""Per-function cache policy and cache-key derivation: pure values, no I/O.

Flow: the manifest's `[cache]` table (kept verbatim in `Manifest.extra["cache"]`) is parsed once,
when a function version is loaded, into a frozen `CachePolicy` (`parse_cache_policy`). For every
request the router asks the policy for a `CacheKey` (`CachePolicy.key_for`), built from the
function name, the version (or the function's declared cache epoch) and a sha256 digest of the
request parts the policy names. `edge_agent.cache.ResultCache` stores and finds entries by that key.

The digest input is a canonical, length-prefixed encoding, so no two different requests can
produce the same byte string: ("ab", "c") and ("a", "bc") differ, an absent header differs from an
empty one, and the order in which a client sends headers or query parameters does not matter
(header names are lowercased and sorted, query names sorted; repeated values keep their order,
because for a repeated parameter the order is part of its meaning).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from runtimes.errors import ManifestError

# RFC 9110 section 5.1: a field name is a token. Anything else can never match a real header, so
# it is almost certainly a typo in the manifest.
HEADER_NAME_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# The epoch is part of the stored key and of log lines: a short, boring alphabet.
EPOCH_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# Longer than any sane cache lifetime; catches milliseconds written where seconds are meant.
MAX_TTL_S = 365 * 24 * 3600.0
# Bounds the work per request (one comparison per selected name) and the manifest's size.
MAX_KEY_NAMES = 32

_CACHE_KEYS = frozenset({"enabled", "ttl_s", "stale_if_error_s", "key", "epoch"})
_KEY_KEYS = frozenset({"body", "headers", "query"})
# Bumping this changes every digest, i.e. empties every cache: only for a change of encoding.
_DIGEST_DOMAIN = b"edgefn-cache-key/1"

Pairs = Mapping[str, str] | Iterable[tuple[str, str]]


def _prefix_hash(*parts: bytes) -> hashlib._Hash:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h


# The digest state after the parts every body-only key starts with; `key_for` copies it.
_BODY_PREFIX = _prefix_hash(_DIGEST_DOMAIN, b"body")


@dataclass(frozen=True, slots=True)
class CacheKey:
    """Where one cached result lives. `id` is the primary key in the cache table."""

    function: str
    scope: str  # "v=<version>" or "e=<epoch>": what invalidation compares
    digest: str  # sha256 hex of the canonical key parts

    @property
    def id(self) -> str:
        # Unambiguous: function names cannot contain '/', versions and epochs neither.
        return f"{self.function}/{self.scope}/{self.digest}"


@dataclass(frozen=True, slots=True)
class CachePolicy:
    """What the function's author declared in `[cache]`. Disabled unless they opted in."""

    enabled: bool = False
    ttl_s: float = 0.0
    stale_if_error_s: float = 0.0
    key_body: bool = True
    key_headers: tuple[str, ...] = ()  # lowercased, sorted, unique
    key_query: tuple[str, ...] = ()  # sorted, unique, case-sensitive (as URLs are)
    epoch: str | None = None

    def scope(self, version: str) -> str:
        """The key's version part: the epoch, when declared, so a new version keeps the cache."""
        return f"e={self.epoch}" if self.epoch is not None else f"v={version}"

    def key_for(
        self,
        function: str,
        version: str,
        body: bytes = b"",
        headers: Pairs = (),
        query: Pairs = (),
    ) -> CacheKey:
        """The key of one request. `headers`/`query` may be multi-dicts (aiohttp's
        CIMultiDictProxy, MultiDictProxy): every value of a repeated name counts."""
        if self.key_body and not self.key_headers and not self.key_query:
            # The common policy (body only): continue a hash of the constant prefix instead of
            # building the parts list; same bytes, same digest (tests/test_cache_policy.py).
            h = _BODY_PREFIX.copy()
            h.update(len(body).to_bytes(8, "big"))
            h.update(body)
            return CacheKey(function, self.scope(version), h.hexdigest())
        parts: list[bytes] = [_DIGEST_DOMAIN]
        if self.key_body:
            parts += [b"body", bytes(body)]
        else:
            parts.append(b"-")
        if self.key_headers:
            parts.append(b"headers")
            _add_selected(parts, _pairs(headers), self.key_headers, fold_case=True)
        if self.key_query:
            parts.append(b"query")
            _add_selected(parts, _pairs(query), self.key_query, fold_case=False)
        h = hashlib.sha256()
        for part in parts:
            h.update(len(part).to_bytes(8, "big"))
            h.update(part)
        return CacheKey(function=function, scope=self.scope(version), digest=h.hexdigest())


def _pairs(values: Pairs) -> Iterable[tuple[str, str]]:
    # Mapping.items() of a multi-dict yields every (name, value), duplicates included.
    return values.items() if isinstance(values, Mapping) else values


def _enc(text: str) -> bytes:
    # HTTP servers hand over undecodable header bytes as surrogate escapes; keep them distinct.
    return text.encode("utf-8", "surrogateescape")


def _add_selected(
    parts: list[bytes], pairs: Iterable[tuple[str, str]], names: tuple[str, ...], fold_case: bool
) -> None:
    wanted = set(names)
    found: dict[str, list[str]] = {}
    for name, value in pairs:
        n = name.lower() if fold_case else name
        if n in wanted:
            found.setdefault(n, []).append(value)
    for n in names:  # already sorted: the client's order does not matter
        values = found.get(n, [])
        parts.append(_enc(n))
        parts.append(len(values).to_bytes(4, "big"))  # 0 = absent, distinct from ""
        parts.extend(_enc(v) for v in values)


def _number(where: str, table: Mapping[str, Any], key: str, positive: bool) -> float:
    value = table[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ManifestError(f"{where}: field '{key}' must be a number of seconds, got {value!r}")
    if positive and value <= 0:
        raise ManifestError(f"{where}: field '{key}' must be greater than 0, got {value!r}")
    if value < 0:
        raise ManifestError(f"{where}: field '{key}' must be 0 or more, got {value!r}")
    if value > MAX_TTL_S:
        raise ManifestError(
            f"{where}: field '{key}' must be at most {int(MAX_TTL_S)} seconds, got {value!r}"
        )
    return float(value)


def _names(where: str, table: Mapping[str, Any], key: str, header: bool) -> tuple[str, ...]:
    value = table.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ManifestError(f"{where}: field '{key}' must be a list of non-empty strings")
    if len(value) > MAX_KEY_NAMES:
        raise ManifestError(f"{where}: field '{key}' lists more than {MAX_KEY_NAMES} names")
    if header:
        for v in value:
            if not HEADER_NAME_RE.match(v):
                raise ManifestError(f"{where}: field '{key}': {v!r} is not a valid header name")
        value = [v.lower() for v in value]
    return tuple(sorted(set(value)))


def _unknown(where: str, table: Mapping[str, Any], allowed: frozenset[str]) -> None:
    # Refusing unknown fields is deliberate: an ignored field (a typo of `ttl_s`, or a future
    # `vary` field an old agent does not know) could make the cache answer one client with
    # another client's result. Failing the load is the safe direction.
    extra = sorted(set(table) - allowed)
    if extra:
        raise ManifestError(
            f"{where}: unknown field '{extra[0]}' (known: {', '.join(sorted(allowed))})"
        )


def parse_cache_policy(table: object, where: str = "edgefn.toml") -> CachePolicy:
    """Validate a manifest's `[cache]` table (None or absent = caching off).

    `where` names the manifest in error messages, like `runtimes.manifest.parse_manifest`.
    """
    if table is None:
        return CachePolicy()
    cw = f"{where} [cache]"
    if not isinstance(table, Mapping):
        raise ManifestError(f"{where}: 'cache' must be a table")
    _unknown(cw, table, _CACHE_KEYS)
    enabled = table.get("enabled", False)
    if not isinstance(enabled, bool):
        raise ManifestError(f"{cw}: field 'enabled' must be true or false, got {enabled!r}")
    if "ttl_s" in table:
        ttl_s = _number(cw, table, "ttl_s", positive=True)
    elif enabled:
        raise ManifestError(f"{cw}: required field 'ttl_s' is missing (caching is enabled)")
    else:
        ttl_s = 0.0
    stale = _number(cw, table, "stale_if_error_s", False) if "stale_if_error_s" in table else 0.0
    epoch = table.get("epoch")
    if epoch is not None and (not isinstance(epoch, str) or not EPOCH_RE.match(epoch)):
        raise ManifestError(
            f"{cw}: field 'epoch' must be a string matching {EPOCH_RE.pattern}, got {epoch!r}"
        )
    key_t = table.get("key", {})
    kw = f"{where} [cache.key]"
    if not isinstance(key_t, Mapping):
        raise ManifestError(f"{cw}: field 'key' must be a table ([cache.key])")
    _unknown(kw, key_t, _KEY_KEYS)
    body = key_t.get("body", True)
    if not isinstance(body, bool):
        raise ManifestError(f"{kw}: field 'body' must be true or false, got {body!r}")
    return CachePolicy(
        enabled=enabled,
        ttl_s=ttl_s,
        stale_if_error_s=stale,
        key_body=body,
        key_headers=_names(kw, key_t, "headers", header=True),
        key_query=_names(kw, key_t, "query", header=False),
        epoch=epoch,
    )


def policy_from_manifest(extra: Mapping[str, Any], where: str = "edgefn.toml") -> CachePolicy:
    """Shortcut for `parse_cache_policy(manifest.extra.get("cache"), where)`."""
    return parse_cache_policy(extra.get("cache"), where)
