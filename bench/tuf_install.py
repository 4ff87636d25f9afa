"""What TUF verification costs an install: time and metadata bytes, with and without, one run.

Run: `.venv/bin/python -m bench.tuf_install [--reps 7] [--size-kb 1024] [--functions 10]`.

A TUF repository built with python-tuf's metadata API (`tests.tuf_repo_fixture`: consistent
snapshots, one delegated role per publisher, `--functions` publishers each with a published
function so the documents have a realistic size) is served with the registry's bundle URL on
127.0.0.1. One device data dir installs a new version of a ~1 MB signed Node bundle per
repetition, alternating `update_security = "signatures"` and `"tuf"` (the same install path:
download, verify, unpack, warm start, switch), so both see the same machine state. Printed:

* the median install time of each mode and the difference;
* the median time of the TUF step alone (`cloud_sync.tuf_client.refresh_target`: refresh
  timestamp -> snapshot -> targets -> the publisher's role, all-or-nothing cache write), wall
  and CPU (the CPU figure includes the registry, which runs in this process);
* metadata bytes the device downloaded per TUF install (each install follows one new
  publication, as a rollout does), and for the device's first refresh.

Not a test: nothing is asserted. The figures go into docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from edge_agent.install import InstallOptions, install_from_registry
from edge_agent.install_faults import InstallFaults
from edge_agent.trust import add_key
from edge_agent.update_security import resolve
from runtimes.signing import create_keypair
from tests.tuf_repo_fixture import TufRepo, credentials_file, serve, signed_bundle


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--size-kb", type=int, default=1024)
    ap.add_argument("--functions", type=int, default=10, help="publishers in the repository")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-tuf-") as tmp:
        run(Path(tmp), args.reps, args.size_kb * 1024, args.functions)


def run(tmp: Path, reps: int, size: int, functions: int) -> None:
    import cloud_sync.tuf_client as tuf_client

    step: list[float] = []
    step_cpu: list[float] = []
    real_refresh = tuf_client.refresh_target

    def timed_refresh(*a: Any, **kw: Any) -> Any:  # the TUF step inside each install, timed
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            return real_refresh(*a, **kw)
        finally:
            step.append(time.perf_counter() - t0)
            step_cpu.append(time.process_time() - c0)

    tuf_client.refresh_target = timed_refresh  # edge_agent.tuf_install looks it up per call
    create_keypair(tmp / "publisher.key")
    repo = TufRepo.create()
    role = repo.add_publisher("echo")
    for i in range(functions - 1):  # other publishers, each with one published version
        other = repo.add_publisher(f"fn{i}")
        data = signed_bundle(tmp / f"fn{i}.efb", tmp / "publisher.key", f"fn{i}", "1.0.0")
        repo.add_target(other, f"fn{i}", "1.0.0", data.read_bytes())
    data_dir = tmp / "device"
    add_key(data_dir, tmp / "publisher.key.pub")
    creds = credentials_file(tmp / "credentials.json", repo)
    modes = {m: resolve(m, data_dir, creds) for m in ("signatures", "tuf")}
    times: dict[str, list[float]] = {"signatures": [], "tuf": []}
    per_install: list[int] = []
    first_bytes = 0
    bundle_bytes = 0
    with serve(repo) as url:
        for rep in range(reps + 1):  # rep 0 warms caches (imports, node, the first refresh)
            for order, mode in enumerate(
                ("signatures", "tuf") if rep % 2 else ("tuf", "signatures")
            ):
                version = f"1.{rep}.{order}"
                out = tmp / f"echo-{version}.efb"
                blob = signed_bundle(out, tmp / "publisher.key", "echo", version, pad=size)
                bundle_bytes = len(blob.read_bytes())
                repo.add_target(role, "echo", version, blob.read_bytes())
                repo.publish()
                opts = InstallOptions(
                    data_dir=data_dir, faults=InstallFaults(), security=modes[mode]
                )
                before = repo.served_metadata_bytes
                t0 = time.perf_counter()
                install_from_registry(url, "echo", version, opts)
                elapsed = time.perf_counter() - t0
                got = repo.served_metadata_bytes - before
                if mode == "tuf" and rep == 0:
                    first_bytes = got
                if rep == 0:
                    step.clear()
                    step_cpu.clear()
                    continue
                times[mode].append(elapsed)
                if mode == "tuf":
                    per_install.append(got)
    med = {m: statistics.median(v) * 1000 for m, v in times.items()}
    print(f"bundle {bundle_bytes} bytes, {reps} repetitions, {functions} publishers in the repo")
    print()
    print("| figure | median |")
    print("|---|---:|")
    print(f"| install, update_security = signatures | {med['signatures']:.1f} ms |")
    print(f"| install, update_security = tuf | {med['tuf']:.1f} ms |")
    pairs = [t - g for t, g in zip(times["tuf"], times["signatures"], strict=True)]
    print(f"| difference of the medians | {med['tuf'] - med['signatures']:+.1f} ms |")
    print(f"| median of the paired differences (same repetition) | "
          f"{statistics.median(pairs) * 1000:+.1f} ms |")  # fmt: skip
    print(f"| TUF refresh + target lookup alone | {statistics.median(step) * 1000:.1f} ms |")
    cpu = statistics.median(step_cpu) * 1000
    print(f"| the same, CPU time (this process: device and registry) | {cpu:.1f} ms |")
    print(f"| metadata bytes per install / rollout | {statistics.median(per_install):.0f} B |")
    print(f"| metadata bytes, the device's first refresh | {first_bytes} B |")


if __name__ == "__main__":
    main()
