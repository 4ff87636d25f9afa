"""`make run` a second time: the demo's setup on an existing `.demo/` works, and is a no-op.

Runs `examples/demo.py`'s real steps (platform, keys, builds of every example, publish, enroll,
install) twice against one demo dir, with a platform restart in between as `make run` does.
"""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.harness import start_agent
from tests.mosquitto import free_port

REPO = Path(__file__).resolve().parent.parent


def _load_demo() -> ModuleType:
    spec = importlib.util.spec_from_file_location("edgefn_demo", REPO / "examples" / "demo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _setup_once(demo: ModuleType, root: Path) -> tuple[list[str], dict[str, bytes]]:
    platform, url = demo.start_platform(root, free_port(), free_port())
    try:
        names = demo.setup(url, root)
    finally:
        _stop(platform)
    bundles = {p.name: p.read_bytes() for p in sorted((root / "bundles").iterdir())}
    return names, bundles


@pytest.mark.slow
def test_demo_setup_twice_on_the_same_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    demo = _load_demo()
    root = tmp_path / "demo"
    names, bundles = _setup_once(demo, root)
    assert set(names) == {"eta-node", "route-cpp", "route-cpp-inproc", "route-go"}
    assert set(bundles) == {f"{n}.efb" for n in names}
    # Second run, as `make run` again: new platform process on the same data, same key.
    again, rebuilt = _setup_once(demo, root)
    assert again == names
    assert rebuilt == bundles  # reproducible builds: the registry sees the same digests
    installed = sorted(p.name for p in (root / "device" / "functions").iterdir() if p.is_dir())
    assert set(names) <= set(installed)
    assert "demo:" not in capsys.readouterr().err
    # The registry's TUF repository: made on the first run, and every bundle is a signed target.
    from cloud_sync.platform.tuf.repository import TufRepository

    store = TufRepository(root / "cloud").store
    snap = store.snapshot()
    roles = [k.removesuffix(".json") for k in snap.signed.meta if k.startswith("publisher-")]
    assert len(roles) == 1
    role = store.role(roles[0], snap)
    assert role is not None
    assert {p.split("/")[0] for p in role.signed.targets} == set(names)
    # The device verified its installs through TUF: the pinned root, a trusted metadata cache.
    assert "tuf_root" in json.loads((root / "device" / "credentials.json").read_text())
    assert any((root / "device" / "tuf").iterdir())


@pytest.mark.slow
def test_demo_rollout_reaches_the_device_and_simulated_ones_twice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    demo = _load_demo()
    root = tmp_path / "demo"
    ports = (free_port(), free_port())  # fixed, as `make run`'s: the credentials name the broker
    for attempt in range(2):  # `make run` twice on one .demo/: the second run works too
        platform, url = demo.start_platform(root, *ports)
        agent = None
        try:
            if attempt == 0:
                demo.setup(url, root)
            agent = start_agent(root / "device", "--credentials", str(root / "device" /
                                "credentials.json"))  # fmt: skip
            assert demo.demo_rollout(url, root) == "succeeded"
        finally:
            if agent is not None:
                agent.stop()
            _stop(platform)
        out = capsys.readouterr().out
        assert "wave 1:" in out and "wave 2:" in out, out
        assert (root / "device" / "functions" / "eta-node" / "active").read_text().strip() == (
            "1.1.0"
        )
