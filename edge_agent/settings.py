"""The agent's settings: one frozen object, built once from the config file, environment and flags.

Precedence, lowest first: the defaults below, the config file (`edge_agent.config_file`), the
environment (`$EDGEFN_DATA_DIR`, `$EDGEFN_CLOUD_TOKEN`), flags given explicitly on the command
line. Everything else receives the pieces it needs from `Agent`; nothing reads settings globally.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from edge_agent.errors import StartupError

LogFormat = Literal["text", "json"]
# "none": no checking (the loopback default); "token": bearer tokens (edge_agent.tokens);
# "mtls": client certificates from the client CA, with grants in the token file.
AuthMode = Literal["none", "token", "mtls"]

# 6 MiB: the same default request limit as AWS Lambda's synchronous invocations, which most
# function authors already design for.
DEFAULT_MAX_BODY_BYTES = 6 * 1024 * 1024
# How often the functions directory is checked for installs, removals and version switches.
DEFAULT_SCAN_INTERVAL_S = 2.0
# Staged shutdown: in-flight requests get this long to finish after SIGTERM.
DEFAULT_DRAIN_S = 10.0
# The packaged agent's config file; used when it exists and no --config is given.
DEFAULT_CONFIG_FILE = Path("/etc/edgefn/agent.toml")


def default_data_dir() -> Path:
    """The user's data directory (XDG), so `edge-agent run` works without any flag."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "edgefn"


@dataclass(frozen=True, slots=True)
class Settings:
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8680
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    log_format: LogFormat = "text"
    log_level: str = "info"
    require_signed: bool = False
    scan_interval_s: float = DEFAULT_SCAN_INTERVAL_S
    drain_s: float = DEFAULT_DRAIN_S
    # "auto": when running as root, workers run as `edgefn-worker` if that user exists (the
    # .deb creates it), else as the agent's own user with a warning. A name forces that user.
    worker_user: str = "auto"
    # Worker budget; 0 derives it from the device profile (half the memory, 4 workers/CPU).
    budget_memory_mb: int = 0
    budget_workers: int = 0
    labels: tuple[tuple[str, str], ...] = ()
    cache_max_bytes: int = 64 * 1024 * 1024
    # The central platform, for cloud routing (and, with credentials, sync).
    cloud_url: str = ""
    # More URLs of the same platform (its replicas): tried in order when the current one is
    # unreachable or answers 502-504; the one that answers is kept (cloud_sync.http_failover).
    cloud_fallback_urls: tuple[str, ...] = ()
    cloud_token: str = ""
    default_routing: str = "local"  # policy for functions not installed here
    # Sync with the platform (cloud_sync.sync): the enrolment credentials file turns it on.
    credentials_file: Path | None = None
    fallback_after_s: float = 30.0  # broker unreachable this long -> HTTP fallback
    metrics_interval_s: float = 10.0  # until the desired config sets metrics.interval_s
    outbox_max_bytes: int = 16 * 1024 * 1024
    # Local API security (docs/lan.md): who may call the API, checked by edge_agent.auth.
    auth: AuthMode = "none"
    # TLS on the listener (edge_agent.tls): a server certificate from the fleet CA and its key.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # With it, clients must present a certificate from this CA (auth = "mtls" needs it).
    tls_client_ca_file: Path | None = None
    # Listener limits (edge_agent.listener) and requests in flight per token (edge_agent.auth).
    max_connections: int = 256
    header_timeout_s: float = 10.0  # every request's headers must arrive within this
    idle_timeout_s: float = 15.0  # keep-alive connections idle this long are closed
    max_headers: int = 64
    max_header_bytes: int = 8190  # per header line (aiohttp's default)
    fast_invoke: bool = True  # the invoke route on edge_agent.fastpath (off: all on aiohttp)
    token_concurrency: int = 32  # 0: no limit
    # Interfaces to advertise the API on with zeroconf (edge_agent.discovery); empty: off.
    advertise: tuple[str, ...] = ()
    # How installs from the registry are verified (edge_agent.update_security): "tuf" or
    # "signatures"; None (library/dev default) decides by the device's pinned TUF root.
    # The packaged config file says "tuf". "tuf" also requires desired state signed by the
    # director (the credentials must carry its key); credentials that carry a director key are
    # always enforced, whatever this says (docs/update-security.md).
    update_security: str | None = None
    # The config file these settings were read from, if any (for messages).
    config_file: Path | None = None

    @property
    def functions_dir(self) -> Path:
        return self.data_dir / "functions"

    @property
    def state_file(self) -> Path:
        """Where a running agent says where it listens (read by `edge-agent invoke`)."""
        return self.data_dir / "agent.json"

    @property
    def tokens_file(self) -> Path:
        """The token store (edge_agent.tokens): hashes only, never the tokens."""
        return self.data_dir / "tokens.json"

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None

    def check(self) -> None:
        """Refuse combinations that must not start, before anything listens."""
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise StartupError(
                "tls: give both the certificate and the key (--tls-cert and --tls-key, or "
                "tls.cert_file and tls.key_file in the config file)"
            )
        if self.auth == "mtls" and (self.tls_cert_file is None or self.tls_client_ca_file is None):
            raise StartupError(
                "auth = 'mtls' needs TLS with a client CA: pass --tls-cert, --tls-key and "
                "--tls-client-ca (or tls.cert_file, tls.key_file, tls.client_ca_file in the "
                "config file)"
            )
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise StartupError("tls: --tls-client-ca needs --tls-cert and --tls-key")
        if self.advertise and is_loopback(self.host):
            raise StartupError(
                f"advertise = {list(self.advertise)} with host = {self.host!r}: LAN clients "
                "could find the agent but not reach it. Set --host (host = ...) to an address "
                "on those interfaces, or 0.0.0.0"
            )
        if self.auth == "none" and not is_loopback(self.host):
            # Anyone who can reach the address could call every function and purge caches.
            raise StartupError(
                f"refusing to listen on {self.host} without authentication: anyone on the "
                'network could call every function. Pass --auth token (or set auth = "token" '
                "in the config file) and create tokens with `edge-agent token create`, or keep "
                "--host 127.0.0.1"
            )


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything
