"""Console speed for a 10,000-device fleet: server time of the fleet page, render in Chromium.

    .venv/bin/python bench/dashboard.py [--devices 10000] [--runs 20]

Device rows go straight into the fleet store's SQLite file (one transaction; enrolling 10,000
devices through the API would sign 10,000 certificates and measure that instead), with a
reported document each (profile, two functions, rollout steps; 1 in 20 failed, so "unhealthy"
has rows) and labels over 10 sites. Then a real platform process (`edge-cloud serve`) serves
them. "Server" is the wall time of one GET on loopback with a keep-alive-free urllib client,
median and p95 over `--runs`; that includes the client's own ~0.3 ms. "Render" is Chromium's
navigation timing (`loadEventEnd`, and `domContentLoadedEventEnd`) for the same page, median
over runs, in one headless Chromium. Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import http.cookiejar
import json
import sqlite3
import statistics
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cloud_sync.platform.fleet_store import FleetStore
from tests.browser import available, chromium
from tests.registry_helpers import start_platform

PAGES = {
    "first page": "/ui/fleet",
    "label filter": "/ui/fleet?label=site%3Dsite-3",
    "state=unhealthy": "/ui/fleet?state=unhealthy",
    "search id": "/ui/fleet?q=00123",
    "sort last_seen desc, page 100": "/ui/fleet?sort=last_seen&dir=desc&page=100",
}


def seed(fleet_db: Path, n: int) -> None:
    FleetStore(fleet_db).close()  # the schema, made by its owner
    now = time.time()
    rows = []
    for i in range(n):
        failed = i % 20 == 0
        reported = {
            "device": f"dev-{i:05d}", "version": 3, "status": "applied",
            "functions": {"echo": "1.2.0" if i % 3 else "1.1.0", "eta": "0.4.1"},
            "profile": {"arch": "aarch64" if i % 2 else "x86_64", "labels": {"rack": str(i % 7)}},
            "rollouts": {"echo": {"state": "failed" if failed else "healthy", "version": "1.2.0"}},
        }  # fmt: skip
        rows.append(
            (f"dev-{i:05d}", json.dumps({"site": f"site-{i % 10}"}), now - i, "online" if i % 4
             else "offline", now - i % 600, json.dumps(reported), 3)
        )  # fmt: skip
    conn = sqlite3.connect(fleet_db)
    with conn:
        conn.executemany(
            "INSERT INTO devices (id, labels, enrolled_at, presence, last_seen, reported,"
            " reported_seq) VALUES (?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
    conn.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgefn-bench-dashboard-"))
    data = work / "platform"
    data.mkdir()
    seed(data / "fleet.db", args.devices)
    plat = start_platform(data)
    try:
        jar = http.cookiejar.CookieJar()
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        login = urllib.parse.urlencode({"secret": plat.token}).encode()
        opener.open(plat.url + "/ui/login", login, timeout=10).read()
        print(f"{args.devices} devices, {args.runs} runs per page\n")
        print("| page | server median ms | server p95 ms | bytes |")
        print("|---|---:|---:|---:|")
        for name, path in PAGES.items():
            times, size = [], 0
            for _ in range(args.runs):
                t0 = time.perf_counter()
                size = len(opener.open(plat.url + path, timeout=30).read())
                times.append((time.perf_counter() - t0) * 1000)
            times.sort()
            p95 = times[min(len(times) - 1, int(0.95 * len(times)))]
            print(f"| {name} | {statistics.median(times):.1f} | {p95:.1f} | {size} |")
        if not available():
            print("\nchromium / chromedriver not installed: no render figures")
            return 0
        with chromium(work / "chromium") as b:
            b.get(plat.url + "/ui/login")
            b.type("#secret", plat.token)
            b.click("#login button")
            print("\n| page in Chromium | DOMContentLoaded median ms | load median ms |")
            print("|---|---:|---:|")
            for name, path in PAGES.items():
                dcl, load = [], []
                for _ in range(max(3, args.runs // 4)):
                    b.get(plat.url + path)
                    nav = b.script(
                        "const n = performance.getEntriesByType('navigation')[0];"
                        " return [n.domContentLoadedEventEnd, n.loadEventEnd];"
                    )
                    dcl.append(float(nav[0]))
                    load.append(float(nav[1]))
                print(f"| {name} | {statistics.median(dcl):.1f} | {statistics.median(load):.1f} |")
    finally:
        plat.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
