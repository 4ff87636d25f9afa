"""Figures for the result cache, printed (run with `-s`), never asserted: timings depend on the
machine and its load. Bounded: a few thousand operations, well under a second."""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path

from edge_agent.cache import ResultCache
from edge_agent.cache_policy import CachePolicy

POLICY = CachePolicy(enabled=True, ttl_s=600, key_headers=("accept",))
N = 2000


def _us(ns: list[int]) -> str:
    ns = sorted(ns)
    return (
        f"median {statistics.median(ns) / 1e3:.1f} us, p99 {ns[len(ns) * 99 // 100] / 1e3:.1f} us"
    )


async def test_print_cache_figures(tmp_path: Path) -> None:
    async with await ResultCache.open(tmp_path / "perf.db") as c:
        keys = [POLICY.key_for("fn", "1.0.0", b"%d" % i, {"Accept": "a/b"}) for i in range(N)]
        value = b"r" * 256

        put_ns = []
        first = time.perf_counter()
        for k in keys:
            t = time.perf_counter_ns()
            c.put(k, value, "application/json", ttl_s=600)
            put_ns.append(time.perf_counter_ns() - t)
        await c.flush()
        drained = time.perf_counter() - first
        s = c.stats()

        get_ns = []
        for _ in range(3):
            for k in keys:
                t = time.perf_counter_ns()
                entry = await c.get(k)
                get_ns.append(time.perf_counter_ns() - t)
                assert entry is not None
        hop_ns = []
        for k in keys[:500]:
            t = time.perf_counter_ns()
            found = await asyncio.to_thread(c._lookup, k.id)
            hop_ns.append(time.perf_counter_ns() - t)
            assert found is not None  # the same hit, not an error path
        key_ns = []
        for i in range(500):
            t = time.perf_counter_ns()
            POLICY.key_for("fn", "1.0.0", value, {"Accept": "a/b", "X-Other": str(i)})
            key_ns.append(time.perf_counter_ns() - t)

    print()
    print(f"cache: {N} entries of {len(value)} B, WAL + synchronous=NORMAL")
    print(f"  get() hit on the loop ........ {_us(get_ns)}")
    print(f"  same lookup via to_thread .... {_us(hop_ns)}")
    print(f"  key derivation (256 B body) .. {_us(key_ns)}")
    print(f"  put() on the caller .......... {_us(put_ns)}")
    print(
        f"  writer: {s['writes']} rows, {s['writer_busy_s'] * 1e6 / s['writes']:.1f} us/row in "
        f"transactions; queue drained {drained * 1e3:.0f} ms after the first put"
    )
