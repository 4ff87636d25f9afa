"""Desired and reported state, as pure values: parse, merge, validate, decide.

The flow on the device, for every desired document that arrives (MQTT retained message or HTTP
fallback poll):

1. `parse_desired(payload)` -> `DesiredDoc(version, config)`; an empty payload (a cleared retained
   message) gives `None` and is ignored.
2. The consumer keeps the latest group document and the latest device document and calls
   `ConfigTracker.offer(group_doc, device_doc)`.
3. `offer` compares the version pair with the last pair it saw: the same pair does nothing (a
   redelivered QoS 1 message, a retained message on resubscribe), an older pair is stale, a new
   pair is validated field by field (both documents, then the merged result) and either becomes
   the effective `AgentConfig` or is rejected -- the previous effective config stays in force and
   the `ConfigError` lists every bad field.
4. The agent applies `outcome.config` and publishes `reported_document(...)`.

Merging follows JSON Merge Patch (RFC 7386): the device document wins key by key, tables merge
recursively, and `null` removes a key (falls back to the local default). The schema is what the
agent can change live; see docs/mqtt-topics.md.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from cloud_sync.errors import ConfigError, FieldProblem
from cloud_sync.rollout.errors import MessageError
from cloud_sync.rollout.messages import parse_deployments
from cloud_sync.topics import validate_id
from runtimes.manifest import NAME_RE, SEMVER_RE

Routing = Literal["local", "cloud", "local-then-cloud", "cloud-then-local"]
ROUTINGS: tuple[str, ...] = get_args(Routing)
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

# The same bounds as a manifest's [pool] (runtimes/manifest.py), so the cloud cannot ask a device
# for something a function author could not.
POOL_BOUNDS = {"min_instances": (0, 256), "max_instances": (1, 256), "concurrency": (1, 10_000)}
CACHE_MAX_BYTES_LIMIT = 1 << 50  # 1 PiB: catches unit mistakes (bits, KiB) more than real disks
METRICS_INTERVAL_BOUNDS = (1.0, 86_400.0)  # under 1 s floods the outbox; over a day is useless

_TOP_KEYS = ("functions", "cache", "log_level", "metrics", "deployment")
_FUNCTION_KEYS = ("pool", "routing", "version", "config")
_DEPLOYMENT_KEYS = ("rollouts",)


@dataclass(frozen=True, slots=True)
class DesiredDoc:
    """One desired document: `version` increases with every change the platform makes."""

    version: int
    config: Mapping[str, Any]

    def to_json(self) -> bytes:
        return json.dumps({"version": self.version, "config": self.config}).encode()


def parse_desired(
    payload: bytes | str | Mapping[str, Any], source: str = "desired"
) -> DesiredDoc | None:
    """Decode the envelope `{"version": int, "config": {...}}`; config fields are checked later."""
    if isinstance(payload, bytes | str):
        if len(payload) == 0:
            return None
        try:
            data = json.loads(payload)
        except (UnicodeDecodeError, ValueError) as exc:
            raise ConfigError(
                f"{source} document is not JSON ({exc})", code="bad_desired_json"
            ) from exc
    else:
        data = payload
    problems: list[FieldProblem] = []
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source} document must be a JSON object", code="bad_desired_json")
    version = data.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        problems.append(FieldProblem("version", f"must be an integer >= 0, got {version!r}"))
    config = data.get("config", {})
    if not isinstance(config, Mapping):
        problems.append(FieldProblem("config", "must be an object"))
    extra = sorted(set(data) - {"version", "config", "issued_at", "issued_by"})
    problems.extend(FieldProblem(k, "unknown field") for k in extra)
    if problems:
        raise ConfigError(f"{source} document rejected", problems)
    assert isinstance(version, int) and isinstance(config, Mapping)
    return DesiredDoc(version, config)


def merge_config(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """JSON Merge Patch: override wins per key, tables merge recursively, None deletes."""
    out: dict[str, Any] = {k: v for k, v in base.items() if v is not None}
    for key, value in override.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_config(out[key], value)
        elif isinstance(value, Mapping):
            out[key] = merge_config({}, value)  # strips nested Nones
        else:
            out[key] = value
    return out


@dataclass(frozen=True, slots=True)
class FunctionConfig:
    """Live overrides for one function; None = keep the manifest's value."""

    min_instances: int | None = None
    max_instances: int | None = None
    concurrency: int | None = None
    routing: Routing | None = None
    version: str | None = None  # the version a rollout wants active; the deployer acts on it
    # The function's own settings, handed to it by `config()` (docs/building-blocks.md).
    config: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """The validated, merged config the agent applies; None = the agent's local default."""

    functions: Mapping[str, FunctionConfig] = field(default_factory=dict)
    cache_max_bytes: int | None = None
    log_level: str | None = None
    metrics_interval_s: float | None = None
    deployment: Mapping[str, Any] | None = None  # checked here; the deployer acts on it
    raw: Mapping[str, Any] = field(default_factory=dict)  # the merged document, for reporting


class _Checker:
    """Collects every problem instead of stopping at the first, so one report fixes all."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self.problems: list[FieldProblem] = []

    def bad(self, path: str, problem: str) -> None:
        self.problems.append(FieldProblem(self.prefix + path, problem))

    def table(self, path: str, value: Any) -> Mapping[str, Any] | None:
        if value is None:
            return None
        if not isinstance(value, Mapping):
            self.bad(path, f"must be a table, got {_kind(value)}")
            return None
        return value

    def unknown(self, path: str, table: Mapping[str, Any], known: tuple[str, ...]) -> None:
        for key in table:
            if key not in known:
                where = f"{path}.{key}" if path else str(key)
                self.bad(where, f"unknown field (expected one of: {', '.join(known)})")

    def int_in(self, path: str, value: Any, lo: int, hi: int) -> int | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.bad(path, f"must be an integer, got {_kind(value)} {value!r}")
            return None
        if not lo <= value <= hi:
            self.bad(path, f"must be between {lo} and {hi}, got {value}")
            return None
        return value

    def number_in(self, path: str, value: Any, lo: float, hi: float) -> float | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            self.bad(path, f"must be a number, got {_kind(value)} {value!r}")
            return None
        if not lo <= value <= hi:
            self.bad(path, f"must be between {lo:g} and {hi:g}, got {value}")
            return None
        return float(value)

    def choice(self, path: str, value: Any, choices: tuple[str, ...]) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str) or value.lower() not in choices:
            self.bad(path, f"must be one of {', '.join(choices)}, got {value!r}")
            return None
        return value.lower()


# ---- lan: tokens pushed to the agent's local API (issue 14) -----------------------------------
# Kept in a block of its own so it merges apart from the other keys. Hashes only: the platform
# never holds a usable local token, the operator makes it and sends its SHA-256.
_LAN_KEYS = ("tokens",)
_LAN_TOKEN_KEYS = ("id", "sha256", "scopes", "expires")
_LAN_TOKEN_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_LAN_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# The agent's scopes (edge_agent.tokens); repeated here because cloud_sync never imports the agent.
_LAN_SCOPE = re.compile(r"^(admin|invoke:(\*|[A-Za-z0-9][A-Za-z0-9._-]{0,127}))$")
MAX_LAN_TOKENS = 1000


def _check_lan(c: _Checker, config: Mapping[str, Any]) -> None:
    """`lan.tokens`: [{id, sha256, scopes, expires}], applied by the agent to its token store."""
    lan = c.table("lan", config.get("lan")) or {}
    c.unknown("lan", lan, _LAN_KEYS)
    tokens = lan.get("tokens")
    if tokens is None:
        return
    if not isinstance(tokens, list) or len(tokens) > MAX_LAN_TOKENS:
        c.bad("lan.tokens", f"must be an array of at most {MAX_LAN_TOKENS} tables")
        return
    seen: set[str] = set()
    for i, item in enumerate(tokens):
        path = f"lan.tokens[{i}]"
        tok = c.table(path, item)
        if tok is None:
            continue
        c.unknown(path, tok, _LAN_TOKEN_KEYS)
        tid = tok.get("id")
        if not isinstance(tid, str) or not _LAN_TOKEN_ID.match(tid) or tid in seen:
            c.bad(f"{path}.id", "must be a unique id of 1-64 letters, digits, '-' or '_'")
        else:
            seen.add(tid)
        if not isinstance(tok.get("sha256"), str) or not _LAN_SHA256.match(tok["sha256"]):
            c.bad(f"{path}.sha256", "must be the token's SHA-256, 64 lowercase hex digits")
        scopes = tok.get("scopes")
        if (
            not isinstance(scopes, list)
            or not scopes
            or not all(isinstance(s, str) and _LAN_SCOPE.match(s) for s in scopes)
        ):
            c.bad(f"{path}.scopes", "must be a non-empty array of invoke:NAME, invoke:* or admin")
        expires = tok.get("expires")
        if expires is not None and (
            isinstance(expires, bool) or not isinstance(expires, int | float) or expires <= 0
        ):
            c.bad(f"{path}.expires", "must be a unix time in seconds (or absent: never)")


def _kind(value: Any) -> str:
    return {dict: "table", list: "array", str: "string", bool: "boolean"}.get(
        type(value), type(value).__name__
    )


def _check(
    config: Mapping[str, Any], prefix: str = "", *, whole: bool = True
) -> tuple[AgentConfig, list[FieldProblem]]:
    """`whole`: `config` is the merged document, so entries that span keys (a rollout entry
    and the version it names) can be checked against each other."""
    c = _Checker(prefix)
    c.unknown("", config, (*_TOP_KEYS, "lan"))
    _check_lan(c, config)
    functions: dict[str, FunctionConfig] = {}
    fns = c.table("functions", config.get("functions"))
    for name, spec in (fns or {}).items():
        path = f"functions.{name}"
        if not isinstance(name, str) or not NAME_RE.match(name):
            c.bad(path, f"function name must match {NAME_RE.pattern}")
            continue
        fn = c.table(path, spec)
        if fn is None:
            continue
        c.unknown(path, fn, _FUNCTION_KEYS)
        pool = c.table(f"{path}.pool", fn.get("pool")) or {}
        c.unknown(f"{path}.pool", pool, tuple(POOL_BOUNDS))
        sizes = {
            key: c.int_in(f"{path}.pool.{key}", pool.get(key), lo, hi)
            for key, (lo, hi) in POOL_BOUNDS.items()
        }
        lo_i, hi_i = sizes["min_instances"], sizes["max_instances"]
        if lo_i is not None and hi_i is not None and hi_i < lo_i:
            c.bad(f"{path}.pool.max_instances", f"({hi_i}) is below min_instances ({lo_i})")
        routing = c.choice(f"{path}.routing", fn.get("routing"), ROUTINGS)
        version = fn.get("version")
        if version is not None and (not isinstance(version, str) or not SEMVER_RE.match(version)):
            c.bad(f"{path}.version", f"must be a semantic version like 1.2.3, got {version!r}")
            version = None
        functions[name] = FunctionConfig(
            min_instances=sizes["min_instances"],
            max_instances=sizes["max_instances"],
            concurrency=sizes["concurrency"],
            routing=routing,  # type: ignore[arg-type]  # checked against ROUTINGS above
            version=version,
            config=dict(c.table(f"{path}.config", fn.get("config")) or {}),
        )
    cache = c.table("cache", config.get("cache")) or {}
    c.unknown("cache", cache, ("max_bytes",))
    cache_max = c.int_in("cache.max_bytes", cache.get("max_bytes"), 0, CACHE_MAX_BYTES_LIMIT)
    log_level = c.choice("log_level", config.get("log_level"), LOG_LEVELS)
    metrics = c.table("metrics", config.get("metrics")) or {}
    c.unknown("metrics", metrics, ("interval_s",))
    interval = c.number_in(
        "metrics.interval_s", metrics.get("interval_s"), *METRICS_INTERVAL_BOUNDS
    )
    deployment = c.table("deployment", config.get("deployment"))
    # The deployer acts on `deployment.rollouts` only: anything else would be accepted and
    # silently ignored, so it is refused with the reason instead.
    c.unknown("deployment", deployment or {}, _DEPLOYMENT_KEYS)
    if whole and not c.problems:
        try:
            parse_deployments(config)
        except MessageError as exc:
            for f in exc.fields:
                c.bad(f.path, f.problem)
    cfg = AgentConfig(
        functions=functions,
        cache_max_bytes=cache_max,
        log_level=log_level,
        metrics_interval_s=interval,
        deployment=deployment,
        raw=merge_config({}, config),
    )
    return cfg, c.problems


def validate_config(config: Mapping[str, Any], source: str = "desired config") -> AgentConfig:
    """Validate one (merged) config document; ConfigError lists every bad field."""
    if not isinstance(config, Mapping):
        raise ConfigError(f"{source} rejected", [FieldProblem("config", "must be a table")])
    cfg, problems = _check(config)
    if problems:
        raise ConfigError(f"{source} rejected", problems)
    return cfg


@dataclass(frozen=True, slots=True, order=True)
class ConfigVersions:
    """Which documents a config came from. Version 0 = no document of that kind."""

    group: str | None = None
    group_version: int = 0
    device_version: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "group_version": self.group_version,
            "device_version": self.device_version,
        }


Decision = Literal["new", "same", "stale"]
Status = Literal["applied", "unchanged", "stale", "rejected"]


@dataclass(frozen=True, slots=True)
class Outcome:
    status: Status
    config: AgentConfig  # the effective config after this offer (the old one unless applied)
    versions: ConfigVersions  # the versions offered
    error: ConfigError | None = None

    @property
    def changed(self) -> bool:
        return self.status == "applied"


class ConfigTracker:
    """Remembers the last version pair seen and the last config applied.

    "Applying the same version twice does nothing": a pair equal to the last one seen (applied
    *or* rejected) is `unchanged`, so a bad document is reported once, not on every redelivery.
    A pair where either version went backwards (under the same group) is `stale` -- e.g. an old
    retained message from a broker that lost its state. Persist `snapshot()` with the agent's
    state and pass it back to the constructor so a restart does not re-apply.
    """

    def __init__(self, snapshot: Mapping[str, Any] | None = None) -> None:
        self._seen: ConfigVersions | None = None
        self._applied = ConfigVersions()
        self._config = AgentConfig()
        self._error: ConfigError | None = None
        if snapshot:
            self._restore(snapshot)

    @property
    def effective(self) -> AgentConfig:
        return self._config

    @property
    def seen_versions(self) -> ConfigVersions | None:
        """The last pair offered that was not stale (applied or rejected)."""
        return self._seen

    @property
    def applied_versions(self) -> ConfigVersions:
        return self._applied

    @property
    def last_error(self) -> ConfigError | None:
        return self._error

    def decide(self, versions: ConfigVersions) -> Decision:
        seen = self._seen
        if seen is None:
            return "new"
        if versions == seen:
            return "same"
        if versions.device_version < seen.device_version:
            return "stale"
        if versions.group == seen.group and versions.group_version < seen.group_version:
            return "stale"
        return "new"

    def offer(
        self,
        group_doc: DesiredDoc | None,
        device_doc: DesiredDoc | None,
        group: str | None = None,
    ) -> Outcome:
        """Decide, validate and (maybe) adopt the merge of a group and a device document."""
        if group is not None:
            validate_id(group, "group name")
        versions = ConfigVersions(
            group=group if group_doc is not None else None,
            group_version=group_doc.version if group_doc else 0,
            device_version=device_doc.version if device_doc else 0,
        )
        decision = self.decide(versions)
        if decision == "same":
            return Outcome("unchanged", self._config, versions, self._error)
        if decision == "stale":
            return Outcome("stale", self._config, versions)
        self._seen = versions
        problems: list[FieldProblem] = []
        for label, doc in (("group", group_doc), ("device", device_doc)):
            if doc is not None:
                problems.extend(_check(doc.config, prefix=f"{label}:", whole=False)[1])
        if not problems:
            merged = merge_config(
                group_doc.config if group_doc else {}, device_doc.config if device_doc else {}
            )
            cfg, problems = _check(merged, prefix="merged:")
        if problems:
            self._error = ConfigError(f"desired config {_label(versions)} rejected", problems)
            return Outcome("rejected", self._config, versions, self._error)
        self._error = None
        self._applied = versions
        self._config = cfg
        return Outcome("applied", cfg, versions)

    def snapshot(self) -> dict[str, Any]:
        """JSON-able state to persist; the effective config is stored as its raw document."""
        return {
            "seen": self._seen.to_dict() if self._seen else None,
            "applied": self._applied.to_dict(),
            "config": dict(self._config.raw),
            "error": self._error.to_dict() if self._error else None,
        }

    def _restore(self, snap: Mapping[str, Any]) -> None:
        try:
            seen = snap.get("seen")
            self._seen = ConfigVersions(**seen) if seen else None
            self._applied = ConfigVersions(**snap.get("applied") or {})
            self._config = validate_config(snap.get("config") or {}, "stored config")
        except (TypeError, ConfigError) as exc:
            # A snapshot we cannot read is not fatal: start from defaults, accept the next doc.
            self._seen, self._applied, self._config = None, ConfigVersions(), AgentConfig()
            self._error = ConfigError(f"stored config snapshot ignored: {exc}", code="bad_snapshot")


def _label(v: ConfigVersions) -> str:
    parts = []
    if v.group is not None:
        parts.append(f"group {v.group} v{v.group_version}")
    parts.append(f"device v{v.device_version}")
    return "(" + ", ".join(parts) + ")"


def reported_document(
    device_id: str,
    seq: int,
    tracker: ConfigTracker,
    *,
    extra: Mapping[str, Any] | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """The reported document: what the device saw, what it runs, and why it refused if it did.

    `seq` increases with every report the device makes (persisted by the agent), so the platform
    can ignore a report that arrives after a newer one (QoS 1 redelivery, HTTP fallback races).
    """
    error = tracker.last_error
    seen = tracker.seen_versions
    doc: dict[str, Any] = {
        "device": validate_id(device_id),
        "version": seq,
        "reported_at": time.time() if now is None else now,
        "desired_seen": seen.to_dict() if seen else None,
        "applied": {**tracker.applied_versions.to_dict(), "config": dict(tracker.effective.raw)},
        "status": "rejected" if error is not None else "applied",
        "error": error.to_dict() if error is not None else None,
    }
    if extra:
        doc.update({k: v for k, v in extra.items() if k not in doc})
    return doc
