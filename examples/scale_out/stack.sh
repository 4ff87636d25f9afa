#!/bin/sh
# Three platform replicas on one machine, for trying docs/scale-out.md: a throwaway PostgreSQL,
# a Mosquitto configured by `edge-cloud broker config`, and `edge-cloud serve` x3 with the
# replica flags. Everything lives under one directory; nothing is installed or left running
# after `down`. Loopback only. Not for production (see docs/scale-out.md for that).
#
#   examples/scale_out/stack.sh s3 DIR          first, optional: an S3-compatible server (moto)
#   examples/scale_out/stack.sh up DIR          PostgreSQL, Mosquitto, replicas a b c
#   examples/scale_out/stack.sh replica DIR N   (re)start replica N (a, b or c) under its name
#   examples/scale_out/stack.sh status DIR      who runs, who leads
#   examples/scale_out/stack.sh down DIR        stop everything started here
#
# Environment: EDGE_CLOUD (the command, default `edge-cloud`), PGPORT (15432), MQTT_PORT (8883),
# HTTP_PORT (8690: replicas on 8690, 8691, 8692), S3_PORT (15000), BLOBS (passed to every
# replica as `--blobs` when set; after `s3`, `. DIR/s3.env` sets it and moto's dummy keys).
# The database password is generated into DIR/pgpass (0600) and reaches the replicas through
# libpq's PGPASSFILE: never on a command line.
set -eu

cmd=${1:-}
dir=${2:-}
[ -n "$cmd" ] && [ -n "$dir" ] || { sed -n '6,11p' "$0" >&2; exit 2; }
EDGE_CLOUD=${EDGE_CLOUD:-edge-cloud}
PGPORT=${PGPORT:-15432}
MQTT_PORT=${MQTT_PORT:-8883}
HTTP_PORT=${HTTP_PORT:-8690}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
D=$dir/platform                       # the replicas' shared data dir (platform CA, blobs)
DB=postgresql://edgefn@127.0.0.1:$PGPORT/edgefn
mkdir -p "$dir/logs" "$dir/pids"

port_of() { # replica name -> HTTP port
    case $1 in a) echo "$HTTP_PORT" ;; b) echo $((HTTP_PORT + 1)) ;; c) echo $((HTTP_PORT + 2)) ;;
        *) echo "replica must be a, b or c" >&2; exit 2 ;; esac
}

pg_bin() {
    ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
}

# PostgreSQL refuses to run as root: as root, the server runs as the `postgres` user.
as_pg() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

start_postgres() {
    bin=$(pg_bin)
    [ -n "$bin" ] || { echo "PostgreSQL server not installed: apt-get install -y postgresql" >&2; exit 1; }
    super=$( [ "$(id -u)" = 0 ] && echo postgres || id -un )
    if [ ! -f "$dir/pg/data/PG_VERSION" ]; then
        mkdir -p "$dir/pg/sock"
        if [ "$(id -u)" = 0 ]; then chown -R postgres: "$dir/pg"; fi
        as_pg "$bin/initdb" -D "$dir/pg/data" -U "$super" --auth-local=peer \
            --auth-host=scram-sha-256 -E UTF8 --no-instructions >"$dir/logs/initdb.log"
        pw=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
        (umask 077 && echo "127.0.0.1:$PGPORT:edgefn:edgefn:$pw" >"$dir/pgpass")
    fi
    start_pg_server
    if [ ! -f "$dir/pg/role-made" ]; then  # the role and database, once (docs/scale-out.md)
        pw=$(cut -d: -f5 "$dir/pgpass")
        as_pg "$bin/psql" -X -q -h "$dir/pg/sock" -p "$PGPORT" -U "$super" -d postgres \
            -c "CREATE ROLE edgefn LOGIN PASSWORD '$pw'" -c "CREATE DATABASE edgefn OWNER edgefn"
        touch "$dir/pg/role-made"
    fi
}

start_pg_server() {
    bin=$(pg_bin)
    as_pg "$bin/pg_ctl" -D "$dir/pg/data" -l "$dir/pg/server.log" -w \
        -o "-c listen_addresses=127.0.0.1 -p $PGPORT -k $dir/pg/sock" start >/dev/null
    echo "PostgreSQL on 127.0.0.1:$PGPORT ($DB, password in $dir/pgpass)"
}

start_broker() {
    # The platform CA is made in $D on first use; the broker trusts it.
    $EDGE_CLOUD broker config --data-dir "$D" --out "$dir/mosquitto" --port "$MQTT_PORT" >/dev/null
    mosquitto -c "$dir/mosquitto/mosquitto.conf" >>"$dir/logs/mosquitto.log" 2>&1 &
    echo $! >"$dir/pids/mosquitto.pid"
    echo "Mosquitto on mqtts://127.0.0.1:$MQTT_PORT (pid $!)"
}

start_replica() { # NAME
    name=$1
    port=$(port_of "$name")
    pid_file=$dir/pids/replica-$name.pid
    if [ -f "$pid_file" ] && kill -0 "$(cat "$pid_file")" 2>/dev/null; then
        echo "replica $name already runs (pid $(cat "$pid_file"))"; return
    fi
    # shellcheck disable=SC2086 # BLOBS is one word or nothing
    PGPASSFILE=$dir/pgpass $EDGE_CLOUD serve --data-dir "$D" --database "$DB" \
        --broker "mqtts://127.0.0.1:$MQTT_PORT" --replica-id "$name" --port "$port" \
        ${BLOBS:+--blobs "$BLOBS"} >>"$dir/logs/replica-$name.log" 2>&1 &
    echo $! >"$pid_file"
    i=0
    until curl -sf "http://127.0.0.1:$port/v1/health" >/dev/null 2>&1; do
        i=$((i + 1))
        if [ $i -gt 300 ] || ! kill -0 "$(cat "$pid_file")" 2>/dev/null; then
            echo "replica $name did not start; tail of $dir/logs/replica-$name.log:" >&2
            tail -n 20 "$dir/logs/replica-$name.log" >&2
            exit 1
        fi
        sleep 0.1
    done
    echo "replica $name on http://127.0.0.1:$port (pid $(cat "$pid_file"))"
}

start_s3() {
    # moto in server mode (`pip install 'moto[server]'`): S3's API in memory, any credentials.
    s3_port=${S3_PORT:-15000}
    moto_server -H 127.0.0.1 -p "$s3_port" >>"$dir/logs/moto.log" 2>&1 &
    echo $! >"$dir/pids/moto.pid"
    i=0
    until curl -s "http://127.0.0.1:$s3_port/" >/dev/null 2>&1; do
        i=$((i + 1)); [ $i -le 300 ] || { echo "moto_server did not start" >&2; exit 1; }
        sleep 0.1
    done
    {
        echo "export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1"
        echo "export BLOBS='s3://edgefn-bundles?endpoint=http://127.0.0.1:$s3_port'"
    } >"$dir/s3.env"
    # The platform never creates buckets (docs/scale-out.md, "Pointing it at a real store").
    curl -sf -X PUT "http://127.0.0.1:$s3_port/edgefn-bundles" >/dev/null
    echo "moto on http://127.0.0.1:$s3_port, bucket edgefn-bundles; next: . $dir/s3.env"
}

status() {
    for name in a b c; do
        port=$(port_of "$name")
        printf '%s  ' "$name"
        curl -s --max-time 3 "http://127.0.0.1:$port/v1/health" || printf 'not running'
        echo
    done
}

stop_pid() { # FILE
    [ -f "$1" ] || return 0
    pid=$(cat "$1")
    kill "$pid" 2>/dev/null || true
    i=0
    while kill -0 "$pid" 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$1"
}

case $cmd in
up)
    start_postgres
    start_broker
    for name in a b c; do start_replica "$name"; done
    echo "operator token: $D/admin.token"
    ;;
s3) start_s3 ;;
replica) start_replica "${3:?replica name: a, b or c}" ;;
status) status ;;
down)
    for name in a b c; do stop_pid "$dir/pids/replica-$name.pid"; done
    stop_pid "$dir/pids/mosquitto.pid"
    stop_pid "$dir/pids/moto.pid"
    [ -f "$dir/pg/data/postmaster.pid" ] && as_pg "$(pg_bin)/pg_ctl" -D "$dir/pg/data" -m fast -w stop >/dev/null
    echo "stopped (state kept in $dir: delete it to start over)"
    ;;
*) sed -n '6,11p' "$0" >&2; exit 2 ;;
esac
