"""Fleet rollout: wall time of a 4-wave rollout to `succeeded`, platform cost, MQTT traffic.

Run: `.venv/bin/python -m bench.rollout [--devices 100,1000] [--per-process 250]`.

Everything on loopback: a Mosquitto (TLS, ACL; the tests' broker helper), the real platform
(`edge-cloud serve`, its rollout controller inside) as a child process, and simulated devices
(`edge-cloud simulate`, several processes of `--per-process` devices each: the simulator runs a
paho thread per device). A Node function 0.1.0 is built, signed and published; the rollout is
`waves 1,10,50,100`, bake 0, no gate but install success, no rate limit to speak of. Measured
from the moment the rollout is created until it is `succeeded`:

* wall time; platform CPU seconds (user + system) and peak RSS (sampled every 0.1 s);
* MQTT messages per device: records each device sent the platform in that window (status
  reports, reported documents, metrics), plus the one desired document it was sent.

Not a test: nothing is asserted. The figures go into docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
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
ENDED = {"succeeded", "rolled_back", "rollback_failed", "aborted"}


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


def one(work: Path, devices: int, per_process: int) -> dict[str, Any]:
    broker = Broker(work)
    broker.start()
    data = work / "platform"
    plat = subprocess.Popen(
        [sys.executable, "-m", "cloud_sync.platform.cli", "serve", "--data-dir", str(data),
         "--port", "0", "--broker", broker.url],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    sims: list[subprocess.Popen[bytes]] = []
    logs: list[Any] = []  # each simulator's stderr: why a slice of the fleet never came online
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
        for i, start in enumerate(range(0, devices, per_process)):
            n = min(per_process, devices - start)
            logs.append((work / f"sim-{i}.log").open("wb"))
            sims.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "cloud_sync.platform.cli",
                        "simulate",
                        "--devices",
                        str(n),
                        "--platform",
                        url,
                        "--token",
                        token,
                        "--prefix",
                        f"b{i}",
                        "--labels",
                        "group=bench",
                        "--duration",
                        "900",
                        "--metrics-interval",
                        "5",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=logs[-1],
                )
            )
        for _ in range(3000):  # bounded: 10 min for the fleet to enrol and come online
            view = api(url, token, "GET", "/v1/devices")["devices"]
            online = sum(1 for d in view if d["online"] and d.get("profile"))
            if online >= devices:
                break
            time.sleep(0.2)
        else:
            tails = [(work / f"sim-{i}.log").read_text()[-2000:] for i in range(len(sims))]
            raise SystemExit(f"only {online} of {devices} devices came online\n" + "\n".join(tails))
        pid = plat.pid
        sampler = Sampler(pid)
        cpu0 = psutil.Process(pid).cpu_times()
        t0 = time.time()
        spec = {
            "function": FN, "version": "0.1.0", "target": "group=bench",
            "waves": [1, 10, 50, 100], "bake_s": 0, "interval_s": 0.1, "min_invocations": 0,
            "rate_per_minute": 1_000_000, "device_timeout_s": 600,
        }  # fmt: skip
        rid = api(url, token, "POST", "/v1/rollouts", spec)["id"]
        state = "pending"
        for _ in range(18000):  # bounded: 30 min
            state = api(url, token, "GET", f"/v1/rollouts/{rid}")["state"]
            if state in ENDED:
                break
            time.sleep(0.1)
        wall = time.time() - t0
        cpu1 = psutil.Process(pid).cpu_times()
        sampler.stop()
        with sqlite3.connect(data / "fleet.db") as conn:
            (records,) = conn.execute(
                "SELECT COUNT(*) FROM records WHERE received_at >= ?", (t0,)
            ).fetchone()
        return {
            "devices": devices,
            "state": state,
            "wall_s": round(wall, 2),
            "platform_cpu_s": round((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system), 2),
            "platform_peak_rss_mb": round(sampler.peak / 2**20, 1),
            "mqtt_msgs_per_device": round(records / devices + 1, 2),
        }
    finally:
        for s in sims:
            s.terminate()
        for s in sims:
            try:
                s.wait(60)
            except subprocess.TimeoutExpired:
                s.kill()
        plat.terminate()
        try:
            plat.wait(30)
        except subprocess.TimeoutExpired:
            plat.kill()
        broker.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", default="100,1000", help="fleet sizes, comma separated")
    parser.add_argument("--per-process", type=int, default=250, help="devices per simulator")
    args = parser.parse_args()
    rows = []
    for n in (int(x) for x in args.devices.split(",")):
        with tempfile.TemporaryDirectory(prefix="edgefn-bench-rollout-") as d:
            rows.append(one(Path(d), n, args.per_process))
        print(json.dumps(rows[-1]), flush=True)
    print()
    print("| devices | state | wall s | platform CPU s | platform peak RSS MB | MQTT msgs/device |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['devices']} | {r['state']} | {r['wall_s']} | {r['platform_cpu_s']} |"
            f" {r['platform_peak_rss_mb']} | {r['mqtt_msgs_per_device']} |"
        )


if __name__ == "__main__":
    main()
