"""The `cloud_sync` subtree of the one error tree (`hardware.errors.EdgefnError`).

Every error carries a stable `code` (what logs, reported documents and the platform see) and a
`category` that says what kind of thing went wrong, so callers decide on retry/fallback without
knowing every subclass: `transport` errors are worth retrying (or switching to HTTP), `config` and
`auth` errors are not until something changes, `storage` means the local disk is in trouble.
Foreign errors (sqlite3, ssl, paho, cryptography, aiohttp, urllib) are converted at the module
boundary with `raise ... from exc`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# Category is re-exported: modules of this package import it from here.
from hardware.errors import Category as Category
from hardware.errors import EdgefnError
from runtimes.errors import Unavailable


class CloudSyncError(EdgefnError):
    """The root of the `cloud_sync` subtree: the link between edge and cloud, and the platform."""

    code = "cloud_sync_error"
    category: Category = "internal"


class TopicError(CloudSyncError):
    """A topic or an id that goes into a topic is malformed (wildcards, slashes, empty...)."""

    code = "bad_topic"
    category = "config"


@dataclass(frozen=True, slots=True)
class FieldProblem:
    """One bad field of a document: a dotted path and what is wrong with it."""

    path: str
    problem: str

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


class ConfigError(CloudSyncError):
    """A desired document is malformed; `fields` lists every bad field, not just the first."""

    code = "bad_desired_config"
    category = "config"

    def __init__(
        self, message: str, fields: Sequence[FieldProblem] = (), *, code: str | None = None
    ) -> None:
        self.fields: tuple[FieldProblem, ...] = tuple(fields)
        if self.fields:
            message = message + ": " + "; ".join(str(f) for f in self.fields)
        super().__init__(message, code=code)

    def to_dict(self) -> dict[str, object]:
        out = super().to_dict()
        out["fields"] = [{"path": f.path, "problem": f.problem} for f in self.fields]
        return out


class MetricsFormatError(CloudSyncError):
    """A metrics record does not follow the documented format, or two records cannot merge."""

    code = "bad_metrics_record"
    category = "internal"


class OutboxError(CloudSyncError):
    """The outbox database failed (disk full, I/O error, corrupt file) or was used after close."""

    code = "outbox_error"
    category = "storage"


class RecordTooLarge(OutboxError):
    """A single record is bigger than the whole outbox bound: it can never be stored."""

    code = "outbox_record_too_large"


class CredentialsError(CloudSyncError):
    """The device credentials file is missing, unreadable or inconsistent."""

    code = "bad_credentials"
    category = "auth"


class PkiError(CloudSyncError):
    """The platform CA could not issue, load or revoke a certificate."""

    code = "pki_error"
    category = "internal"


class MqttError(CloudSyncError):
    code = "mqtt_error"
    category: Category = "transport"


class NotConnected(MqttError):
    """The session is not connected right now: the outbox keeps the record for later."""

    code = "mqtt_not_connected"


class SessionClosed(MqttError):
    code = "mqtt_session_closed"


class PublishTimeout(MqttError):
    """No PUBACK within the timeout; the message may still arrive (at-least-once)."""

    code = "mqtt_publish_timeout"


class NoSubscriber(MqttError):
    """The broker took the publish but nobody subscribes to its topic (MQTT 5 PUBACK reason
    0x10), so nobody got it: a broker that restarted without persistence, or restored no shared
    subscription, before the platform subscribed again. For a device record that is not
    delivered; the outbox keeps it and sends it again."""

    code = "mqtt_no_subscriber"


class PublishBackpressure(MqttError):
    """paho's bounded outgoing queue is full: slow down and retry."""

    code = "mqtt_queue_full"


class PublishRefused(MqttError):
    """The broker answered the publish with a failure reason code (e.g. 0x87 Not authorized)."""

    code = "mqtt_publish_refused"

    def __init__(self, message: str, *, reason_code: int, permanent: bool) -> None:
        super().__init__(message)
        self.reason_code = reason_code
        # A permanent refusal will be refused again: retrying the record is pointless.
        self.permanent = permanent
        if reason_code == 0x87:
            self.category = "auth"


class CloudUnavailable(CloudSyncError, Unavailable):
    """The platform could not run a function for the device (unreachable, 5xx, not ours).

    A cloud_sync error (category `transport`) that is also, to the agent's router, an
    `Unavailable` invocation: the router's fallback and stale-if-error rules treat it like a
    local function that cannot run now, and the local API answers its `status` (502).
    """

    code = "cloud_unavailable"
    category: Category = "transport"
    status = 502


class CircuitOpen(CloudUnavailable):
    """Cloud calls are paused by the circuit breaker after repeated transport failures."""

    code = "cloud_circuit_open"


def error_of(body: bytes) -> tuple[str, str] | None:
    """(code, message) of an edgefn JSON error body (agent or platform), or None if it is not one.

    The one parser for `{"error": {"code": ..., "message": ...}}`, used by both CLIs and the
    cloud client.
    """
    import json

    try:
        err = json.loads(body)["error"]
        return str(err["code"]), str(err["message"])
    except (ValueError, KeyError, TypeError):
        return None


def describe_http_error(status: int, body: bytes) -> str:
    """One line for a failed HTTP call: the stable code when the server is ours, else the start."""
    err = error_of(body)
    if err is None:
        return f"HTTP {status}: {body[:200].decode('utf-8', 'replace')}"
    return f"{err[1]} ({err[0]}, HTTP {status})"
