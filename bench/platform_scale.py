"""Platform scale-out: metrics intake and a fleet rollout, 1-3 replicas vs one SQLite process.

Run: `.venv/bin/python -m bench.platform_scale [--quick] [--replicas 1,2,3] [--devices 10000]`.

Everything on this machine, on loopback, started by the bench itself: one PostgreSQL 15 (the
tests' helper, `tests/postgres.py`: `initdb` + `pg_ctl` as an unprivileged user, fsync off), one
Mosquitto 2 (the tests' helper with the rollout bench's deeper per-client queue), and the
platform as real `edge-cloud serve` processes. The baseline of every table is measured in the
same run: the single platform process on its SQLite files (`--broker` the same Mosquitto, no
`--database`). Each configuration gets a fresh database, broker and data dir.

* **Intake**: `--intake-devices` devices (enrolled through the API), each with its own MQTT 5
  session (`cloud_sync.mqtt.MqttSession`, the agent's client), publish `--records` metric
  records in all (QoS 1, each awaiting its PUBACK; the record builder of
  `tests/replica_helpers.py`), closed-loop: at most `BACKLOG` records published and not yet
  stored (a bigger burst overfills the platform's inbound queue, see `Backlog`). Records per
  second *stored*: from the sessions' start until the database holds every record (counted in
  the database every 50 ms, not in the replicas' counters).
* **Rollout**: `edge-cloud simulate --devices N` (every device's MQTT session on one asyncio
  loop), a Node function published, a 4-wave rollout (`1,10,50,100`, bake 0) created through
  the last replica (a follower when there are several); wall time from `POST /v1/rollouts` to
  `succeeded`.

Where the time goes: CPU seconds (user + system, psutil) of each platform process, of
PostgreSQL (the postmaster and all its backends), of Mosquitto and of the load (the bench
process itself for intake; the simulator process for the rollout), over the measured window.
On two cores the point is not absolute speed but that nothing serialises: the ratio columns
compare each row with the SQLite baseline and with one replica.

Not a test: nothing is asserted. Every wait is bounded (`--timeout`). The figures go into
docs/BENCHMARKS.md and docs/scale-out.md ("Sizing").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench.proc_cpu import CpuMeter
from bench.rollout import CONNECT_RATE, ENDED, FN, api, cli, rollout_spec
from cloud_sync import topics
from cloud_sync.credentials import DeviceCredentials
from cloud_sync.mqtt import USER_PROPERTY_KEY, USER_PROPERTY_KIND, MqttSession
from tests.mosquitto import Broker
from tests.postgres import PostgresServer, _make_server
from tests.registry_helpers import Platform, start_platform
from tests.replica_helpers import enrol, metrics_record

BASELINE = "sqlite"
BACKLOG = 400  # records published but not yet stored, at most (see `Backlog`)


# ---- processes and their CPU (bench/proc_cpu.py) ---------------------------------------


def _postmaster_pid(pg: PostgresServer) -> int:
    return int((pg.data_dir / "postmaster.pid").read_text().split()[0])


# ---- one configuration: broker + database + replicas ----------------------------------------


@dataclass
class Setup:
    """One measured configuration, torn down by `close()`."""

    name: str
    work: Path
    broker: Broker
    database: str | None  # None: the SQLite baseline
    replicas: list[Platform] = field(default_factory=list)

    @property
    def data(self) -> Path:
        return self.broker.workdir / "platform"  # holds the CA the broker trusts

    def start(self, count: int) -> None:
        for i in range(count):
            extra = ["--broker", self.broker.url]
            if self.database is not None:
                extra += ["--database", self.database, "--replica-id", f"r{i + 1}"]
            self.replicas.append(start_platform(self.data, *extra, timeout=120))
        wait_ready(self.replicas)

    def count_metrics(self) -> int:
        if self.database is None:
            with sqlite3.connect(self.data / "fleet.db", timeout=30) as conn:
                (n,) = conn.execute("SELECT COUNT(*) FROM records WHERE kind='metrics'").fetchone()
            return int(n)
        import psycopg

        with psycopg.connect(self.database, connect_timeout=10) as conn:
            row = conn.execute("SELECT COUNT(*) FROM records WHERE kind='metrics'").fetchone()
        return int(row[0]) if row else 0

    def count_records_since(self, t0: float) -> int:
        sql = "SELECT COUNT(*) FROM records WHERE received_at >= "
        if self.database is None:
            with sqlite3.connect(self.data / "fleet.db", timeout=30) as conn:
                (n,) = conn.execute(sql + "?", (t0,)).fetchone()
            return int(n)
        import psycopg

        with psycopg.connect(self.database, connect_timeout=10) as conn:
            row = conn.execute(sql + "%s", (t0,)).fetchone()
        return int(row[0]) if row else 0

    def close(self) -> None:
        for p in self.replicas:
            p.stop()
        self.broker.stop()


def wait_ready(replicas: list[Platform], within_s: float = 60) -> None:
    """Every replica subscribed to the broker, and (several) exactly one leader."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        views = [api(p.url, p.token, "GET", "/v1/replica") for p in replicas]
        subscribed = all(v.get("mqtt") and v["mqtt"].get("subscribed") for v in views)
        leaders = sum(1 for v in views if v["lease"]["leader"])
        if subscribed and leaders == 1:
            return
        time.sleep(0.2)
    raise SystemExit("replicas not ready (subscribed, one leader) within the bound")


@contextmanager
def configuration(name: str, root: Path, pg: PostgresServer, replicas: int) -> Iterator[Setup]:
    work = root / f"{name}-{uuid.uuid4().hex[:6]}"
    work.mkdir()
    broker = Broker(work)  # its queue holds a fleet's burst (broker_config.MAX_QUEUED_MESSAGES)
    broker.start()
    database = None
    if name != BASELINE:
        db = "b_" + uuid.uuid4().hex[:10]
        pg.psql(f"CREATE DATABASE {db}")
        database = pg.url(db)
    setup = Setup(name, work, broker, database)
    try:
        setup.start(replicas)
        yield setup
    finally:
        setup.close()
        if database is not None:
            pg.psql(f"DROP DATABASE IF EXISTS {database.rsplit('/', 1)[1]} WITH (FORCE)")
        shutil.rmtree(work, ignore_errors=True)


def cpu_groups(
    setup: Setup, pg: PostgresServer, load_pid: int, load: str = "load"
) -> dict[str, list[int]]:
    groups = {f"platform {i + 1}": [p.proc.pid] for i, p in enumerate(setup.replicas)}
    if setup.database is not None:
        groups["postgres"] = [_postmaster_pid(pg)]
    assert setup.broker.proc is not None
    groups["mosquitto"] = [setup.broker.proc.pid]
    groups[load] = [load_pid]
    return groups


# ---- (a) intake ---------------------------------------------------------------------------


class Backlog:
    """Closed-loop load: publishers wait while more than `limit` records are published but not
    yet stored (counted in the database every `POLL_S`). Without it a burst overfills the
    platform's inbound queue (`cloud_sync.mqtt.MESSAGE_QUEUE_MAX`, 1024), which drops messages
    unacknowledged until the next reconnect: the bench would measure the stall, not the rate."""

    POLL_S = 0.05

    def __init__(self, setup: Setup, limit: int) -> None:
        self.setup, self.limit = setup, limit
        self.published = 0
        self.stored = 0
        self._moved = asyncio.Event()

    async def watch(self, total: int, deadline: float) -> None:
        while self.stored < total and time.monotonic() < deadline:
            self.stored = await asyncio.to_thread(self.setup.count_metrics)
            self._moved.set()
            await asyncio.sleep(self.POLL_S)

    async def room(self) -> None:
        while self.published - self.stored >= self.limit:
            self._moved.clear()
            await self._moved.wait()


async def _publish(creds: DeviceCredentials, count: int, window: int, backlog: Backlog) -> None:
    """`count` metric records from one device session, `window` awaiting their PUBACK at once."""
    async with MqttSession.for_device(creds) as session:
        await session.wait_ready(60)
        topic = topics.device_topic(creds.device_id, "metrics")
        sem = asyncio.Semaphore(window)

        async def one(n: int) -> None:
            async with sem:
                await backlog.room()
                backlog.published += 1
                key = f"m-{creds.device_id}-{n}"
                props = [(USER_PROPERTY_KEY, key), (USER_PROPERTY_KIND, "metrics")]
                await session.publish(
                    topic, metrics_record(creds.device_id, n), user_properties=props
                )

        await asyncio.gather(*(one(n) for n in range(count)))


def intake_row(
    setup: Setup, pg: PostgresServer, devices: int, records: int, timeout_s: float
) -> dict[str, Any]:
    creds = [enrol(setup.replicas[0], f"in-{i}") for i in range(devices)]
    per = records // devices
    total = per * devices
    # The load is this process alone: the replicas and Mosquitto are its children.
    meter = CpuMeter(cpu_groups(setup, pg, psutil.Process().pid), alone=("load",))

    async def load() -> tuple[float, float, int]:
        backlog = Backlog(setup, BACKLOG)
        meter.start()
        t0 = time.perf_counter()
        watcher = asyncio.create_task(backlog.watch(total, time.monotonic() + timeout_s))
        await asyncio.gather(*(_publish(c, per, 16, backlog) for c in creds))
        await watcher
        return t0, time.perf_counter(), backlog.stored

    t0, t1, stored = asyncio.run(load())
    cpu = meter.stop()
    wall = t1 - t0
    views = [api(p.url, p.token, "GET", "/v1/replica") for p in setup.replicas]
    return {
        "config": setup.name,
        "replicas": len(setup.replicas),
        "records": total,
        "stored": stored,
        "complete": stored >= total,
        "wall_s": round(wall, 2),
        "records_per_s": round(stored / wall, 1),
        "taken_in_per_replica": [v["mqtt"]["stored"] for v in views],
        "duplicates": sum(v["mqtt"]["duplicates"] for v in views),
        "cpu_s": cpu,
    }


# ---- (b) rollout --------------------------------------------------------------------------


def rollout_row(
    setup: Setup, pg: PostgresServer, devices: int, timeout_s: float, max_downloads: int = 100
) -> dict[str, Any]:
    first, last = setup.replicas[0], setup.replicas[-1]
    url, token = last.url, first.token
    src = setup.work / "src"
    src.mkdir()
    cli("keys", "create", "--out", src / "k.key")
    cli("fn", "new", FN, "--runtime", "node", "--dir", src / FN)
    cli("fn", "build", src / FN, "--key", src / "k.key", "--out", src / "b.efb")
    cli("fn", "publish", src / "b.efb", "--platform", first.url, "--token", token)
    log = (setup.work / "sim.log").open("wb")
    sim = subprocess.Popen(
        [
            *(sys.executable, "-m", "cloud_sync.platform.cli", "simulate"),
            *("--devices", str(devices), "--platform", url, "--token", token),
            *("--prefix", "s", "--labels", "group=bench"),
            *("--duration", str(3 * timeout_s + 60), "--metrics-interval", "300"),
            *("--connect-rate", str(CONNECT_RATE)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )  # fmt: skip
    try:
        t_enrol = time.time()
        online = 0
        deadline = time.monotonic() + 2 * timeout_s
        while time.monotonic() < deadline:
            view = api(url, token, "GET", "/v1/devices")["devices"]
            online = sum(1 for d in view if d["online"] and d.get("profile"))
            if online >= devices:
                break
            if sim.poll() is not None:
                break
            time.sleep(2.0 if devices > 1000 else 0.5)
        if online < devices:
            tail = (setup.work / "sim.log").read_text(errors="replace")[-1500:]
            return {"config": setup.name, "replicas": len(setup.replicas), "devices": devices,
                    "state": f"only {online} online", "tail": tail}  # fmt: skip
        online_s = time.time() - t_enrol
        meter = CpuMeter(cpu_groups(setup, pg, sim.pid, "simulator"))
        meter.start()
        t0 = time.time()
        spec = rollout_spec(max_downloads)
        rid = api(url, token, "POST", "/v1/rollouts", spec)["id"]
        state = "pending"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            state = api(url, token, "GET", f"/v1/rollouts/{rid}")["state"]
            if state in ENDED:
                break
            time.sleep(0.25)
        wall = time.time() - t0
        cpu = meter.stop()
        msgs = setup.count_records_since(t0) + devices
        return {
            "config": setup.name,
            "replicas": len(setup.replicas),
            "devices": devices,
            "state": state if state in ENDED else f"{state} after {timeout_s:g} s",
            "online_s": round(online_s, 1),
            "wall_s": round(wall, 2),
            "mqtt_msgs": msgs,
            "cpu_s": cpu,
        }
    finally:
        sim.terminate()
        try:
            sim.wait(120)
        except subprocess.TimeoutExpired:
            sim.kill()
            sim.wait(10)
        log.close()


# ---- tables -------------------------------------------------------------------------------


def _where(cpu: dict[str, float]) -> str:
    plat = sum(v for k, v in cpu.items() if k.startswith("platform"))
    per = " + ".join(f"{v:g}" for k, v in cpu.items() if k.startswith("platform"))
    parts = [f"platform {plat:.1f} ({per})" if "+" in per else f"platform {plat:.1f}"]
    for k in ("postgres", "mosquitto", "load", "simulator"):
        if k in cpu:
            parts.append(f"{k} {cpu[k]:.1f}")
    return "; ".join(parts)


def _cores(r: dict[str, Any]) -> str:
    """CPU seconds of everything measured per wall second: how much of the machine was busy."""
    return f"{sum(r['cpu_s'].values()) / max(r['wall_s'], 0.01):.2f}"


def _label(r: dict[str, Any]) -> str:
    if r["config"] == BASELINE:
        return "SQLite, 1 process"
    return f"PostgreSQL, {r['replicas']} replica{'s' if r['replicas'] > 1 else ''}"


def intake_table(rows: list[dict[str, Any]]) -> str:
    base = next((r for r in rows if r["config"] == BASELINE), None)
    one = next((r for r in rows if r["config"] != BASELINE and r["replicas"] == 1), None)
    out = [
        "| platform | records | stored | wall s | records/s stored | vs SQLite | vs 1 replica "
        "| taken in per replica | CPU s: where the time goes | cores busy |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    for r in rows:
        vs_base = r["records_per_s"] / base["records_per_s"] if base else 0.0
        vs_one = r["records_per_s"] / one["records_per_s"] if one and r is not base else None
        out.append(
            f"| {_label(r)} | {r['records']} | {r['stored']} | {r['wall_s']} "
            f"| {r['records_per_s']} | {vs_base:.2f} | {'' if vs_one is None else f'{vs_one:.2f}'} "
            f"| {' / '.join(map(str, r['taken_in_per_replica']))} | {_where(r['cpu_s'])} "
            f"| {_cores(r)} |"
        )
    return "\n".join(out)


def rollout_table(rows: list[dict[str, Any]]) -> str:
    base = next((r for r in rows if r["config"] == BASELINE and "wall_s" in r), None)
    out = [
        "| platform | devices | state | online s | rollout wall s | vs SQLite | msgs "
        "| CPU s: where the time goes | cores busy |",
        "|---|---:|---|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        if "wall_s" not in r:
            out.append(f"| {_label(r)} | {r['devices']} | {r['state']} | | | | | | |")
            continue
        ratio = f"{r['wall_s'] / base['wall_s']:.2f}" if base else ""
        out.append(
            f"| {_label(r)} | {r['devices']} | {r['state']} | {r['online_s']} | {r['wall_s']} "
            f"| {ratio} | {r['mqtt_msgs']} | {_where(r['cpu_s'])} | {_cores(r)} |"
        )
    return "\n".join(out)


# ---- main ---------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="short run: 2000 records, a 200-device rollout")  # fmt: skip
    parser.add_argument("--replicas", default="1,2,3", help="replica counts on PostgreSQL")
    parser.add_argument("--records", type=int, default=0, help="intake records (default 10000)")
    parser.add_argument("--intake-devices", type=int, default=20, help="publishing sessions")
    parser.add_argument("--devices", type=int, default=0, help="rollout fleet (default 10000)")
    parser.add_argument("--timeout", type=float, default=0, help="seconds per phase (bound)")
    parser.add_argument("--skip", choices=("intake", "rollout"), help="leave one part out")
    parser.add_argument("--max-downloads", type=int, default=100,
                        help="the rollout's cap on devices downloading at once")  # fmt: skip
    args = parser.parse_args()
    records = args.records or (2000 if args.quick else 10_000)
    devices = args.devices or (200 if args.quick else 10_000)
    timeout_s = args.timeout or (120.0 if args.quick else 600.0)
    counts = [int(x) for x in args.replicas.split(",")]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # run the finally blocks: no orphans
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    configs = [(BASELINE, 1), *(("pg", n) for n in counts)]
    root = Path(tempfile.mkdtemp(prefix="edgefn-pg-bench-"))  # 1777 parent: the PG user can enter
    pg = _make_server(root)
    work = Path(tempfile.mkdtemp(prefix="edgefn-bench-scale-"))
    intake: list[dict[str, Any]] = []
    rollout: list[dict[str, Any]] = []
    try:
        if args.skip != "intake":
            for name, n in configs:
                with configuration(name, work, pg, n) as setup:
                    intake.append(intake_row(setup, pg, args.intake_devices, records, timeout_s))
                print(json.dumps(intake[-1]), flush=True)
            print("\nIntake\n" + intake_table(intake) + "\n", flush=True)
        if args.skip != "rollout":
            for name, n in configs:
                with configuration(name, work, pg, n) as setup:
                    rollout.append(rollout_row(setup, pg, devices, timeout_s, args.max_downloads))
                print(json.dumps(rollout[-1]), flush=True)
            print("\nRollout\n" + rollout_table(rollout) + "\n", flush=True)
    finally:
        pg.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    if intake:
        print("Intake\n" + intake_table(intake) + "\n")
    if rollout:
        print("Rollout\n" + rollout_table(rollout))


if __name__ == "__main__":
    main()
