"""The function manifest (`edgefn.toml`): parsed and validated into a frozen value.

Pure code. The minimum contract (name, version, runtime, entry, timeout_ms, [pool]) is what a
development function directory needs; bundles extend it with more tables and never break it.
Every error names the file and the field, so an author can fix it without reading our code.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast, get_args

from runtimes.errors import ManifestError
from runtimes.permissions import Permissions, parse_permissions

MANIFEST_NAME = "edgefn.toml"

Runtime = Literal["node", "go", "cpp"]
Isolation = Literal["process", "in-process"]
RUNTIMES: tuple[str, ...] = get_args(Runtime)

# Names end up in URLs, file paths and MQTT topics: keep them to a safe, boring alphabet.
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
# Semantic Versioning 2.0.0, https://semver.org/#is-there-a-suggested-regular-expression-regex
SEMVER_RE = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)

DEFAULT_TIMEOUT_MS = 30_000


@dataclass(frozen=True, slots=True)
class PoolSettings:
    min_instances: int = 1  # started at load: the pool is warm before the first request
    max_instances: int = 4
    concurrency: int = 16  # in-flight requests per instance
    idle_timeout_s: float = 300.0
    max_queue: int = 256  # requests waiting for a slot before the pool answers 429


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-worker resource limits; 0 means "not set" (the device budget still applies)."""

    memory_mb: int = 0
    cpu_seconds: int = 0
    open_files: int = 0
    processes: int = 0


@dataclass(frozen=True, slots=True)
class Manifest:
    name: str
    version: str
    runtime: Runtime
    entry: str
    timeout_ms: int = DEFAULT_TIMEOUT_MS
    handler: str = "handler"  # Node: exported function name
    isolation: Isolation = "process"  # C++ only; a crash in-process takes the agent down
    inline: bool = False  # C++ in-process: call on the event loop (sub-millisecond functions)
    pool: PoolSettings = field(default_factory=PoolSettings)
    limits: Limits = field(default_factory=Limits)
    env: Mapping[str, str] = field(default_factory=dict)
    permissions: Permissions = field(default_factory=Permissions)
    # Tables other parts own ([cache], [routing], [build], [artifacts] ...), kept verbatim.
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def version_tuple(self) -> tuple[int, int, int, tuple[Any, ...]]:
        return semver_key(self.version)


def semver_key(version: str) -> tuple[int, int, int, tuple[Any, ...]]:
    """Sort key for semver precedence (build metadata ignored, a pre-release sorts first)."""
    match = SEMVER_RE.match(version)
    if not match:
        raise ValueError(f"not a semantic version: {version!r}")
    major, minor, patch, pre = match.group(1, 2, 3, 4)
    pre_key: tuple[Any, ...]
    if pre is None:
        pre_key = (1,)
    else:
        pre_key = (0, *((0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre.split(".")))
    return int(major), int(minor), int(patch), pre_key


_TOP_KEYS = {
    "name",
    "version",
    "runtime",
    "entry",
    "timeout_ms",
    "handler",
    "isolation",
    "inline",
    "pool",
    "limits",
    "env",
    "permissions",
    "description",
}


def _int(where: str, table: Mapping[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ManifestError(f"{where}: field '{key}' must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ManifestError(f"{where}: field '{key}' must be between {lo} and {hi}, got {value}")
    return value


def _str(where: str, table: Mapping[str, Any], key: str, default: str | None = None) -> str:
    value = table.get(key, default)
    if value is None:
        raise ManifestError(f"{where}: required field '{key}' is missing")
    if not isinstance(value, str) or not value:
        raise ManifestError(f"{where}: field '{key}' must be a non-empty string, got {value!r}")
    return value


def _table(where: str, data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, Mapping):
        raise ManifestError(f"{where}: '{key}' must be a table")
    return value


def parse_manifest(data: Mapping[str, Any], where: str = MANIFEST_NAME) -> Manifest:
    """Validate a decoded manifest. `where` names the file in error messages."""
    name = _str(where, data, "name")
    if not NAME_RE.match(name):
        raise ManifestError(
            f"{where}: field 'name' must match {NAME_RE.pattern} (lowercase letters, digits, "
            f"'-' and '_'), got {name!r}"
        )
    version = _str(where, data, "version")
    if not SEMVER_RE.match(version):
        raise ManifestError(
            f"{where}: field 'version' must be a semantic version like 1.2.3, got {version!r}"
        )
    runtime = _str(where, data, "runtime")
    if runtime not in RUNTIMES:
        raise ManifestError(
            f"{where}: field 'runtime' must be one of {', '.join(RUNTIMES)}, got {runtime!r}"
        )
    entry = _str(where, data, "entry")
    if entry.startswith("/") or ".." in Path(entry).parts:
        raise ManifestError(f"{where}: field 'entry' must be a path inside the function directory")
    timeout_ms = _int(where, data, "timeout_ms", DEFAULT_TIMEOUT_MS, 1, 15 * 60 * 1000)
    handler = _str(where, data, "handler", "handler")
    isolation = _str(where, data, "isolation", "process")
    if isolation not in get_args(Isolation):
        raise ManifestError(
            f"{where}: field 'isolation' must be 'process' or 'in-process', got {isolation!r}"
        )
    inline = data.get("inline", False)
    if not isinstance(inline, bool):
        raise ManifestError(f"{where}: field 'inline' must be true or false")

    pw = f"{where} [pool]"
    pool_t = _table(where, data, "pool")
    d = PoolSettings()
    min_i = _int(pw, pool_t, "min_instances", d.min_instances, 0, 256)
    max_i = _int(pw, pool_t, "max_instances", max(d.max_instances, min_i), 1, 256)
    if max_i < min_i:
        raise ManifestError(f"{pw}: 'max_instances' ({max_i}) is below 'min_instances' ({min_i})")
    idle = pool_t.get("idle_timeout_s", d.idle_timeout_s)
    if isinstance(idle, bool) or not isinstance(idle, int | float) or idle <= 0:
        raise ManifestError(f"{pw}: field 'idle_timeout_s' must be a positive number")
    pool = PoolSettings(
        min_instances=min_i,
        max_instances=max_i,
        concurrency=_int(pw, pool_t, "concurrency", d.concurrency, 1, 10_000),
        idle_timeout_s=float(idle),
        max_queue=_int(pw, pool_t, "max_queue", d.max_queue, 0, 1_000_000),
    )

    lw = f"{where} [limits]"
    lim_t = _table(where, data, "limits")
    limits = Limits(
        memory_mb=_int(lw, lim_t, "memory_mb", 0, 0, 1 << 20),
        cpu_seconds=_int(lw, lim_t, "cpu_seconds", 0, 0, 1 << 31),
        open_files=_int(lw, lim_t, "open_files", 0, 0, 1 << 20),
        processes=_int(lw, lim_t, "processes", 0, 0, 1 << 16),
    )
    env_t = _table(where, data, "env")
    for k, v in env_t.items():
        if not isinstance(v, str):
            raise ManifestError(f"{where} [env]: value of '{k}' must be a string")
    extra = {k: v for k, v in data.items() if k not in _TOP_KEYS}
    return Manifest(
        name=name,
        version=version,
        runtime=cast(Runtime, runtime),
        entry=entry,
        timeout_ms=timeout_ms,
        handler=handler,
        isolation=cast(Isolation, isolation),
        inline=inline,
        pool=pool,
        limits=limits,
        env=dict(env_t),
        permissions=parse_permissions(data.get("permissions"), where),
        extra=extra,
    )


def load_manifest(path: Path) -> Manifest:
    """Read and validate `path` (an edgefn.toml)."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: cannot read: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(f"{path}: not valid TOML: {exc}") from exc
    return parse_manifest(data, str(path))
