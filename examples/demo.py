"""`make run`: build the example functions, install them into a demo data dir, start the agent.

Everything lives under `.demo/` in the repository (delete it to start over). The C++ example is
installed twice, once per isolation mode, so both can be tried side by side.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from runtimes.build import build_function  # noqa: E402
from runtimes.errors import RuntimeErrorBase  # noqa: E402

DEMO = REPO / ".demo"
DATA = DEMO / "data"
PORT = int(os.environ.get("EDGEFN_PORT", "8680"))

SAMPLES = {
    "eta-node": '{"distance_km": 12.5, "speed_kmh": 50, "traffic": "heavy"}',
    "route-go": '{"points": [[52.52, 13.405], [52.50, 13.42], [52.48, 13.44]], "speed_kmh": 40}',
    "route-cpp": '{"points": [[52.52, 13.405], [52.50, 13.42], [52.48, 13.44]], "speed_kmh": 40}',
    "route-cpp-inproc": (
        '{"points": [[52.52, 13.405], [52.50, 13.42], [52.48, 13.44]], "speed_kmh": 40}'
    ),
}


def install(src: Path, name: str) -> None:
    dest = DATA / "functions" / name
    staged = dest.with_name(f".{name}.staged")
    shutil.rmtree(staged, ignore_errors=True)
    shutil.copytree(src, staged)
    if dest.exists():
        shutil.rmtree(dest)
    staged.rename(dest)


def make_inproc_variant(src: Path) -> Path:
    """A copy of the C++ example whose manifest asks for in-process isolation."""
    dest = DEMO / "build" / "route-cpp-inproc"
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(src, dest)
    manifest = dest / "edgefn.toml"
    text = manifest.read_text()
    text = re.sub(r"(?m)^name\s*=.*$", 'name = "route-cpp-inproc"', text)
    text = re.sub(r"(?m)^isolation\s*=.*$", 'isolation = "in-process"', text)
    manifest.write_text(text)
    return dest


def main() -> int:
    (DATA / "functions").mkdir(parents=True, exist_ok=True)
    built: list[str] = []
    for example in sorted((REPO / "examples").iterdir()):
        if not (example / "edgefn.toml").is_file():
            continue
        work = DEMO / "build" / example.name
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(example, work)
        print(f"building {example.name} ...", flush=True)
        try:
            manifest = build_function(work)
        except RuntimeErrorBase as exc:
            print(f"  skipped {example.name}: {exc.message}", file=sys.stderr)
            continue
        install(work, manifest.name)
        built.append(manifest.name)
        if manifest.runtime == "cpp":
            variant = make_inproc_variant(work)
            install(variant, "route-cpp-inproc")
            built.append("route-cpp-inproc")

    url = f"http://127.0.0.1:{PORT}"
    print("\nedgefn demo: the agent is starting with these functions. Try:\n")
    for name in built:
        body = SAMPLES.get(name, "hello")
        print(
            f"  curl -s -X POST {url}/v1/functions/{name}/invoke "
            f"-H 'Content-Type: application/json' -d '{body}'"
        )
    print(f"\n  curl -s {url}/v1/functions      # what is loaded, pool status")
    print(f"  curl -s {url}/metrics           # Prometheus metrics")
    print(f"  .venv/bin/edge-agent invoke eta-node --data-dir {DATA.relative_to(REPO)} \\")
    print(f"      --data '{SAMPLES['eta-node']}'")
    print("\nStop with Ctrl-C.\n", flush=True)
    argv = [
        sys.executable,
        "-m",
        "edge_agent",
        "run",
        "--data-dir",
        str(DATA),
        "--port",
        str(PORT),
    ]
    os.execv(sys.executable, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
