"""The platform's config file (`/etc/edgefn/platform.toml`): TOML read into `PlatformSettings`.

`edge-cloud serve --config FILE` reads it; packaging/systemd/platform.toml.example lists every key.
Precedence, lowest first: built-in defaults <- the file <- the environment
(`EDGEFN_CLOUD_DATA_DIR`, `EDGEFN_MQTT_PORT`) <- flags on the command line. The file is checked
whole before anything starts: an unknown key, a value of the wrong type or out of range is
refused with the file, the dotted key and the reason, so a typo never falls back to a default.
(The agent's `edge_agent/config_file.py` works the same way.)

Secrets never live in this file, which is world-readable in a package: the database password
comes from `[database] password_file` (read here, 0600, owned by the service user) or libpq's own
`$PGPASSWORD`; blob store credentials from the environment (`AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`) or `[blobs] credentials_file` (an AWS-style credentials file). A URL
with a password in it, or a key meant for a secret, is refused.
"""

from __future__ import annotations

import os
import tomllib
import urllib.parse
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from cloud_sync.errors import CloudSyncError
from cloud_sync.platform.settings import (
    DEFAULT_MAX_BUNDLE_BYTES,
    DEFAULT_PORT,
    PlatformSettings,
    default_data_dir,
)

LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigFileError(CloudSyncError):
    """The config file cannot be used; the message names the file, the key and the reason."""

    code = "bad_platform_config"
    category = "config"


@dataclass(frozen=True, slots=True)
class Key:
    """One config key: the field it sets and the kind of value it takes."""

    field: str
    kind: str  # int | port | float | str | bool | path | url
    choices: tuple[str, ...] = ()


# Dotted TOML key -> field (a PlatformSettings field unless noted in _NOT_SETTINGS).
KEYS: dict[str, Key] = {
    "data_dir": Key("data_dir", "path"),
    "log_level": Key("log_level", "str", LOG_LEVELS),
    "access_log": Key("access_log", "bool"),
    "max_bundle_bytes": Key("max_bundle_bytes", "int"),
    "drain_s": Key("drain_s", "float"),
    "public_url": Key("public_url", "url"),
    "listen.host": Key("host", "str"),
    "listen.port": Key("port", "port"),
    "database.url": Key("database_url", "str"),
    "database.password_file": Key("database_password", "path"),  # read: the password itself
    "blobs.url": Key("blobs_url", "str"),
    "blobs.credentials_file": Key("blobs_credentials_file", "path"),
    "broker.url": Key("broker", "str"),
    "broker.mqtt_port": Key("mqtt_port", "port"),
    "broker.device_url": Key("device_broker_url", "str"),
    "broker.shared_subscriptions": Key("shared_subscriptions", "bool"),
    "replica.id": Key("replica_id", "str"),
    "replica.lease": Key("lease", "str"),
    "tls.enabled": Key("tls", "bool"),
    "tls.cert_file": Key("tls_cert_file", "path"),
    "tls.key_file": Key("tls_key_file", "path"),
}
_TABLES = frozenset(k.split(".", 1)[0] for k in KEYS if "." in k)
_SECRET = "secrets do not belong in the world-readable config file"
_REFUSED = {
    "database.password": f"{_SECRET}: use password_file or $PGPASSWORD",
    "blobs.access_key_id": f"{_SECRET}: use $AWS_ACCESS_KEY_ID or credentials_file",
    "blobs.secret_access_key": f"{_SECRET}: use $AWS_SECRET_ACCESS_KEY or credentials_file",
}
# Not PlatformSettings fields: the caller applies them (the database password goes to this
# process's environment, where the PostgreSQL engine reads it, never into the settings object).
_NOT_SETTINGS = frozenset({"log_level", "blobs_credentials_file", "database_password"})


def load(path: Path) -> dict[str, Any]:
    """Read `path` and return {field: value}, or raise ConfigFileError."""
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
    """Validate a decoded TOML document; `path` is for messages and relative paths."""
    out: dict[str, Any] = {}
    for dotted, value in _flatten(raw):
        key = KEYS.get(dotted)
        if key is None:
            reason = _REFUSED.get(dotted, "unknown key")
            raise ConfigFileError(f"config file {path}: key {dotted!r}: {reason}")
        try:
            out[key.field] = _convert(dotted, key, value, path)
        except ValueError as exc:
            raise ConfigFileError(f"config file {path}: key {dotted!r}: {exc}") from None
    if ("tls_cert_file" in out) != ("tls_key_file" in out):
        raise ConfigFileError(f"config file {path}: key 'tls': cert_file and key_file go together")
    return out


def _flatten(raw: dict[str, Any]) -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for name, value in raw.items():
        if name in _TABLES and isinstance(value, dict):
            items.extend((f"{name}.{sub}", v) for sub, v in value.items())
        else:
            items.append((name, value))  # a table name with a plain value: unknown key
    return items


def _type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        type(value), "a table" if isinstance(value, dict) else "an array"
    )


def _convert(dotted: str, key: Key, value: Any, path: Path) -> Any:
    """The value as the field wants it; ValueError says why it is not acceptable."""
    kind = key.kind
    # bool is an int subclass in Python: check it first so `port = true` is refused.
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise ValueError(f"expected true or false, got {_type_name(value)}")
    if kind in ("int", "port"):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"expected an integer, got {_type_name(value)}")
        if kind == "port" and not 0 <= value <= 65535:
            raise ValueError(f"{value} is not a port (0-65535; 0 picks a free one)")
        if kind == "int" and value <= 0:
            raise ValueError(f"expected a positive integer, got {value}")
        return value
    if kind == "float":
        if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
            return float(value)
        raise ValueError(f"expected a number >= 0, got {value!r}")
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_type_name(value)}")
    if key.choices and value not in key.choices:
        raise ValueError(f"{value!r} is not one of {', '.join(key.choices)}")
    if kind == "path":
        if not value:
            raise ValueError("expected a path, got an empty string")
        # Relative paths are relative to the file, not to wherever the platform was started.
        resolved = (path.parent / value).resolve()
        return _read_secret(resolved) if dotted == "database.password_file" else resolved
    if kind == "url" and value and urllib.parse.urlsplit(value).scheme not in ("http", "https"):
        raise ValueError(f"{value!r} is not an http(s) URL")
    checks = {"database.url": _check_database, "blobs.url": _check_blobs, "broker.url": _broker}
    return checks[dotted](value) if dotted in checks else value


def _read_secret(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    if not text:
        raise ValueError(f"{path} is empty")
    return text


def _check_database(url: str) -> str:
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("postgresql", "postgres"):
        raise ValueError(f"expected postgresql://USER@HOST:PORT/DB, got scheme {parsed.scheme!r}")
    if parsed.password is not None:
        raise ValueError(f"{_SECRET}: put the password in password_file or $PGPASSWORD")
    return url


def _check_blobs(url: str) -> str:
    from cloud_sync.platform.blobs_s3 import S3Location
    from cloud_sync.platform.store import StoreError

    scheme = urllib.parse.urlsplit(url).scheme
    if scheme == "s3":
        try:
            S3Location.from_url(url)
        except StoreError as exc:
            raise ValueError(exc.message) from None
        return url
    if scheme == "file" and urllib.parse.urlsplit(url).path.startswith("/"):
        return url
    raise ValueError(f"{url!r}: expected file:///PATH or s3://BUCKET?endpoint=URL")


def _broker(url: str) -> str:
    """'embedded', 'none' (HTTP only) or an external broker URL; stored as the settings want."""
    if url in ("embedded", "none"):
        return "" if url == "none" else url
    if urllib.parse.urlsplit(url).scheme not in ("mqtt", "mqtts"):
        raise ValueError(f"{url!r}: expected embedded, none or mqtts://HOST:PORT")
    return url


def settings_from(
    file_values: dict[str, Any], flags: dict[str, Any]
) -> tuple[PlatformSettings, dict[str, Any]]:
    """Defaults <- file <- environment <- flags (None = not given). Returns the settings and
    the values that are not settings (log_level, blobs_credentials_file) for the caller.

    A value for a field this build's PlatformSettings lacks (another branch adds the
    PostgreSQL store and shared subscriptions) is refused rather than silently ignored.
    """
    values = dict(file_values)
    if os.environ.get("EDGEFN_CLOUD_DATA_DIR"):
        values["data_dir"] = Path(os.environ["EDGEFN_CLOUD_DATA_DIR"])
    if os.environ.get("EDGEFN_MQTT_PORT", "").isdigit():
        values["mqtt_port"] = int(os.environ["EDGEFN_MQTT_PORT"])
    values.update({k: v for k, v in flags.items() if v is not None})
    extra = {k: values.pop(k) for k in _NOT_SETTINGS if k in values}
    known = {f.name for f in fields(PlatformSettings)}
    for name in sorted(set(values) - known):
        value = values.pop(name)
        if value not in (None, False, ""):
            dotted = next(k for k, key in KEYS.items() if key.field == name)
            raise ConfigFileError(f"key {dotted!r}: this platform build does not support it yet")
    values.setdefault("port", DEFAULT_PORT)
    values.setdefault("max_bundle_bytes", DEFAULT_MAX_BUNDLE_BYTES)
    values.setdefault("broker", "embedded")
    data_dir = Path(values.pop("data_dir", None) or default_data_dir()).resolve()
    return PlatformSettings(data_dir=data_dir, **values), extra
