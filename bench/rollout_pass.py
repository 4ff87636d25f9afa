"""What one pass of the rollout controller costs in the rollout store, at fleet sizes.

Run: `.venv/bin/python -m bench.rollout_pass [--devices 1000,10000] [--reps 20]`.

The controller reads the active rollouts on every pass (`TICK_S`, 0.5 s) and stores a rollout
whenever a pass changed it. Both handle the whole document, one record per device, so their
cost per pass grows with the fleet, and the number of passes of a rollout grows with it too.
This measures a pass's store work on a real SQLite file: `active()` (read + decode) and
`save()` (encode + write) after a pass in which 50 devices reported, the way the store did it
before its caches (`json.loads` + `Rollout.from_dict` per read, `json.dumps(to_dict())` per
save, one save per event: reports, then tick) and the way it does now (decode only a changed
text, encode only changed records, one save per pass). Not a test; figures for
docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from cloud_sync.platform.rollout_store import RolloutStore
from cloud_sync.rollout.controller import Reports, Start, Tick, step
from cloud_sync.rollout.model import Rollout
from tests.test_rollout_controller import D, Fleet, make


def _ms(fn: object, reps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()  # type: ignore[operator]
    return (time.perf_counter() - t0) / reps * 1000


def measure(devices: int, reps: int) -> dict[str, float]:
    r, actions = step(make(devices, waves="1,10,50,100", bake_s=0), Start(0.0))
    f = Fleet()
    with tempfile.TemporaryDirectory() as d:
        store = RolloutStore(Path(d) / "rollouts.db")
        store.save(r)
        reported = [a.device for a in actions][:50]
        passes = []
        for n in range(reps):  # distinct passes: every one changes 50 records
            state = (D.DOWNLOADING, D.INSTALLING, D.WARMING, D.ACTIVE)[n % 4]
            r, _ = step(r, Reports(n + 1.0, tuple(f.report(x, state) for x in reported)))
            r, _ = step(r, Tick(n + 1.0, None, None))
            passes.append(r)
        it = iter(passes)

        def old_pass() -> None:
            rows = store._db.read(lambda c: c.execute("SELECT doc FROM rollouts").fetchall())
            [Rollout.from_dict(json.loads(doc)) for (doc,) in rows]
            x = next(it)
            for _ in range(2):  # a save after the reports, another after the tick
                store._db.write(
                    lambda c, x=x: c.execute(
                        "UPDATE rollouts SET doc=? WHERE id=?",
                        (json.dumps(x.to_dict(), separators=(",", ":")), x.id),
                    )
                )

        old = _ms(old_pass, reps)
        it = iter(passes)
        store.active()

        def new_pass() -> None:
            store.active()
            store.save(next(it))

        new = _ms(new_pass, reps)
        store.close()
    return {"devices": devices, "before_ms": round(old, 1), "after_ms": round(new, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", default="1000,10000")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    print("| devices | store work per pass, before (ms) | after (ms) |")
    print("|---:|---:|---:|")
    for n in (int(x) for x in args.devices.split(",")):
        m = measure(n, args.reps)
        print(f"| {n:,} | {m['before_ms']} | {m['after_ms']} |", flush=True)


if __name__ == "__main__":
    main()
