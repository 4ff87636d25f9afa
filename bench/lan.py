"""What token checking and TLS cost on the local invoke path, measured in one run.

    .venv/bin/python bench/lan.py [--duration 6]

One warm Node function (the conformance echo, 100-byte payload), three agents one after the
other on loopback: no auth, `--auth token`, `--auth token` + TLS. Figures come from `wrk`
(p50 at c=1, req/s at c=32) and the agent's CPU per request, the figure that moves least on a
shared machine. The goal from issue 14: a token costs under 5 % of throughput. Nothing is
asserted.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.invoke import CONFORMANCE, http_pair  # noqa: E402
from cloud_sync.platform.pki import PlatformCA  # noqa: E402
from tests.harness import start_agent  # noqa: E402

SCRIPT = """
wrk.method = "POST"
wrk.body = string.rep("x", 100)
wrk.headers["Content-Type"] = "application/octet-stream"
{auth}
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=6.0, help="seconds per measurement")
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        print("bench needs wrk (apt-get install wrk)", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="edgefn-bench-lan-"))
    data = tmp / "data"
    shutil.copytree(CONFORMANCE / "node", data / "functions" / "conformance-node")
    create = ["token", "create", "--data-dir", str(data), "--scope", "invoke:conformance-node"]
    made = subprocess.run(
        [sys.executable, "-m", "edge_agent", *create],
        capture_output=True,
        text=True,
        check=True,
    )
    token = made.stdout.strip().splitlines()[-1]
    ca = PlatformCA.load_or_create(tmp / "ca")
    issued = ca.issue_server_cert(hostnames=("localhost",), ips=("127.0.0.1",))
    (tmp / "server.crt").write_text(issued.cert_pem)
    (tmp / "server.key").write_text(issued.key_pem)
    plain = tmp / "plain.lua"
    plain.write_text(SCRIPT.format(auth=""))
    bearer = tmp / "bearer.lua"
    bearer.write_text(SCRIPT.format(auth=f'wrk.headers["Authorization"] = "Bearer {token}"'))
    tls = ["--tls-cert", str(tmp / "server.crt"), "--tls-key", str(tmp / "server.key")]
    cases = [
        ("no auth", (), plain),
        ("--auth token", ("--auth", "token"), bearer),
        ("--auth token + TLS", ("--auth", "token", *tls), bearer),
    ]
    rows = []
    for label, extra, script in cases:
        print(f"measuring: {label} ...", file=sys.stderr, flush=True)
        agent = start_agent(data, "--log-level", "warning", "--worker-user", "root", *extra)
        try:
            url = f"{agent.url}/v1/functions/conformance-node/invoke"
            http_pair(url, 2, script)  # warm the pool to its working size
            rows.append((label, *http_pair(url, args.duration, script, agent.proc.pid)))
        finally:
            agent.stop()
    base_rps, base_cpu = rows[0][3], rows[0][4]
    print(f"\n## Token and TLS cost, warm Node echo, {args.duration:g} s per figure\n")
    print("| agent | p50 us (c=1) | p99 us (c=1) | req/s (c=32) | vs no auth | CPU us/req |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, p50, p99, rps, cpu in rows:
        print(
            f"| {label} | {p50:.0f} | {p99:.0f} | {rps:.0f} | {rps / base_rps:.1%} | "
            f"{cpu:.0f} ({cpu - base_cpu:+.0f}) |"
        )
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
