"""Soak: mixed invocations on Node, Go and C++ at a fixed rate while a chaos loop breaks things.

    .venv/bin/python -m bench.soak [--duration-min 30] [--rate 30] [--chaos-every 15]

Everything runs on loopback in a temporary directory: Mosquitto (TLS, client certificates,
persistent), the platform (`edge-cloud serve --broker`), one agent with the three conformance
functions. The chaos loop cycles through: SIGKILL a worker, restart the broker, stop the
platform for a while then start it again, install a new version of a function (the development
layout's manifest version is bumped; the agent's scan switches to it). At the end it waits for
the outbox to drain and reports invocations, errors by code, p99, the agent's RSS at start and
end, records lost (the platform's invocation count against the agent's own counter) and the
processes left behind. Not a test: nothing is asserted. Bounded: every wait has a deadline.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from runtimes.build import build_function  # noqa: E402
from tests.harness import FUNCTIONS, AgentProcess, http, start_agent  # noqa: E402
from tests.mosquitto import Broker  # noqa: E402
from tests.test_sync_e2e import Platform, enrol, start_platform  # noqa: E402

RUNTIMES = ("node", "go", "cpp")
DEVICE = "soak-01"
DRAIN_BOUND_S = 120.0  # how long the end waits for the outbox and the platform to catch up
PLATFORM_DOWN_S = 8.0  # long enough for the agent to fall back to HTTP and find that down too


def fn_name(runtime: str) -> str:
    return f"conformance-{runtime}"


class Load:
    """Invocations at a fixed rate from one thread (a bounded client: one request at a time)."""

    def __init__(self, agent: AgentProcess, rate: float) -> None:
        self.agent = agent
        self.period = 1.0 / rate
        self.latencies: list[float] = []
        self.codes: collections.Counter[str] = collections.Counter()
        self.sent = 0
        self.answered = 0  # got an HTTP answer from the invoke route: the agent counted it
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        names = itertools.cycle([fn_name(r) for r in RUNTIMES])
        next_at = time.monotonic()
        while not self.stop.is_set():
            name = next(names)
            payload = json.dumps({"n": self.sent}).encode()
            self.sent += 1
            t0 = time.perf_counter()
            try:
                resp = http("POST", f"{self.agent.url}/v1/functions/{name}/invoke", payload)
            except OSError as exc:
                self.codes[f"client:{type(exc).__name__}"] += 1
            else:
                self.latencies.append(time.perf_counter() - t0)
                self.answered += 1
                if resp.status != 200:
                    try:
                        code = str(resp.json()["error"]["code"])
                    except (ValueError, KeyError, TypeError):
                        code = f"http_{resp.status}"
                    self.codes[code] += 1
            next_at += self.period
            delay = next_at - time.monotonic()
            if delay > 0:
                self.stop.wait(delay)
            else:
                next_at = time.monotonic()  # fell behind: do not burst to catch up


def agent_counts(agent: AgentProcess) -> dict[str, int]:
    out = {}
    for line in http("GET", f"{agent.url}/metrics").body.decode().splitlines():
        if line.startswith("edgefn_invocations_total{"):
            name = line.split('function="', 1)[1].split('"', 1)[0]
            out[name] = int(float(line.rsplit(" ", 1)[1]))
    return out


def platform_counts(plat_dir: Path, plat: Platform) -> dict[str, int]:
    doc = json.loads(plat.cli("metrics", DEVICE, "--json").stdout)
    return {n: int(f.get("invocations", 0)) for n, f in doc.get("functions", {}).items()}


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 1e6


def workers_of(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def bump_version(directory: Path, n: int) -> str:
    manifest = directory / "edgefn.toml"
    text = manifest.read_text()
    version = f"1.0.{n}"
    lines = [
        f'version = "{version}"' if ln.startswith("version =") else ln for ln in text.splitlines()
    ]
    manifest.write_text("\n".join(lines) + "\n")
    return version


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration-min", type=float, default=30.0)
    ap.add_argument("--rate", type=float, default=30.0, help="invocations per second")
    ap.add_argument("--chaos-every", type=float, default=15.0, help="seconds between faults")
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="edgefn-soak-"))
    broker = Broker(root / "mq", persistence=True, autosave_on_changes=True)
    plat: Platform | None = None
    agent: AgentProcess | None = None
    faults: collections.Counter[str] = collections.Counter()
    try:
        broker.start()
        plat_dir = broker.workdir / "platform"
        plat = start_platform(plat_dir, "--broker", broker.url)
        creds = enrol(plat, DEVICE, root)
        data = root / "agent"
        for runtime in RUNTIMES:
            dest = data / "functions" / fn_name(runtime)
            shutil.copytree(FUNCTIONS / "conformance" / runtime, dest)
            build_function(dest)
        agent = start_agent(data, "--credentials", str(creds), "--metrics-interval", "2")
        load = Load(agent, args.rate)
        load.thread.start()
        time.sleep(5)  # warm: every pool has started, the link is up
        rss_start = rss_mb(agent.proc.pid)
        deadline = time.monotonic() + args.duration_min * 60
        rng = random.Random(11)
        steps = itertools.cycle(["kill_worker", "restart_broker", "stop_platform", "new_version"])
        versions = itertools.count(1)
        while time.monotonic() < deadline:
            time.sleep(min(args.chaos_every, max(0.0, deadline - time.monotonic())))
            if time.monotonic() >= deadline:
                break
            step = next(steps)
            if step == "kill_worker":
                kids = workers_of(agent.proc.pid)
                if kids:
                    rng.choice(kids).send_signal(signal.SIGKILL)
            elif step == "restart_broker":
                broker.restart(crash=rng.random() < 0.5)
            elif step == "stop_platform":
                plat.stop()
                time.sleep(PLATFORM_DOWN_S)
                plat = start_platform(plat_dir, "--broker", broker.url)
            else:
                runtime = rng.choice(RUNTIMES)
                bump_version(data / "functions" / fn_name(runtime), next(versions))
            faults[step] += 1
        load.stop.set()
        load.thread.join(30)
        rss_end = rss_mb(agent.proc.pid)
        local = agent_counts(agent)
        remote: dict[str, int] = {}
        bound = time.monotonic() + DRAIN_BOUND_S
        while time.monotonic() < bound:
            remote = platform_counts(plat_dir, plat)
            if all(remote.get(n, 0) >= c for n, c in local.items()):
                break
            time.sleep(2)
        agent_pid = agent.proc.pid
        pids = {p.pid for p in workers_of(agent_pid)}
        agent.stop()
        agent = None
        time.sleep(1)
        leftovers = [p for p in pids if psutil.pid_exists(p)]
        lat = sorted(load.latencies)
        report: dict[str, Any] = {
            "duration_min": args.duration_min,
            "rate_per_s": args.rate,
            "faults": dict(faults),
            "invocations_sent": load.sent,
            "invocations_answered": load.answered,
            "errors_by_code": dict(load.codes),
            "p50_ms": round(lat[len(lat) // 2] * 1000, 2) if lat else None,
            "p99_ms": round(lat[int(len(lat) * 0.99)] * 1000, 2) if lat else None,
            "agent_rss_mb_start": round(rss_start, 1),
            "agent_rss_mb_end": round(rss_end, 1),
            "agent_counts": local,
            "platform_counts": remote,
            "records_lost": sum(max(0, c - remote.get(n, 0)) for n, c in local.items()),
            "leftover_processes": len(leftovers),
        }
        print(json.dumps(report, indent=2))
        return 0
    finally:
        if agent is not None:
            agent.stop()
        if plat is not None:
            plat.stop()
        broker.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    os.environ.pop("EDGEFN_DATA_DIR", None)
    sys.exit(main())
