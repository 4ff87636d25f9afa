"""Invocation benchmark: the agent against baselines measured in the same run.

    .venv/bin/python bench/invoke.py [--duration 5] [--runtimes node,go,cpp,cpp-inproc]

Prints one table per question:
  * latency at concurrency 1 (p50/p99) and throughput at concurrency 32, for
    (A) the raw round trip through the same worker over its pipe, driven from Python, no HTTP;
    (B) a trivial aiohttp echo handler (same server stack, same HTTP client);
    (C) fork-per-request: start the function's process for every call;
    and the agent's warm invocations per runtime;
  * cold start (spawn to READY) per runtime against `exec` of the Go binary and `node -e 0`;
  * idle RSS of the agent with two warm functions, and of each worker.
HTTP load comes from `wrk` (Debian package `wrk`; `make bench` installs it). Nothing here is a
test: no figure is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import psutil  # noqa: E402
import uvloop  # noqa: E402

from runtimes import protocol  # noqa: E402
from runtimes.build import build_function  # noqa: E402
from runtimes.invocation import Invocation  # noqa: E402
from runtimes.launchers import command_for  # noqa: E402
from runtimes.manifest import load_manifest  # noqa: E402
from runtimes.worker import Worker, worker_env  # noqa: E402
from tests.harness import start_agent  # noqa: E402

PAYLOAD = b"x" * 100
STATIC = protocol.static_header("b", "1")
CONFORMANCE = REPO / "tests" / "functions" / "conformance"

TRIVIAL_SERVER = """
import sys, uvloop
from aiohttp import web
async def echo(request):
    return web.Response(body=await request.read())
app = web.Application()
app.router.add_post("/echo", echo)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None,
            loop=uvloop.new_event_loop())
"""

WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = string.rep("x", 100)
wrk.headers["Content-Type"] = "application/octet-stream"
"""


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- (A) raw pipe round trip -------------------------------------------------------------


async def _raw(directory: Path, duration: float) -> tuple[float, float, float]:
    manifest = load_manifest(directory / "edgefn.toml")
    env = worker_env(os.environ, {"EDGEFN_FUNCTION": manifest.name, "EDGEFN_VERSION": "1"})
    w = await Worker.spawn(command_for(manifest, directory), env=env, cwd=str(directory), label="b")
    inv = Invocation(PAYLOAD, "b", 30.0)
    for _ in range(200):  # warm-up
        await w.invoke(inv, static=STATIC)
    lat: list[float] = []
    end = time.perf_counter() + duration / 2
    while time.perf_counter() < end and len(lat) < 200_000:
        t0 = time.perf_counter()
        await w.invoke(inv, static=STATIC)
        lat.append(time.perf_counter() - t0)
    count = 0
    end = time.perf_counter() + duration / 2

    async def client() -> None:
        nonlocal count
        while time.perf_counter() < end:
            await w.invoke(inv, static=STATIC)
            count += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(32)))
    rps = count / (time.perf_counter() - t0)
    await w.shutdown()
    return pct(lat, 0.5) * 1e6, pct(lat, 0.99) * 1e6, rps


def raw_pipe(directory: Path, duration: float) -> tuple[float, float, float]:
    return uvloop.run(_raw(directory, duration))


# ---- (C) fork per request ---------------------------------------------------------------


async def _fork(directory: Path, duration: float) -> tuple[float, float, float]:
    manifest = load_manifest(directory / "edgefn.toml")
    env = worker_env(os.environ, {"EDGEFN_FUNCTION": manifest.name, "EDGEFN_VERSION": "1"})
    argv = command_for(manifest, directory)
    inv = Invocation(PAYLOAD, "b", 30.0)

    async def once() -> None:
        w = await Worker.spawn(argv, env=env, cwd=str(directory), label="fork")
        await w.invoke(inv, static=STATIC)
        await w.shutdown()

    lat: list[float] = []
    end = time.perf_counter() + duration / 2
    while time.perf_counter() < end and len(lat) < 2000:
        t0 = time.perf_counter()
        await once()
        lat.append(time.perf_counter() - t0)
    count = 0
    end = time.perf_counter() + duration / 2

    async def client() -> None:
        nonlocal count
        while time.perf_counter() < end:
            await once()
            count += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(32)))
    return pct(lat, 0.5) * 1e6, pct(lat, 0.99) * 1e6, count / (time.perf_counter() - t0)


def fork_per_request(directory: Path, duration: float) -> tuple[float, float, float]:
    return uvloop.run(_fork(directory, duration))


# ---- HTTP through wrk --------------------------------------------------------------------


def _us(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    if not m:
        return float("nan")
    value, unit = float(m.group(1)), m.group(2)
    return value * {"us": 1, "ms": 1e3, "s": 1e6}[unit]


def wrk(
    url: str, connections: int, duration: float, script: Path
) -> tuple[float, float, float, int]:
    threads = 1 if connections == 1 else 2
    out = subprocess.run(
        [
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{max(1, int(duration))}s",
            "--latency",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    # Anchored: an unanchored "50%" also matches the "+/- Stdev" column (e.g. "81.50%").
    p50 = _us(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = _us(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    count = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise RuntimeError(f"{url}: {errors.group(1)} error responses")
    return p50, p99, rps, count


def http_pair(
    url: str, duration: float, script: Path, pid: int | None = None
) -> tuple[float, float, float, float]:
    """p50/p99 at c=1, req/s at c=32 and, given the server's pid, its CPU microseconds per
    request over the c=32 run (user + system, all threads; NaN without a pid).

    CPU per request is the figure to compare on a shared machine: latency and throughput move
    with whatever else runs, the CPU one request costs the server much less.
    """
    p50, p99, _, _ = wrk(url, 1, duration / 2, script)
    proc = psutil.Process(pid) if pid is not None else None
    before = sum(proc.cpu_times()[:2]) if proc is not None else 0.0
    _, _, rps, count = wrk(url, 32, duration / 2, script)
    cpu = (sum(proc.cpu_times()[:2]) - before) / count * 1e6 if proc is not None else math.nan
    return p50, p99, rps, cpu


# ---- cold start and memory ---------------------------------------------------------------


async def _cold(directory: Path, runs: int) -> float:
    manifest = load_manifest(directory / "edgefn.toml")
    env = worker_env(os.environ, {"EDGEFN_FUNCTION": manifest.name, "EDGEFN_VERSION": "1"})
    argv = command_for(manifest, directory)
    times = []
    for _ in range(runs):
        w = await Worker.spawn(argv, env=env, cwd=str(directory), label="cold")
        times.append(w.cold_start_s)
        await w.shutdown()
    return statistics.median(times) * 1e3


def exec_time(argv: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, check=False)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=6.0, help="seconds per measurement")
    ap.add_argument("--runtimes", default="node,go,cpp,cpp-inproc")
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        print("bench needs wrk (apt-get install wrk)", file=sys.stderr)
        return 2
    runtimes = args.runtimes.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="edgefn-bench-"))
    script = tmp / "post.lua"
    script.write_text(WRK_SCRIPT)
    dirs: dict[str, Path] = {}
    for rt in ("node", "go", "cpp"):
        d = tmp / "functions" / f"conformance-{rt}"
        shutil.copytree(CONFORMANCE / rt, d)
        print(f"building {rt} ...", file=sys.stderr, flush=True)
        build_function(d)
        dirs[rt] = d
    if "cpp-inproc" in runtimes:
        d = tmp / "functions" / "conformance-cpp-inproc"
        shutil.copytree(dirs["cpp"], d)
        text = (d / "edgefn.toml").read_text()
        text = text.replace('name = "conformance-cpp"', 'name = "conformance-cpp-inproc"')
        text = text.replace('isolation = "process"', 'isolation = "in-process"\ninline = true')
        (d / "edgefn.toml").write_text(text)
        dirs["cpp-inproc"] = d
    data = tmp / "data"
    (data / "functions").mkdir(parents=True)
    for rt in runtimes:
        shutil.copytree(dirs[rt], data / "functions" / dirs[rt].name)

    rows: list[tuple[str, float, float, float, float]] = []
    print("measuring (B) trivial aiohttp handler ...", file=sys.stderr, flush=True)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", TRIVIAL_SERVER, str(port)])
    try:
        for _ in range(100):
            try:
                import urllib.request

                urllib.request.urlopen(
                    urllib.request.Request(f"http://127.0.0.1:{port}/echo", data=b"x"), timeout=1
                ).read()
                break
            except OSError:
                time.sleep(0.05)
        b = http_pair(f"http://127.0.0.1:{port}/echo", args.duration, script, server.pid)
    finally:
        server.terminate()
        server.wait()
    rows.append(("(B) trivial aiohttp echo", *b))

    raw: dict[str, tuple[float, float, float]] = {}
    fork: dict[str, tuple[float, float, float]] = {}
    for rt in ("node", "go", "cpp"):
        if rt not in runtimes:
            continue
        print(f"measuring (A) raw pipe and (C) fork-per-request: {rt} ...", file=sys.stderr)
        raw[rt] = raw_pipe(dirs[rt], args.duration)
        rows.append((f"(A) raw pipe, {rt} worker", *raw[rt], math.nan))
        fork[rt] = fork_per_request(dirs[rt], args.duration)
        rows.append((f"(C) fork per request, {rt}", *fork[rt], math.nan))

    # The previous path (the invoke route on aiohttp, `[limits] fast_invoke = false`) in the
    # same run, so the fast path's gain is visible in one table.
    previous_cfg = tmp / "aiohttp-path.toml"
    previous_cfg.write_text("[limits]\nfast_invoke = false\n")
    agent_rows: dict[str, tuple[float, float, float, float]] = {}
    for label, extra in (("agent, aiohttp path", ["--config", str(previous_cfg)]), ("agent", [])):
        print(f"starting the agent ({label}) ...", file=sys.stderr, flush=True)
        agent = start_agent(data, "--log-level", "warning", *extra)
        try:
            for rt in runtimes:
                name = dirs[rt].name
                print(f"measuring {label}: {rt} ...", file=sys.stderr, flush=True)
                fig = http_pair(
                    f"{agent.url}/v1/functions/{name}/invoke", args.duration, script, agent.proc.pid
                )
                rows.append((f"{label}, {rt}", *fig))
                if label == "agent":
                    agent_rows[rt] = fig
            if label == "agent":
                time.sleep(1.5)
                agent_rss = rss_mb(agent.proc.pid)
                workers = []
                for child in psutil.Process(agent.proc.pid).children(recursive=True):
                    cmd = " ".join(child.cmdline()[-2:])[-60:]
                    workers.append((cmd, child.memory_info().rss / 2**20))
        finally:
            agent.stop()

    print(f"\n## Invocation, 100-byte payload, {args.duration:g} s per figure\n")
    print("| path | p50 us (c=1) | p99 us (c=1) | req/s (c=32) | server CPU us/req (c=32) |")
    print("|---|---:|---:|---:|---:|")
    for name, p50, p99, rps, cpu in rows:
        print(f"| {name} | {p50:.0f} | {p99:.0f} | {rps:.0f} | {cpu:.0f} |")

    print("\n## Ratios against the targets\n")
    print("| runtime | p50 / (A+B) p50 (<= 1.3) | req/s / B (>= 0.7) | req/s / C (>= 30) |")
    print("|---|---:|---:|---:|")
    for rt, (p50, _, rps, _cpu) in agent_rows.items():
        base = raw.get(rt if rt != "cpp-inproc" else "cpp")
        a_p50 = base[0] if base else float("nan")
        c = fork.get(rt if rt != "cpp-inproc" else "cpp")
        c_rps = c[2] if c else float("nan")
        ratio_ab = p50 / (a_p50 + b[0]) if rt != "cpp-inproc" else p50 / b[0]
        label = rt if rt != "cpp-inproc" else "cpp-inproc (vs B alone, target 1.1)"
        print(f"| {label} | {ratio_ab:.2f} | {rps / b[2]:.2f} | {rps / c_rps:.0f} |")

    print("\n## Cold start (spawn to READY), median of 20\n")
    go_bin = dirs["go"] / "conformance-go"
    node = shutil.which("node") or "node"
    exec_go = exec_time([str(go_bin)], 20)
    node_e0 = exec_time([os.path.realpath(node), "-e", "0"], 20)
    print("| what | ms |")
    print("|---|---:|")
    print(f"| exec of the Go binary (exits on EOF) | {exec_go:.2f} |")
    print(f"| node -e 0 | {node_e0:.2f} |")
    for rt in ("go", "node", "cpp"):
        cold = uvloop.run(_cold(dirs[rt], 20))
        extra = ""
        if rt == "go":
            extra = f" (+{cold - exec_go:.2f} ms over exec, target <= 3)"
        elif rt == "node":
            extra = f" ({cold / node_e0:.2f} x node -e 0, target <= 1.3)"
        print(f"| {rt} worker spawn to READY{extra} | {cold:.2f} |")

    print(f"\n## Memory, idle, {len(runtimes)} warm functions\n")
    print("| process | RSS MB |")
    print("|---|---:|")
    print(f"| agent (workers excluded, target <= 45) | {agent_rss:.1f} |")
    for cmd, mb in workers:
        print(f"| worker {cmd} | {mb:.1f} |")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
