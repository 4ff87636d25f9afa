"""`make run`: the whole loop on this machine, with nothing configured by hand.

1. starts the central platform (`edge-cloud serve`, with its embedded MQTT broker) on loopback;
2. creates a publisher key, builds and signs the example functions (Node, Go, C++ twice: once
   isolated, once in-process) and publishes them to the platform's registry, which is a TUF
   repository (`edge-cloud tuf init`; the key is the functions' delegated publisher);
3. enrolls a device (its credentials pin the TUF root) and trusts the publisher key on it;
4. installs every function on the device from the registry, verified through TUF metadata
   and the bundle signature (docs/update-security.md), and warmed;
5. runs the agent in the foreground, joined to the platform (config, metrics over MQTT), and
   rolls version 1.1.0 of eta-node out to it and to three simulated devices in two waves
   (`demo_rollout`; the simulated devices are revoked afterwards).

Everything lives under `.demo/` in the repository (delete it to start over). Ctrl-C stops both.
Running it again on an existing `.demo/` reuses the key, the credentials and the platform's data:
builds are reproducible, so the bundles come out byte for byte the same and publishing and
installing them again are no-ops. `setup()` is steps 2-4 alone (the tests run it twice).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / ".demo"
CLOUD = DEMO / "cloud"
DEVICE = DEMO / "device"
PORT = int(os.environ.get("EDGEFN_PORT", "8680"))
CLOUD_PORT = int(os.environ.get("EDGEFN_CLOUD_PORT", "8690"))
# Fixed, because the device's credentials file names the broker's address.
MQTT_PORT = int(os.environ.get("EDGEFN_MQTT_PORT", "8883"))

ROUTE = '{"points": [[52.52, 13.405], [52.50, 13.42], [52.48, 13.44]], "speed_kmh": 40}'
SAMPLES = {
    "eta-node": '{"distance_km": 12.5, "speed_kmh": 50, "traffic": "heavy"}',
    "route-go": ROUTE,
    "route-cpp": ROUTE,
    "route-cpp-inproc": ROUTE,
}


def run(*args: str | Path, quiet: bool = True) -> str:
    """Run one of our CLIs; stop the demo with its message when it fails."""
    proc = subprocess.run(
        [sys.executable, "-m", *map(str, args)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        sys.exit(f"demo: {' '.join(map(str, args[:3]))} failed:\n{proc.stdout}{proc.stderr}")
    if not quiet:
        print(proc.stdout, end="")
    return proc.stdout


def start_platform(
    demo: Path = DEMO, port: int = CLOUD_PORT, mqtt_port: int = MQTT_PORT
) -> tuple[subprocess.Popen[bytes], str]:
    """Start `edge-cloud serve` on loopback with its data in `demo`/cloud; (process, URL)."""
    cloud = demo / "cloud"
    cloud.mkdir(parents=True, exist_ok=True)
    (cloud / "platform.json").unlink(missing_ok=True)
    with (demo / "platform.log").open("ab") as log:  # the child keeps its own copy
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "cloud_sync.platform.cli", "serve"),
                *("--data-dir", str(cloud), "--port", str(port), "--mqtt-port", str(mqtt_port)),
            ],
            stdout=log,
            stderr=log,
        )
    for _ in range(300):  # bounded: up to 30 s
        try:
            info = json.loads((cloud / "platform.json").read_text())
            if info.get("pid") == proc.pid:
                return proc, str(info["url"])
        except (OSError, ValueError):
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    sys.exit(f"demo: the platform did not start; see {demo / 'platform.log'}")


def inproc_variant(src: Path, demo: Path = DEMO) -> Path:
    """A copy of the C++ example whose manifest asks for in-process isolation."""
    dest = demo / "src" / "route-cpp-inproc"
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(src, dest)
    manifest = dest / "edgefn.toml"
    text = manifest.read_text()
    text = re.sub(r"(?m)^name\s*=.*$", 'name = "route-cpp-inproc"', text)
    text = re.sub(r"(?m)^isolation\s*=.*$", 'isolation = "in-process"\ninline = true', text)
    manifest.write_text(text)
    # The build dates a bundle by its sources' newest mtime: keep the example's, so the variant
    # builds the same bytes on every run (a fresh mtime would be a new, unpublishable bundle).
    shutil.copystat(src / "edgefn.toml", manifest)
    return dest


def main() -> int:
    platform, url = start_platform()
    try:
        print(f"platform: {url} (log in .demo/platform.log)")
        names = setup(url)
        return run_agent(platform, names)
    finally:
        platform.send_signal(signal.SIGTERM)
        try:
            platform.wait(15)
        except subprocess.TimeoutExpired:
            platform.kill()


def setup(url: str, demo: Path = DEMO) -> list[str]:
    """Steps 2-4 against the platform at `url`: key, build, publish, enroll, trust, install.

    Safe to run again on an existing `demo` dir: what exists is reused, and the same sources
    build the same bundle bytes, which the registry and the device accept again as no-ops.
    Returns the names of the installed functions.
    """
    for d in (demo / "cloud", demo / "device", demo / "src", demo / "bundles"):
        d.mkdir(parents=True, exist_ok=True)
    cloud, device = demo / "cloud", demo / "device"
    key = demo / "publisher.key"
    if not key.exists():
        run("cloud_sync.platform.cli", "keys", "create", "--out", key)
    sources = []
    for example in sorted((REPO / "examples").iterdir()):
        if (example / "edgefn.toml").is_file():
            src = demo / "src" / example.name
            shutil.rmtree(src, ignore_errors=True)
            shutil.copytree(example, src)  # copy2: mtimes kept, so the build date is the same
            sources.append(src)
            if example.name == "route-cpp":
                sources.append(inproc_variant(src, demo))
    # The registry's TUF repository (docs/update-security.md): made once, and the demo key may
    # publish the demo's functions; `fn publish --key` then signs the key's TUF role.
    run("cloud_sync.platform.cli", "tuf", "init", "--data-dir", cloud, "--exist-ok")
    functions = ",".join(src.name for src in sources)
    tuf_add = ("tuf", "add-publisher", "--data-dir", cloud, "--key", f"{key}.pub")
    run("cloud_sync.platform.cli", *tuf_add, "--functions", functions)
    names = []
    for src in sources:
        print(f"building, signing and publishing {src.name} ...", flush=True)
        bundle = demo / "bundles" / f"{src.name}.efb"
        run("cloud_sync.platform.cli", "fn", "build", src, "--key", key, "--out", bundle)
        run(
            "cloud_sync.platform.cli",
            "fn",
            "publish",
            bundle,
            "--platform",
            url,
            "--data-dir",
            cloud,
            "--key",
            key,
        )
        names.append(src.name)

    creds = device / "credentials.json"
    if not creds.exists():
        run(
            "cloud_sync.platform.cli",
            "device",
            "enroll",
            "demo-gateway",
            "--out",
            creds,
            "--data-dir",
            cloud,
        )
        run("edge_agent", "trust", "add", f"{key}.pub", "--data-dir", device)
    _pin_tuf_root(creds, cloud)
    for name in names:
        print(f"installing {name} on the device from the registry (TUF) ...", flush=True)
        run("edge_agent", "fn", "install", name, "--cloud", url, "--data-dir", device,
            "--credentials", creds, "--update-security", "tuf")  # fmt: skip
    return names


def _pin_tuf_root(creds: Path, cloud: Path) -> None:
    """A `.demo/` enrolled before the registry had TUF: pin its root now, as enrolment would.

    The demo's operator owns both sides, so copying the platform's root.json is the same trust
    decision `edge-cloud device enroll` makes for a new device."""
    doc = json.loads(creds.read_text())
    if "tuf_root" in doc:
        return
    roots = sorted(
        (cloud / "tuf" / "metadata").glob("*.root.json"), key=lambda p: int(p.name.split(".")[0])
    )
    doc["tuf_root"] = json.loads(roots[-1].read_bytes())
    tmp = creds.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    os.chmod(tmp, 0o600)
    os.replace(tmp, creds)


def run_agent(platform: subprocess.Popen[bytes], names: list[str]) -> int:
    """Step 5: the agent in the foreground until Ctrl-C (or the platform stops)."""
    creds = DEVICE / "credentials.json"
    agent_url = f"http://127.0.0.1:{PORT}"
    print("\nedgefn demo is up: a platform, and an agent joined to it. Try:\n")
    for name in names:
        print(
            f"  curl -s -X POST {agent_url}/v1/functions/{name}/invoke "
            f"-H 'Content-Type: application/json' -d '{SAMPLES.get(name, 'hi')}'"
        )
    print(f"\n  curl -s {agent_url}/v1/functions     # what is loaded, pool status")
    print(f"  curl -s {agent_url}/metrics          # Prometheus metrics")
    print("  .venv/bin/edge-agent invoke eta-node --data-dir .demo/device \\")
    print(f"      --data '{SAMPLES['eta-node']}'")
    print("  .venv/bin/edge-cloud devices --data-dir .demo/cloud    # the device, online")
    print("  .venv/bin/edge-cloud metrics demo-gateway --data-dir .demo/cloud")
    print("  # a rollout to the device (one wave), then its progress, gates and device states:")
    print("  .venv/bin/edge-cloud rollout start eta-node@1.0.0 --target '*' --waves 100 \\")
    print("      --bake 2 --min-invocations 0 --data-dir .demo/cloud")
    print("  .venv/bin/edge-cloud rollout list --data-dir .demo/cloud")
    print(f"\n  console: http://127.0.0.1:{CLOUD_PORT}/ui/  (token: .demo/cloud/admin.token)")
    print("\nStop with Ctrl-C.\n", flush=True)
    agent = subprocess.Popen(
        [
            *(sys.executable, "-m", "edge_agent", "run", "--data-dir", str(DEVICE)),
            *("--port", str(PORT), "--credentials", str(creds), "--metrics-interval", "10"),
        ]
    )
    try:
        demo_rollout(f"http://127.0.0.1:{CLOUD_PORT}")
    except (OSError, ValueError, KeyError) as exc:  # the demo goes on without it
        print(f"demo: the rollout demo failed: {exc}", file=sys.stderr)
    stop = {"sig": False}

    def forward(signum: int, frame: object) -> None:
        stop["sig"] = True
        agent.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    while agent.poll() is None and platform.poll() is None:
        time.sleep(0.2)
    if agent.poll() is None:
        agent.send_signal(signal.SIGTERM)
        print("demo: the platform stopped; stopping the agent", file=sys.stderr)
    code = agent.wait(30)
    return 0 if stop["sig"] else code


ROLLOUT_FN, ROLLOUT_VERSION = "eta-node", "1.1.0"
SIM_DEVICES = 3


def _api(url: str, token: str, method: str, path: str, body: Any = None) -> Any:
    req = urllib.request.Request(
        url + path, method=method, data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def demo_rollout(url: str, demo: Path = DEMO, device: str = "demo-gateway") -> str:
    """A small rollout, end to end: eta-node 1.1.0 in waves 25,100 to the demo device and
    SIM_DEVICES simulated ones (`edge-cloud simulate`, in the background for the rollout).

    Safe to run again: 1.1.0 builds to the same bytes (publishing it again is a no-op), a device
    that already runs it reports it healthy at once, and each run enrolls simulated devices
    under a fresh prefix and revokes them afterwards, so later rollouts do not wait for them.
    Returns the rollout's final state; prints the waves as they complete.
    """
    cloud = demo / "cloud"
    token = (cloud / "admin.token").read_text().strip()
    src = demo / "rollout" / ROLLOUT_FN
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(REPO / "examples" / ROLLOUT_FN, src)  # copy2: mtimes kept, same bytes
    manifest = src / "edgefn.toml"
    text = re.sub(r"(?m)^version\s*=.*$", f'version = "{ROLLOUT_VERSION}"', manifest.read_text())
    manifest.write_text(text)
    shutil.copystat(REPO / "examples" / ROLLOUT_FN / "edgefn.toml", manifest)
    bundle = demo / "rollout" / f"{ROLLOUT_FN}-{ROLLOUT_VERSION}.efb"
    print(f"\nrollout demo: building and publishing {ROLLOUT_FN} {ROLLOUT_VERSION} ...", flush=True)
    run("cloud_sync.platform.cli", "fn", "build", src, "--key", demo / "publisher.key",
        "--out", bundle)  # fmt: skip
    run("cloud_sync.platform.cli", "fn", "publish", bundle, "--platform", url, "--data-dir", cloud)
    prefix = f"demosim{int(time.time()) % 10**6}"
    sims = [f"{prefix}-{i:05d}" for i in range(SIM_DEVICES)]
    with (demo / "simulate.log").open("ab") as log:
        sim = subprocess.Popen(
            [
                *(sys.executable, "-m", "cloud_sync.platform.cli", "simulate"),
                *("--devices", str(SIM_DEVICES), "--platform", url, "--data-dir", str(cloud)),
                *("--prefix", prefix, "--duration", "300", "--labels", "demo=rollout"),
            ],
            stdout=log,
            stderr=log,
        )
    try:
        for _ in range(600):  # bounded: 60 s for the demo device and the simulated ones
            view = {d["id"]: d for d in _api(url, token, "GET", "/v1/devices")["devices"]}
            if all(view.get(d, {}).get("online") and view[d].get("profile")
                   for d in (device, *sims)):  # fmt: skip
                break
            time.sleep(0.1)
        else:
            return "devices not online"
        target = "device=" + "|".join((device, *sims))
        spec = {"function": ROLLOUT_FN, "version": ROLLOUT_VERSION, "target": target,
                "waves": [25, 100], "bake_s": 1, "min_invocations": 0}  # fmt: skip
        rid = _api(url, token, "POST", "/v1/rollouts", spec)["id"]
        print(f"rollout {rid}: {ROLLOUT_FN} {ROLLOUT_VERSION} to {device} and {SIM_DEVICES} "
              "simulated devices, waves 25,100", flush=True)  # fmt: skip
        return _follow(url, token, rid)
    finally:
        sim.terminate()
        sim.wait(30)
        for d in sims:
            _api(url, token, "POST", f"/v1/devices/{d}/revoke", {})


def _follow(url: str, token: str, rid: str) -> str:
    """Print each wave as it completes, then the end state (bounded: 2 minutes)."""
    shown, started, state = -1, time.monotonic(), "running"
    while time.monotonic() - started < 120:
        doc = _api(url, token, "GET", f"/v1/rollouts/{rid}")
        state, current = doc["state"], int(doc.get("wave") or 0)
        done = current if state not in ("succeeded", "rolled_back", "aborted") else current + 1
        for wave in range(shown + 1, done):
            mine = [f"{d['device']} {d['state']}" for d in doc["devices"] if d["wave"] == wave]
            print(f"  wave {wave + 1}: {', '.join(mine)}", flush=True)
            shown = wave
        if state in ("succeeded", "rolled_back", "rollback_failed", "aborted"):
            break
        time.sleep(0.3)
    print(f"rollout {rid} {state} in {time.monotonic() - started:.1f} s "
          f"(edge-cloud rollout status {rid} --data-dir .demo/cloud)\n", flush=True)  # fmt: skip
    return str(state)


if __name__ == "__main__":
    sys.exit(main())
