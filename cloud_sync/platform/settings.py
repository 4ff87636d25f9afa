"""The platform's settings: one frozen object, built once by `edge-cloud serve` and passed down.

Paths under the data dir are derived here, so the store, the token file and the state file agree
on one layout:

    <data_dir>/admin.token      operator token (0600), created on first start
    <data_dir>/platform.json    {"url", "pid"} of the running server, written once it listens
    <data_dir>/registry.db      registry metadata (SQLite)
    <data_dir>/blobs/           content-addressed bundles: blobs/sha256/<ab>/<digest>
    <data_dir>/publishers/      optional: trusted publisher keys (*.pub); when present, publish
                                refuses bundles not signed by one of them
    <data_dir>/fleet.db         devices, desired/reported state, metrics (fleet_store.py)
    <data_dir>/pki/             the platform CA (device certificates, CRL)
    <data_dir>/broker/          the embedded broker's server certificate
    <data_dir>/director/        the director key (signs every desired document; director.py)
    <data_dir>/director.db      the director's per-device counters and issued instructions
    <data_dir>/rollouts.db      rollouts (rollout_store.py)

With `database_url` (postgresql://USER@HOST:PORT/DB) the .db files are not used: every store's
tables live in that PostgreSQL database, shared by all replicas (cloud_sync/platform/sql/).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# Same bound the bundle reader applies by default (runtimes.bundle.DEFAULT_MAX_BUNDLE_BYTES):
# the registry never stores what a device would refuse to download.
DEFAULT_MAX_BUNDLE_BYTES = 512 << 20
DEFAULT_PORT = 8690
# In-flight requests get this long to finish after SIGTERM.
DEFAULT_DRAIN_S = 10.0


def default_data_dir() -> Path:
    """The user's data directory (XDG), so `edge-cloud serve` works without any flag."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "edgefn-cloud"


@dataclass(frozen=True, slots=True)
class PlatformSettings:
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    max_bundle_bytes: int = DEFAULT_MAX_BUNDLE_BYTES
    drain_s: float = DEFAULT_DRAIN_S
    access_log: bool = True
    # MQTT: "" = none (registry only), "embedded" = amqtt on 127.0.0.1:`mqtt_port` (0 picks a
    # free port), or an external broker URL (mqtts://host:port) the platform and devices use.
    broker: str = ""
    mqtt_port: int = 0
    # What devices are told in their credentials; default: the broker URL / the URL they enrolled
    # through. Set when devices reach the platform under another name than the operator.
    device_broker_url: str = ""
    public_url: str = ""
    # Serve HTTPS (server certificate from the platform CA) and accept device client certificates.
    tls: bool = False
    # TUF (`cloud_sync.platform.tuf`): how long a signed timestamp is valid; re-signed at half.
    tuf_timestamp_expiry_s: float = 86400.0
    # How long a signed desired document (director instruction) stays valid; re-issued at half.
    director_ttl_s: int = 7 * 86_400
    # None: SQLite files in the data dir. postgresql://USER@HOST:PORT/DB: PostgreSQL (password
    # from PGPASSWORD, EDGEFN_DATABASE_PASSWORD or EDGEFN_DATABASE_PASSWORD_FILE, never here).
    database_url: str | None = None
    # With `tls`: serve this certificate chain and key (PEM) instead of one from the platform CA
    # (a certificate from the operator's own CA for the public name devices dial).
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # Where bundle bytes live (blobs.py): None = `blobs_dir`; file:///PATH (a shared directory)
    # or s3://BUCKET?endpoint=URL (credentials from the environment, never in the URL).
    blobs_url: str | None = None
    # Several replicas (leader.py, docs/scale-out.md). `lease`: a postgresql:// URL (no password
    # in it: libpq reads PGPASSWORD / ~/.pgpass) for the leader election; "" = this process is
    # the only one and always the leader. `replica_id` names this replica (its MQTT client id
    # is `edgefn-platform-<id>`; keep it stable across restarts so the broker hands its session
    # back). `shared_subscriptions`: None = on with an external broker, off with the embedded
    # one (amqtt has no MQTT 5 shared subscriptions).
    lease: str = ""
    replica_id: str = ""
    shared_subscriptions: bool | None = None

    @property
    def shares_device_traffic(self) -> bool:
        if self.shared_subscriptions is not None:
            return self.shared_subscriptions
        return self.broker not in ("", "embedded")

    @property
    def token_file(self) -> Path:
        return self.data_dir / "admin.token"

    @property
    def state_file(self) -> Path:
        """Where a running platform says where it listens (read by tests and `fn publish`)."""
        return self.data_dir / "platform.json"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "registry.db"

    @property
    def fleet_db(self) -> Path:
        return self.data_dir / "fleet.db"

    @property
    def blobs_dir(self) -> Path:
        return self.data_dir / "blobs"

    @property
    def publishers_dir(self) -> Path:
        return self.data_dir / "publishers"
