"""The full author -> registry -> device flow for the compiled runtimes (Go, C++), end to end:
scaffold -> fn test -> build (Go also cross-compiled for aarch64) -> publish -> install from the
registry -> a running agent serves it without restart -> upgrade -> rollback."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtimes.bundle import BundleManifest, host_arch, read_bundle
from tests.harness import start_agent
from tests.registry_helpers import (
    agent_cli,
    build,
    cli,
    ok,
    platform_running,
    publish,
    set_version,
)
from tests.test_install import ALL_BYTES, wait_serving

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("flavour", ["go", "cpp", "cpp-inproc"])
def test_full_flow(tmp_path: Path, flavour: str) -> None:
    runtime = flavour.split("-")[0]
    name = f"echo-{flavour}"
    fn_dir = tmp_path / name
    key = tmp_path / "publisher.key"
    ok(cli("keys", "create", "--out", key))
    ok(cli("fn", "new", name, "--runtime", runtime, "--dir", fn_dir))
    if flavour == "cpp-inproc":
        manifest = fn_dir / "edgefn.toml"
        manifest.write_text(
            manifest.read_text().replace('isolation = "process"', 'isolation = "in-process"')
        )
    assert "passed" in ok(cli("fn", "test", fn_dir))

    arch = ("aarch64",) if runtime == "go" else ()
    v1 = build(fn_dir, key, tmp_path / f"{name}-0.1.0.efb", *arch)
    arches = BundleManifest.from_bytes(read_bundle(v1).manifest_bytes).arches
    expected = {host_arch(), "linux-aarch64"} if runtime == "go" else {host_arch()}
    assert set(arches) == expected
    set_version(fn_dir, "0.2.0")
    v2 = build(fn_dir, key, tmp_path / f"{name}-0.2.0.efb")

    with platform_running(tmp_path / "cloud") as platform:
        publish(platform, v1)
        publish(platform, v2)
        data = tmp_path / "device"
        ok(agent_cli("trust", "add", f"{key}.pub", "--data-dir", data))
        agent = start_agent(data, "--require-signed")
        try:
            cloud = ["--cloud", platform.url, "--data-dir", str(data)]
            ok(agent_cli("fn", "install", f"{name}@0.1.0", *cloud))
            assert wait_serving(agent, name, "0.1.0").body == ALL_BYTES
            ok(agent_cli("fn", "install", f"{name}@0.2.0", *cloud))
            assert wait_serving(agent, name, "0.2.0").body == ALL_BYTES
            ok(agent_cli("fn", "rollback", name, "--data-dir", data))
            assert wait_serving(agent, name, "0.1.0").body == ALL_BYTES
        finally:
            agent.stop()
