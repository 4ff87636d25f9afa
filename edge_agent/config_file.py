"""The agent's config file (`/etc/edgefn/agent.toml`): TOML read into `Settings` fields.

Every setting `edge-agent run` takes as a flag has a key here (packaging/agent.toml.example
lists them all with their defaults). The file is checked whole before anything starts: an
unknown key or a value of the wrong type is refused with the file, the key and the reason,
so a typo never silently falls back to a default.

The one deliberate gap: the platform token (`--cloud-token`). The packaged file is
world-readable, so a token there would be readable by every local user and every function;
it comes from the credentials file or `$EDGEFN_CLOUD_TOKEN` instead.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.errors import StartupError

ROUTING_CHOICES = ("local", "cloud", "local-then-cloud", "cloud-then-local")
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigFileError(StartupError):
    """The config file cannot be used; the message names the file, the key and the reason."""

    code = "bad_config"


@dataclass(frozen=True, slots=True)
class Key:
    """One config key: the Settings field it sets and the kind of value it takes."""

    field: str
    kind: str  # int | float | str | bool | path | labels | names | urls
    choices: tuple[str, ...] = ()


# Dotted TOML key -> Settings field. Tables group what belongs together in the file.
KEYS: dict[str, Key] = {
    "data_dir": Key("data_dir", "path"),
    "host": Key("host", "str"),
    "port": Key("port", "int"),
    "max_body_bytes": Key("max_body_bytes", "int"),
    "log_format": Key("log_format", "str", ("text", "json")),
    "log_level": Key("log_level", "str", LOG_LEVELS),
    "require_signed": Key("require_signed", "bool"),
    "update_security": Key("update_security", "str", ("tuf", "signatures")),
    "scan_interval_s": Key("scan_interval_s", "float"),
    "drain_s": Key("drain_s", "float"),
    "worker_user": Key("worker_user", "str"),
    "cache_max_bytes": Key("cache_max_bytes", "int"),
    "auth": Key("auth", "str", ("none", "token", "mtls")),
    "advertise": Key("advertise", "names"),
    "labels": Key("labels", "labels"),
    "limits.max_connections": Key("max_connections", "int"),
    "limits.header_timeout_s": Key("header_timeout_s", "float"),
    "limits.idle_timeout_s": Key("idle_timeout_s", "float"),
    "limits.max_headers": Key("max_headers", "int"),
    "limits.max_header_bytes": Key("max_header_bytes", "int"),
    "limits.fast_invoke": Key("fast_invoke", "bool"),
    "limits.token_concurrency": Key("token_concurrency", "int"),
    "tls.auto": Key("tls_auto", "bool"),  # resolved by cli_run, not a Settings field
    "tls.cert_file": Key("tls_cert_file", "path"),
    "tls.key_file": Key("tls_key_file", "path"),
    "tls.client_ca_file": Key("tls_client_ca_file", "path"),
    "budget.memory_mb": Key("budget_memory_mb", "int"),
    "budget.workers": Key("budget_workers", "int"),
    # One URL, or an array of the platform's replicas' URLs (the first is tried first).
    "cloud.url": Key("cloud_url", "urls"),
    "cloud.urls": Key("cloud_url", "urls"),
    "cloud.default_routing": Key("default_routing", "str", ROUTING_CHOICES),
    "cloud.credentials_file": Key("credentials_file", "path"),
    "cloud.fallback_after_s": Key("fallback_after_s", "float"),
    "cloud.metrics_interval_s": Key("metrics_interval_s", "float"),
    "cloud.outbox_max_bytes": Key("outbox_max_bytes", "int"),
}
_TABLES = frozenset(k.split(".", 1)[0] for k in KEYS if "." in k)
_REFUSED = {
    "cloud.token": "tokens do not belong in the world-readable config file: use the "
    "credentials file or $EDGEFN_CLOUD_TOKEN",
}


def load(path: Path) -> dict[str, Any]:
    """Read `path` and return {Settings field: value}, or raise ConfigFileError."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigFileError(f"cannot read config file {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigFileError(f"config file {path}: not UTF-8 text") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError(f"config file {path}: not valid TOML: {exc}") from exc
    return parse(raw, path)


def parse(raw: dict[str, Any], path: Path) -> dict[str, Any]:
    """Validate a decoded TOML document; `path` is only for messages."""
    out: dict[str, Any] = {}
    for dotted, value in _flatten(raw):
        key = KEYS.get(dotted)
        if key is None:
            reason = _REFUSED.get(dotted, "unknown key")
            raise ConfigFileError(f"config file {path}: key {dotted!r}: {reason}")
        try:
            out[key.field] = _convert(key, value, path)
        except ValueError as exc:
            raise ConfigFileError(f"config file {path}: key {dotted!r}: {exc}") from None
    return out


def _flatten(raw: dict[str, Any]) -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for name, value in raw.items():
        if name in _TABLES:
            if not isinstance(value, dict):
                items.append((name, value))  # reported below as an unknown key
                continue
            items.extend((f"{name}.{sub}", v) for sub, v in value.items())
        else:
            items.append((name, value))
    return items


def _type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        type(value), "a table" if isinstance(value, dict) else "an array"
    )


def _convert(key: Key, value: Any, path: Path) -> Any:
    """The value as the Settings field wants it; ValueError says why it is not acceptable."""
    kind = key.kind
    # bool is an int subclass in Python: check it first so `port = true` is refused.
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise ValueError(f"expected true or false, got {_type_name(value)}")
    if kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"expected an integer, got {_type_name(value)}")
    if kind == "float":
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"expected a number, got {_type_name(value)}")
    if kind in ("str", "path"):
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {_type_name(value)}")
        if key.choices and value not in key.choices:
            raise ValueError(f"{value!r} is not one of {', '.join(key.choices)}")
        if kind == "path":
            # Relative paths are relative to the file, not to wherever the agent was started.
            return (path.parent / value).resolve() if value else None
        return value
    if kind == "urls":
        if isinstance(value, str):
            return value  # one URL (the agent's `--cloud` splits an array into fallbacks)
        if not isinstance(value, list) or not value or not all(isinstance(u, str) for u in value):
            raise ValueError("expected a URL or a non-empty array of URLs")
        return tuple(value)
    if kind == "names":
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ValueError("expected an array of interface names")
        return tuple(value)
    if kind == "labels":
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise ValueError("expected a table of string values")
        return tuple(value.items())
    raise AssertionError(kind)  # pragma: no cover - KEYS only uses the kinds above
