"""`edge-agent run`: its flags, and the one place they meet the config file and the environment.

Every flag defaults to None (argparse's "not given"), so a flag overrides the config file only
when it is on the command line; what neither sets keeps the `Settings` default.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import fields
from pathlib import Path
from typing import Any

from edge_agent import config_file
from edge_agent.errors import StartupError
from edge_agent.settings import DEFAULT_CONFIG_FILE, Settings, default_data_dir

# argparse dest -> Settings field, for the flags whose names differ from their field.
_FLAG_FIELDS = {
    "scan_interval": "scan_interval_s",
    "drain": "drain_s",
    "cloud": "cloud_url",
    "credentials": "credentials_file",
    "fallback_after": "fallback_after_s",
    "metrics_interval": "metrics_interval_s",
    "tls_cert": "tls_cert_file",
    "tls_key": "tls_key_file",
    "tls_client_ca": "tls_client_ca_file",
    "header_timeout": "header_timeout_s",
    "idle_timeout": "idle_timeout_s",
}
_NOT_SETTINGS = frozenset({"command", "config", "label", "tls"})


def add_parser(sub: Any) -> None:
    """Register `run` on the top-level subparsers."""
    run = sub.add_parser("run", help="run the agent: load functions and serve the local API")
    run.add_argument(
        "--config",
        type=Path,
        help=f"TOML config file (default: {DEFAULT_CONFIG_FILE} when it exists); flags win",
    )
    run.add_argument(
        "--data-dir",
        type=Path,
        help="agent data directory (default: $EDGEFN_DATA_DIR or ~/.local/share/edgefn)",
    )
    run.add_argument("--host", help="address to bind (default 127.0.0.1)")
    run.add_argument("--port", type=int, help="port (default 8680; 0 picks a free one)")
    run.add_argument(
        "--auth",
        choices=("none", "token", "mtls"),
        help="who may call the API: token = bearer tokens from `edge-agent token create`, "
        "mtls = client certificates (required for a --host other than loopback)",
    )
    run.add_argument(
        "--advertise",
        metavar="IFACE[,IFACE]",
        help="advertise the API with zeroconf (_edgefn._tcp) on these interfaces",
    )
    run.add_argument(
        "--tls",
        choices=["auto"],
        help="auto: serve HTTPS with the server certificate issued at enrolment (beside the "
        "--credentials file)",
    )
    run.add_argument(
        "--tls-cert", type=Path, help="serve HTTPS: server certificate (PEM) from the fleet CA"
    )
    run.add_argument("--tls-key", type=Path, help="the certificate's private key (PEM)")
    run.add_argument(
        "--tls-client-ca", type=Path, help="require client certificates from this CA (mTLS)"
    )
    run.add_argument("--max-body-bytes", type=int)
    run.add_argument("--max-connections", type=int, help="open connections at most (256)")
    run.add_argument(
        "--header-timeout", type=float, help="seconds a client has to send its headers (10)"
    )
    run.add_argument(
        "--idle-timeout", type=float, help="seconds an idle keep-alive connection is kept (15)"
    )
    run.add_argument("--max-headers", type=int, help="request headers at most (64)")
    run.add_argument("--max-header-bytes", type=int, help="bytes per header line (8190)")
    run.add_argument(
        "--token-concurrency", type=int, help="requests in flight per token (32; 0: no limit)"
    )
    run.add_argument("--log-format", choices=("text", "json"))
    run.add_argument("--log-level", choices=config_file.LOG_LEVELS)
    run.add_argument(
        "--update-security",
        choices=("tuf", "signatures"),
        help="verify registry installs with TUF metadata, or bundle signatures only",
    )
    run.add_argument(
        "--require-signed",
        action=argparse.BooleanOptionalAction,
        help="refuse unsigned development functions",
    )
    run.add_argument(
        "--worker-user",
        help="user workers run as when the agent is root (default: edgefn-worker if it exists)",
    )
    run.add_argument("--budget-memory-mb", type=int, help="total worker memory")
    run.add_argument("--budget-workers", type=int, help="total worker processes")
    run.add_argument("--label", action="append", help="device label KEY=VALUE")
    run.add_argument("--scan-interval", type=float, help=argparse.SUPPRESS)
    run.add_argument("--drain", type=float, help="seconds in-flight requests get on SIGTERM")
    run.add_argument("--cache-max-bytes", type=int, help="result cache bound")
    run.add_argument(
        "--cloud",
        action="append",
        help="central platform URL (cloud routing, sync); repeat for its replicas (failover)",
    )
    run.add_argument(
        "--cloud-token", help="device token for the platform (default: $EDGEFN_CLOUD_TOKEN)"
    )
    run.add_argument(
        "--credentials",
        type=Path,
        help="device credentials file from `edge-cloud device enroll`: joins the platform",
    )
    run.add_argument(
        "--fallback-after",
        type=float,
        help="seconds the MQTT broker may be unreachable before syncing over HTTP (default 30)",
    )
    run.add_argument("--metrics-interval", type=float, help="seconds per metrics record")
    run.add_argument("--outbox-max-bytes", type=int, help="sync outbox bound")
    run.add_argument(
        "--default-routing",
        choices=config_file.ROUTING_CHOICES,
        help="routing for functions not installed on this device",
    )


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Defaults <- config file <- environment <- explicit flags; raises StartupError."""
    path: Path | None = args.config
    if path is None and DEFAULT_CONFIG_FILE.is_file():
        path = DEFAULT_CONFIG_FILE
    values: dict[str, Any] = config_file.load(path) if path is not None else {}
    if os.environ.get("EDGEFN_DATA_DIR"):
        values["data_dir"] = Path(os.environ["EDGEFN_DATA_DIR"])
    if os.environ.get("EDGEFN_CLOUD_TOKEN"):
        values["cloud_token"] = os.environ["EDGEFN_CLOUD_TOKEN"]
    known = {f.name for f in fields(Settings)}
    for dest, value in vars(args).items():
        if value is None or dest in _NOT_SETTINGS:
            continue
        name = _FLAG_FIELDS.get(dest, dest)
        assert name in known, dest  # a new flag without a field is a bug here
        values[name] = value
    if args.advertise is not None:
        values["advertise"] = tuple(i for i in args.advertise.split(",") if i)
    if args.label:
        labels = dict(values.get("labels", ()))
        for item in args.label:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise StartupError(f"--label takes KEY=VALUE, not {item!r}")
            labels[key] = value
        values["labels"] = tuple(labels.items())
    _split_cloud_urls(values)
    data_dir = Path(values.pop("data_dir", None) or default_data_dir()).resolve()
    for name in ("credentials_file", "tls_cert_file", "tls_key_file", "tls_client_ca_file"):
        if values.get(name) is not None:
            values[name] = Path(values[name]).resolve()
    if values.pop("tls_auto", False) or args.tls == "auto":
        _enrolled_tls(values)
    _check_values(values)
    settings = Settings(data_dir=data_dir, config_file=path, **values)
    settings.check()
    return settings


def _split_cloud_urls(values: dict[str, Any]) -> None:
    """`--cloud A --cloud B` / `cloud.url = [A, B]`: A is `cloud_url`, the rest its fallbacks."""
    urls = values.get("cloud_url")
    if not isinstance(urls, list | tuple):
        return
    urls = [u.rstrip("/") for u in urls if u]
    for url in urls:
        if not url.startswith(("http://", "https://")):
            raise StartupError(f"cloud URL must be http(s)://..., not {url!r}")
    unique = list(dict.fromkeys(urls))  # each once, in the order given
    values["cloud_url"] = unique[0] if unique else ""
    values["cloud_fallback_urls"] = tuple(unique[1:])


def _enrolled_tls(values: dict[str, Any]) -> None:
    """`--tls auto`: use the server certificate that enrolment wrote beside the credentials."""
    from cloud_sync.credentials import server_cert_paths

    creds = values.get("credentials_file")
    if creds is None:
        raise StartupError(
            "tls auto (--tls auto / [tls] auto) needs the enrolment credentials file "
            "(--credentials / [cloud] credentials_file): the certificate is found beside it"
        )
    cert, key = server_cert_paths(creds)
    missing = [str(p) for p in (cert, key) if not p.is_file()]
    if missing:
        raise StartupError(
            f"tls auto: no server certificate from enrolment ({', '.join(missing)} missing); "
            "enrol with `edge-cloud device enroll ID --out ... --san ADDRESS`, or give "
            "--tls-cert/--tls-key"
        )
    values.setdefault("tls_cert_file", cert)
    values.setdefault("tls_key_file", key)


def _check_values(values: dict[str, Any]) -> None:
    """Bounds that both the file and the flags must respect; the message names both spellings."""
    bad = []
    if values.get("max_body_bytes", 1) <= 0:
        bad.append("max_body_bytes (--max-body-bytes) must be > 0")
    if values.get("fallback_after_s", 1) <= 0 or values.get("metrics_interval_s", 1) <= 0:
        bad.append("fallback_after_s/metrics_interval_s (--fallback-after/--metrics-interval) > 0")
    if values.get("outbox_max_bytes", 4096) < 4096:
        bad.append("outbox_max_bytes (--outbox-max-bytes) must be >= 4096")
    for name in ("max_connections", "max_headers", "max_header_bytes"):
        if values.get(name, 1) <= 0:
            bad.append(f"{name} (--{name.replace('_', '-')}) must be > 0")
    if values.get("header_timeout_s", 1) <= 0:
        bad.append("header_timeout_s (--header-timeout) must be > 0")
    if values.get("idle_timeout_s", 1) <= 0:
        bad.append("idle_timeout_s (--idle-timeout) must be > 0")
    if values.get("token_concurrency", 0) < 0:
        bad.append("token_concurrency (--token-concurrency) must be >= 0")
    if not 0 <= values.get("port", 0) <= 65535:
        bad.append("port (--port) must be 0-65535")
    if bad:
        raise StartupError("; ".join(bad))
