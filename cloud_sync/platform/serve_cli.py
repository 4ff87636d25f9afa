"""`edge-cloud serve`: its flags, and the one place they meet the config file and the environment.

Every flag defaults to None ("not given") so that a flag overrides the `--config` file only when
it is on the command line (`platform/config_file.py` merges them).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from cloud_sync.platform.cli_exit import EXIT_ERROR, EXIT_UNREACHABLE, EXIT_USAGE
from cloud_sync.platform.cli_exit import fail as _fail


def add_parser(sub: Any) -> None:
    from cloud_sync.platform.settings import DEFAULT_PORT

    serve = sub.add_parser("serve", help="run the platform: function registry")
    # Every serve flag defaults to None ("not given") so that it overrides the --config file
    # only when it is on the command line (platform/config_file.py merges them).
    serve.add_argument(
        "--config", type=Path, help="TOML config file (e.g. /etc/edgefn/platform.toml); flags win"
    )
    serve.add_argument(
        "--data-dir",
        type=Path,
        help="platform data directory (default: $EDGEFN_CLOUD_DATA_DIR or "
        "~/.local/share/edgefn-cloud)",
    )
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument(
        "--port", type=int, help=f"port (default {DEFAULT_PORT}; 0 picks a free one)"
    )
    serve.add_argument("--max-bundle-bytes", type=int, default=None)
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    mq = serve.add_mutually_exclusive_group()
    mq.add_argument(
        "--mqtt-port",
        type=int,
        help="port of the embedded MQTT broker on 127.0.0.1 (default: $EDGEFN_MQTT_PORT or a "
        "free one)",
    )
    mq.add_argument("--broker", help="external broker, mqtts://host:port (Mosquitto, EMQX, ...)")
    serve.add_argument(
        "--director-ttl-s",
        type=int,
        help="lifetime of a signed desired document (default 7 days; re-issued at half)",
    )
    serve.add_argument(
        "--no-mqtt", action="store_true", default=None, help="no broker at all (HTTP only)"
    )
    serve.add_argument(
        "--tls", action="store_true", default=None, help="serve HTTPS (certificate from the CA)"
    )
    serve.add_argument("--public-url", help="platform URL written into credentials")
    serve.add_argument("--device-broker-url", help="broker URL written into credentials")
    serve.add_argument(
        "--blobs",
        metavar="URL",
        help="where bundles live: file:///PATH (a shared directory) or s3://BUCKET?endpoint=URL "
        "(credentials from $AWS_ACCESS_KEY_ID/$AWS_SECRET_ACCESS_KEY or a credentials file); "
        "default: the data dir's blobs/",
    )
    serve.add_argument(
        "--tuf-timestamp-expiry",
        type=float,
        metavar="SECONDS",
        help="life of the signed TUF timestamp, re-signed at half of it (default 1 day)",
    )
    # Several replicas (docs/scale-out.md).
    serve.add_argument(
        "--lease",
        default=os.environ.get("EDGEFN_LEASE", ""),
        help="postgresql:// URL for the leader election among replicas (no password in it:"
        " PGPASSWORD or ~/.pgpass; default $EDGEFN_LEASE; none: a single process)",
    )
    serve.add_argument(
        "--replica-id",
        default=os.environ.get("EDGEFN_REPLICA_ID", ""),
        help="this replica's stable name (its MQTT client id; default $EDGEFN_REPLICA_ID)",
    )
    serve.add_argument(
        "--shared-subscriptions",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="MQTT 5 shared subscriptions (default: on for a --replica-id with --broker)",
    )
    serve.add_argument(
        "--database",
        default=os.environ.get("EDGEFN_DATABASE_URL") or None,
        metavar="URL",
        help="postgresql://USER@HOST:PORT/DB for the platform's state (default: SQLite files in"
        " the data dir); the password comes from PGPASSWORD, EDGEFN_DATABASE_PASSWORD or"
        " EDGEFN_DATABASE_PASSWORD_FILE, never from the URL",
    )


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from cloud_sync.errors import CloudSyncError
    from cloud_sync.platform import config_file
    from cloud_sync.platform.leader import replica_settings_problem
    from cloud_sync.platform.server import serve
    from cloud_sync.platform.sql import DatabaseUnavailable, refuse_password_in_url

    flags = {
        "data_dir": args.data_dir,
        "host": args.host,
        "port": args.port,
        "max_bundle_bytes": args.max_bundle_bytes,
        "broker": "" if args.no_mqtt else args.broker,
        "mqtt_port": args.mqtt_port,
        "tls": args.tls,
        "public_url": args.public_url,
        "device_broker_url": args.device_broker_url,
        "blobs_url": args.blobs,
        "database_url": args.database,
        "tuf_timestamp_expiry_s": args.tuf_timestamp_expiry,
        "director_ttl_s": args.director_ttl_s,
        "lease": args.lease,
        "replica_id": args.replica_id,
        "shared_subscriptions": args.shared_subscriptions,
        "log_level": args.log_level,
    }
    try:
        from_file = config_file.load(args.config) if args.config is not None else {}
        settings, extra = config_file.settings_from(from_file, flags)
        if settings.database_url:
            refuse_password_in_url(settings.database_url)
    except CloudSyncError as exc:
        return _fail(exc.one_line(), EXIT_USAGE)
    if extra.get("blobs_credentials_file") is not None:
        # boto3 reads its credentials file from here; an explicit environment wins.
        os.environ.setdefault("AWS_SHARED_CREDENTIALS_FILE", str(extra["blobs_credentials_file"]))
    if extra.get("database_password") is not None:
        # Read from `[database] password_file`; the engine takes it from this process's
        # environment (never argv, never a log line). An explicit environment wins.
        os.environ.setdefault("EDGEFN_DATABASE_PASSWORD", str(extra["database_password"]))
    log_level = str(extra.get("log_level") or "info")
    logging.basicConfig(
        level=log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if log_level != "debug":
        # The embedded broker (amqtt) drives its sessions with `transitions`, which logs every
        # state-machine callback at INFO: several lines per device connection. Only for
        # --log-level debug.
        logging.getLogger("transitions").setLevel(logging.WARNING)
    problem = replica_settings_problem(settings.lease, settings.replica_id)
    if problem:
        return _fail(problem, EXIT_USAGE)
    try:
        asyncio.run(serve(settings))
    except DatabaseUnavailable as exc:
        return _fail(exc.one_line(), EXIT_UNREACHABLE)
    except CloudSyncError as exc:
        return _fail(exc.one_line(), EXIT_USAGE)
    except OSError as exc:
        return _fail(str(exc), EXIT_ERROR)
    return 0
