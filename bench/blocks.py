"""Building-block benchmark: what a nested invoke, state.get/set and publish cost, per runtime.

    .venv/bin/python bench/blocks.py [--count 2000] [--runtimes node,go,cpp,cpp-inproc]

For each runtime, an agent (in this process, uvloop, no HTTP) runs two copies of that runtime's
conformance function: a callee that echoes, and a caller whose `blocks` op makes the calls it is
asked to through the SDK. Each figure is the median over `count` sequential invocations through
the agent's router:

  direct        the callee invoked from outside (router -> worker -> callee): the baseline
  empty         the caller with `blocks([])`: its own cost of parsing and answering the op
  nested added  blocks([invoke callee]) - empty - direct: what the CALL hop adds to the
                callee's own time (goal < 50 us)
  state.get     blocks([state.get]) - empty (goal < 20 us inside the worker round trip)
  state.set     blocks([state.set]) - empty
  publish       blocks([publish]) - empty; the event is appended to a real SQLite outbox (WAL)

Not a test: nothing is asserted. Numbers vary with load; compare the columns of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import uvloop  # noqa: E402

from cloud_sync.outbox import Outbox  # noqa: E402
from edge_agent.agent import Agent  # noqa: E402
from edge_agent.settings import Settings  # noqa: E402
from runtimes.build import build_function  # noqa: E402
from runtimes.sandbox import Sandbox  # noqa: E402

CONFORMANCE = REPO / "tests" / "functions" / "conformance"
ENTRIES = {"node": "handler.js", "go": "conformance-go", "cpp": "conformance"}


def _manifest(name: str, runtime: str, isolation: str, permissions: str) -> str:
    extra = f'isolation = "{isolation}"\n' if runtime == "cpp" else ""
    return (
        f'name = "{name}"\nversion = "1.0.0"\nruntime = "{runtime}"\n'
        f'entry = "{ENTRIES[runtime]}"\n{extra}timeout_ms = 5000\n\n'
        "[pool]\nmin_instances = 1\nconcurrency = 4\n\n"
        + (f"[permissions]\n{permissions}\n" if permissions else "")
    )


def install(data: Path, label: str) -> tuple[str, str]:
    """Build callee and caller of one runtime into the agent's functions dir."""
    runtime, _, mode = label.partition("-")
    isolation = "in-process" if mode == "inproc" else "process"
    callee, caller = f"echo-{label}", f"caller-{label}"
    perms = f'invoke = ["{callee}"]\npublish = ["bench/#"]\nstate = {{ max_bytes = 1048576 }}'
    for name, p in ((callee, ""), (caller, perms)):
        d = data / "functions" / name
        shutil.copytree(CONFORMANCE / runtime, d)
        (d / "edgefn.toml").write_text(_manifest(name, runtime, isolation, p))
        build_function(d)
    return callee, caller


def blocks(*calls: dict[str, str]) -> bytes:
    return json.dumps({"op": "blocks", "calls": list(calls)}).encode()


async def median_us(agent: Agent, name: str, payload: bytes, count: int) -> float:
    router = agent.router
    ct = "application/json" if payload.startswith(b"{") else ""
    for _ in range(min(200, count)):  # warm up: pools, caches, branch predictors
        await router.invoke(name, payload, request_id="warm", content_type=ct)
    times = []
    for i in range(count):
        t0 = time.perf_counter()
        routed = await router.invoke(name, payload, request_id=f"b{i}", content_type=ct)
        times.append(time.perf_counter() - t0)
        if payload.startswith(b'{"op": "blocks"'):
            result = json.loads(routed.result.payload)["results"]
            if any("code" in r for r in result):
                raise SystemExit(f"{name}: a call failed: {result}")
    return statistics.median(times) * 1e6


async def measure(labels: list[str], count: int) -> list[tuple[str, dict[str, float]]]:
    rows = []
    for label in labels:
        tmp = Path(tempfile.mkdtemp(prefix="edgefn-bench-blocks-"))
        try:
            data = tmp / "d"
            callee, caller = await asyncio.to_thread(install, data, label)
            agent = Agent(Settings(data_dir=data, port=0))
            await agent.open(sandbox=Sandbox())
            outbox = await Outbox.open(tmp / "outbox.db")
            # The agent's publish path reads `sync.outbox` and `sync.device_id` when called.
            agent.sync = SimpleNamespace(outbox=outbox, device_id="bench-1")  # type: ignore[assignment]
            try:
                await agent.functions.sync()
                missing = {callee, caller} - set(agent.functions.loaded)
                if missing:
                    raise SystemExit(f"not loaded: {missing}: {agent.functions.problems}")
                set_k = {"op": "state.set", "target": "k", "payload": "v" * 100}
                get_k = {"op": "state.get", "target": "k"}
                pub_e = {"op": "publish", "target": "bench/e", "payload": "e" * 100}
                call_e = {"op": "invoke", "target": callee, "payload": "x" * 100}
                direct = await median_us(agent, callee, b"x" * 100, count)
                empty = await median_us(agent, caller, blocks(), count)
                nested = await median_us(agent, caller, blocks(call_e), count)
                await median_us(agent, caller, blocks(set_k), 1)
                get = await median_us(agent, caller, blocks(get_k), count)
                put = await median_us(agent, caller, blocks(set_k), count)
                # Each publish is a durable SQLite append: fewer, so the outbox stays small.
                pub = await median_us(agent, caller, blocks(pub_e), min(count, 500))
            finally:
                agent.sync = None
                await agent.stop()
                await outbox.close()
            rows.append((label, {
                "direct": direct, "empty": empty, "nested_added": nested - empty - direct,
                "nested_total": nested, "state_get": get - empty, "state_set": put - empty,
                "publish": pub - empty,
            }))  # fmt: skip
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--runtimes", default="node,go,cpp,cpp-inproc")
    args = ap.parse_args()
    rows = uvloop.run(measure(args.runtimes.split(","), args.count))
    cols = ["direct", "empty", "nested_total", "nested_added", "state_get", "state_set", "publish"]
    print(f"median microseconds over {args.count} sequential invocations (publish: up to 500)")
    print(f"{'runtime':<11}" + "".join(f"{c:>14}" for c in cols) + f"{'added/direct':>14}")
    for label, f in rows:
        ratio = f["nested_added"] / f["direct"] if f["direct"] else float("nan")
        print(f"{label:<11}" + "".join(f"{f[c]:>14.1f}" for c in cols) + f"{ratio:>14.2f}")


if __name__ == "__main__":
    main()
