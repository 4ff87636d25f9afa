"""Fleet rollout: wall time of a 4-wave rollout to `succeeded`, per wave; platform cost; MQTT.

Run: `.venv/bin/python -m bench.rollout [--devices 100,1000,10000] [--timeout 600]`.

Everything on loopback: a Mosquitto (TLS, client certificates, the edgefn ACL; the tests' broker
helper), the real platform (`edge-cloud serve`, its rollout controller inside) as a child
process, and the simulated fleet (`edge-cloud simulate`, one process by default: every device
has its own MQTT session, all on one asyncio loop). A Node function 0.1.0 is built, signed and
published; the rollout is `waves 1,10,50,100`, bake 0, no gate but install success, no rate
limit to speak of, at most `--max-downloads` devices (100) installing at once (kept from the
runs when the platform's MQTT intake still dropped messages under a larger burst, so that the
figures compare; docs/BENCHMARKS.md).
Measured from the moment the rollout is created until it is `succeeded`:

* wall time, and the time of each wave (from the controller's `wave` index in `GET /v1/rollouts`,
  polled every 0.25 s: the list carries no device list, so polling costs the platform little);
* platform CPU seconds (user + system) and peak RSS (psutil, sampled every 0.1 s);
* MQTT messages: records the devices sent the platform in that window (status reports, reported
  documents, metrics every `--metrics-interval` s) plus the one desired document each was sent;
  per device and per second.

Each size runs in a fresh broker + platform + fleet and is bounded by `--timeout` (enrolment,
coming online and the rollout each); the first size is the baseline of the ratio columns (cost
per device relative to it: 1.0 = linear). The open-file limit is raised to the hard limit first:
Mosquitto, a child, inherits it and needs one descriptor per device.

Not a test: nothing is asserted. The figures go into docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil

from tests.mosquitto import Broker

FN = "benchfn"
CONNECT_RATE = 100  # devices connecting per second, as in the runs recorded before
ENDED = {"succeeded", "rolled_back", "rollback_failed", "aborted", "failed"}


def cli(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "EDGEFN_TOKEN"}
    proc = subprocess.run(
        [sys.executable, "-m", "cloud_sync.platform.cli", *map(str, args)],
        capture_output=True, text=True, env=env, check=False, timeout=600,
    )  # fmt: skip
    if check and proc.returncode != 0:
        raise SystemExit(f"edge-cloud {args} failed:\n{proc.stderr}")
    return proc


def api(url: str, token: str, method: str, path: str, body: Any = None) -> Any:
    req = urllib.request.Request(
        url + path, method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


class Sampler:
    """Peak RSS of a process, sampled in a thread."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def _cpu(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def _stop(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def rollout_spec(max_downloads: int) -> dict[str, Any]:
    """The benches' rollout: 4 waves, bake 0, no rate limit to speak of, a download cap."""
    return {
        "function": FN, "version": "0.1.0", "target": "group=bench",
        "waves": [1, 10, 50, 100], "bake_s": 0, "interval_s": 0.1, "min_invocations": 0,
        "rate_per_minute": 1_000_000, "device_timeout_s": 600,
        "max_concurrent_downloads": max_downloads,
    }  # fmt: skip


def one(
    work: Path,
    devices: int,
    per_process: int,
    timeout_s: float,
    metrics_s: float,
    max_downloads: int,
) -> dict[str, Any]:
    broker = Broker(work)  # edgefn's config: its queue holds a 10,000-device burst
    broker.start()
    data = work / "platform"
    plat = subprocess.Popen(
        [sys.executable, "-m", "cloud_sync.platform.cli", "serve", "--data-dir", str(data),
         "--port", "0", "--broker", broker.url],
        stdout=subprocess.DEVNULL, stderr=(work / "platform.log").open("wb"),
    )  # fmt: skip
    sims: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(300):  # bounded: 30 s for the platform to listen
            if (data / "platform.json").exists():
                break
            time.sleep(0.1)
        url = json.loads((data / "platform.json").read_text())["url"]
        token = (data / "admin.token").read_text().strip()
        src = work / "src"
        src.mkdir()
        cli("keys", "create", "--out", src / "k.key")
        cli("fn", "new", FN, "--runtime", "node", "--dir", src / FN)
        cli("fn", "build", src / FN, "--key", src / "k.key", "--out", src / "b.efb")
        cli("fn", "publish", src / "b.efb", "--platform", url, "--token", token)
        t_enrol = time.time()
        for i, start in enumerate(range(0, devices, per_process)):
            n = min(per_process, devices - start)
            sims.append(
                subprocess.Popen(
                    [
                        *(sys.executable, "-m", "cloud_sync.platform.cli", "simulate"),
                        *("--devices", str(n), "--platform", url, "--token", token),
                        *("--prefix", f"b{i}", "--labels", "group=bench"),
                        *("--duration", str(3 * timeout_s + 60)),
                        *("--metrics-interval", str(metrics_s)),
                        *("--connect-rate", str(CONNECT_RATE)),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=(work / f"sim-{i}.log").open("wb"),
                )
            )
        online = 0
        deadline = time.monotonic() + 2 * timeout_s  # enrolment and coming online
        while time.monotonic() < deadline:
            view = api(url, token, "GET", "/v1/devices")["devices"]
            online = sum(1 for d in view if d["online"] and d.get("profile"))
            if online >= devices:
                break
            time.sleep(3.0)  # the whole fleet's view: not cheap at 10,000
        else:
            tails = [(work / f"sim-{i}.log").read_text()[-2000:] for i in range(len(sims))]
            return {"devices": devices, "state": f"only {online} online", "tails": tails}
        online_s = time.time() - t_enrol
        pid = plat.pid
        sampler = Sampler(pid)
        cpu0 = _cpu(pid)
        sim_cpu0 = sum(_cpu(s.pid) for s in sims)
        t0 = time.time()
        spec = rollout_spec(max_downloads)
        rid = api(url, token, "POST", "/v1/rollouts", spec)["id"]
        state, wave, marks = "pending", 0, [t0]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            mine = [r for r in api(url, token, "GET", "/v1/rollouts")["rollouts"] if r["id"] == rid]
            state, now = mine[0]["state"], time.time()
            while wave < int(mine[0].get("wave") or 0):
                marks.append(now)
                wave += 1
            if state in ENDED:
                break
            time.sleep(0.25)
        t1 = time.time()
        marks.append(t1)
        wall = t1 - t0
        cpu = _cpu(pid) - cpu0
        sim_cpu = sum(_cpu(s.pid) for s in sims) - sim_cpu0
        sampler.stop()
        with sqlite3.connect(data / "fleet.db") as conn:
            (records,) = conn.execute(
                "SELECT COUNT(*) FROM records WHERE received_at >= ?", (t0,)
            ).fetchone()
        msgs = records + devices
        return {
            "devices": devices,
            "state": state if state in ENDED else f"{state} after {timeout_s:g} s",
            "online_s": round(online_s, 1),
            "wall_s": round(wall, 2),
            "waves_s": [round(b - a, 2) for a, b in itertools.pairwise(marks)],
            "platform_cpu_s": round(cpu, 2),
            "platform_peak_rss_mb": round(sampler.peak / 2**20, 1),
            "simulator_cpu_s": round(sim_cpu, 2),
            "mqtt_msgs_per_device": round(msgs / devices, 2),
            "mqtt_msgs_per_s": round(msgs / wall, 1),
        }
    finally:
        for s in sims:
            s.terminate()
        for s in sims:
            _stop(s, 120)
        _stop(plat, 60)
        broker.stop()


def table(rows: list[dict[str, Any]]) -> str:
    base = next((r for r in rows if "wall_s" in r), None)
    out = [
        "| devices | state | online s | wall s | per wave s | msgs/device | msgs/s "
        "| platform CPU s | platform peak RSS MB | simulator CPU s | wall/device vs base "
        "| CPU/device vs base |",
        "|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "wall_s" not in r or base is None:
            out.append(f"| {r['devices']} | {r['state']} |" + " |" * 10)
            continue
        scale = r["devices"] / base["devices"]
        wall_ratio = r["wall_s"] / base["wall_s"] / scale
        cpu_ratio = r["platform_cpu_s"] / max(base["platform_cpu_s"], 0.01) / scale
        waves = " / ".join(f"{w:g}" for w in r["waves_s"])
        out.append(
            f"| {r['devices']} | {r['state']} | {r['online_s']} | {r['wall_s']} | {waves} "
            f"| {r['mqtt_msgs_per_device']} | {r['mqtt_msgs_per_s']} | {r['platform_cpu_s']} "
            f"| {r['platform_peak_rss_mb']} | {r['simulator_cpu_s']} | {wall_ratio:.2f} "
            f"| {cpu_ratio:.2f} |"
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", default="100,1000,10000", help="fleet sizes; first: baseline")
    parser.add_argument("--per-process", type=int, default=10_000, help="devices per simulator")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per phase and size")
    parser.add_argument("--metrics-interval", type=float, default=300.0)
    parser.add_argument(
        "--max-downloads", type=int, default=100,
        help="the rollout's cap on devices downloading at once (see docs/BENCHMARKS.md)",
    )  # fmt: skip
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # run the finally blocks: no orphans
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    print(f"open-file limit {hard} (Mosquitto inherits it)", flush=True)
    rows = []
    for n in (int(x) for x in args.devices.split(",")):
        with tempfile.TemporaryDirectory(prefix="edgefn-bench-rollout-") as d:
            rows.append(
                one(Path(d), n, args.per_process, args.timeout, args.metrics_interval,
                    args.max_downloads)
            )  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
