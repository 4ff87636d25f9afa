"""Result-cache benchmark: cache hits through the agent against a trivial aiohttp handler.

    .venv/bin/python bench/cache.py [--duration 6]

Prints: cache-hit p50/p99 at concurrency 1 and throughput at 32 (wrk, same client as the
baseline), the cost of a miss's cache write (caller side and writer thread, from the cache's
own counters), and the hit ratio of a Zipf-distributed request mix. Not a test: nothing is
asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.invoke import TRIVIAL_SERVER, WRK_SCRIPT, free_port, http_pair  # noqa: E402
from edge_agent.cache import ResultCache  # noqa: E402
from edge_agent.cache_policy import parse_cache_policy  # noqa: E402
from tests.harness import http, start_agent, write_manifest  # noqa: E402

ECHO_JS = "exports.handler = async (event) => event;\n"


def zipf_ranks(n_keys: int, s: float, count: int, seed: int = 7) -> list[int]:
    weights = [1 / (rank**s) for rank in range(1, n_keys + 1)]
    return random.Random(seed).choices(range(n_keys), weights=weights, k=count)


async def write_cost(tmp: Path, rows: int) -> tuple[float, float]:
    """Caller-side put() cost and the writer's per-row cost, microseconds."""
    cache = await ResultCache.open(tmp / "w.db", 256 << 20)
    policy = parse_cache_policy({"enabled": True, "ttl_s": 600})
    value = b"x" * 100
    keys = [policy.key_for("fn", "1", str(i).encode()) for i in range(rows)]
    t0 = time.perf_counter()
    for key in keys:
        cache.put(key, value, "application/octet-stream", 600, 0)
    caller = (time.perf_counter() - t0) / rows * 1e6
    await cache.flush()
    busy = cache.stats()["writer_busy_s"]
    await cache.close()
    return caller, busy / rows * 1e6


def zipf_hit_ratio(url: str, n_keys: int, requests: int) -> float:
    hits = 0
    for rank in zipf_ranks(n_keys, 1.1, requests):
        resp = http("POST", f"{url}/v1/functions/cached/invoke", f"tile-{rank}".encode())
        hits += resp.headers.get("X-Edgefn-Cache") == "hit"
    return hits / requests


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=6.0)
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        print("bench needs wrk (apt-get install wrk)", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="edgefn-cache-bench-"))
    script = tmp / "post.lua"
    script.write_text(WRK_SCRIPT)
    data = tmp / "data"
    fn = data / "functions" / "cached"
    fn.mkdir(parents=True)
    (fn / "index.js").write_text(ECHO_JS)
    write_manifest(
        fn,
        name="cached",
        version="1.0.0",
        runtime="node",
        entry="index.js",
        cache={"enabled": True, "ttl_s": 3600},
    )

    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", TRIVIAL_SERVER, str(port)])
    try:
        for _ in range(100):
            try:
                http("POST", f"http://127.0.0.1:{port}/echo", b"x", timeout=1)
                break
            except OSError:
                time.sleep(0.05)
        base = http_pair(f"http://127.0.0.1:{port}/echo", args.duration, script, server.pid)
    finally:
        server.terminate()
        server.wait()

    agent = start_agent(data, "--log-level", "warning")
    try:
        url = f"{agent.url}/v1/functions/cached/invoke"
        http("POST", url, b"x" * 100)  # the one miss; everything wrk sends after is a hit
        for _ in range(100):
            if agent.get("/v1/health").json()["cache"]["writes"] >= 1:
                break
            time.sleep(0.05)
        hit = http_pair(url, args.duration, script, agent.proc.pid)
        ratio = zipf_hit_ratio(agent.url, 1000, 5000)
    finally:
        agent.stop()
    caller_us, writer_us = asyncio.run(write_cost(tmp, 20000))
    shutil.rmtree(tmp, ignore_errors=True)

    print(f"\n## Result cache, 100-byte payload, {args.duration:g} s per figure\n")
    print("| path | p50 us (c=1) | p99 us (c=1) | req/s (c=32) | server CPU us/req (c=32) |")
    print("|---|---:|---:|---:|---:|")
    for label, row in (("trivial aiohttp echo", base), ("agent, cache hit", hit)):
        print(f"| {label} | {row[0]:.0f} | {row[1]:.0f} | {row[2]:.0f} | {row[3]:.0f} |")
    print(
        f"\nhit p50 / trivial p50 = {hit[0] / base[0]:.2f} (target <= 1.15); "
        f"hit req/s / trivial = {hit[2] / base[2]:.2f} (target >= 0.85); "
        f"hit CPU/request / trivial = {hit[3] / base[3]:.2f}"
    )
    print(f"cache write per miss: {caller_us:.1f} us on the request path, {writer_us:.1f} us ")
    print("in the writer thread (batched, WAL, synchronous=NORMAL)")
    print(f"hit ratio, Zipf s=1.1 over 1000 keys, 5000 requests: {ratio:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
