"""The device side of TUF apart from the attacks: crash safety, the setting, the director digest,
the deployer's installs, and the Ed25519 check kept behind TUF.

Repositories are built in the test (`tests.tuf_repo_fixture`) and served on 127.0.0.1; installs
are real (signed Node bundles, unpacked, warm-started).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent import config_file
from edge_agent.update_security import resolve
from runtimes.tuf_verify import TufError
from tests.registry_helpers import _env, agent_cli, ok, refused
from tests.tuf_repo_fixture import STALL, Device, TufRepo, credentials_file, make_device, serve


@pytest.fixture
def dev(tmp_path: Path) -> Iterator[Device]:
    with make_device(tmp_path) as d:
        yield d


def test_kill_9_during_a_refresh_leaves_the_previous_trusted_metadata(dev: Device) -> None:
    dev.publish("1.1.0")
    dev.repo.override["2.snapshot.json"] = STALL  # the new timestamp arrives, then nothing
    before = dev.trusted_files()
    current = os.readlink(dev.data / "tuf" / "current")
    args = ["fn", "install", "echo@1.1.0", "--cloud", dev.url, "--data-dir", str(dev.data),
            "--credentials", str(dev.creds)]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_agent", *args],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while "2.snapshot.json" not in dev.repo.served_requests and time.monotonic() < deadline:
            assert proc.poll() is None, "the install ended before the stalled request"
            time.sleep(0.05)
        assert "2.snapshot.json" in dev.repo.served_requests
        work = list((dev.data / "tuf").glob(".work-*"))
        assert len(work) == 1  # mid-refresh: the new timestamp is in the work dir only
        assert (work[0] / "timestamp.json").read_bytes() != before["timestamp.json"]
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert os.readlink(dev.data / "tuf" / "current") == current
    assert dev.trusted_files() == before
    assert dev.active() == "1.0.0"
    del dev.repo.override["2.snapshot.json"]
    assert "installed echo 1.1.0" in ok(dev.cli_install("1.1.0"))
    assert dev.leftovers() == []  # the killed refresh's work dir was swept
    assert dev.active() == "1.1.0"


def test_a_platform_without_tuf_is_refused_under_tuf_and_accepted_with_signatures(
    dev: Device,
) -> None:
    data = dev.bundle("1.1.0")
    dev.repo.add_bundle("echo", "1.1.0", data)
    dev.repo.files.clear()  # the platform serves no /v1/tuf/ at all
    line = refused(dev.cli_install("1.1.0"), "tuf_unavailable")
    assert "serves no TUF metadata" in line and "update_security is 'tuf'" in line
    assert dev.active() == "1.0.0" and dev.leftovers() == []
    out = ok(dev.cli_install("1.1.0", "--update-security", "signatures"))
    assert "installed echo 1.1.0" in out and "TUF" not in out
    assert dev.active() == "1.1.0"


def test_tuf_without_a_pinned_root_is_refused(tmp_path: Path) -> None:
    repo = TufRepo.create()
    with serve(repo) as url:
        proc = agent_cli(
            "fn", "install", "echo@1.0.0", "--cloud", url, "--data-dir", tmp_path / "d",
            "--update-security", "tuf",
        )  # fmt: skip
    # No trusted publisher key either: the key check comes first and says so.
    refused(proc, "unknown_signer")
    from edge_agent.trust import add_key
    from runtimes.signing import create_keypair

    create_keypair(tmp_path / "k")
    add_key(tmp_path / "d", tmp_path / "k.pub")
    with serve(repo) as url:
        proc = agent_cli(
            "fn", "install", "echo@1.0.0", "--cloud", url, "--data-dir", tmp_path / "d",
            "--update-security", "tuf",
        )  # fmt: skip
    assert "no pinned TUF root" in refused(proc, "tuf_no_root")
    assert not (tmp_path / "d" / "tuf" / "current").exists()


def test_unset_update_security_follows_the_pinned_root(tmp_path: Path) -> None:
    repo = TufRepo.create()
    creds = credentials_file(tmp_path / "c.json", repo)
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"format": 1}))
    assert resolve(None, tmp_path / "d", creds).mode == "tuf"
    assert resolve(None, tmp_path / "d", plain).mode == "signatures"
    assert resolve(None, tmp_path / "d").mode == "signatures"
    assert resolve("signatures", tmp_path / "d", creds).mode == "signatures"
    assert resolve("tuf", tmp_path / "d").mode == "tuf"


def test_trusted_metadata_in_the_data_dir_keeps_tuf_on(dev: Device) -> None:
    # Without the credentials file, the cache alone keeps the device on TUF.
    assert resolve(None, dev.data).mode == "tuf"


def test_config_file_key(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('update_security = "signatures"\n')
    assert config_file.load(cfg)["update_security"] == "signatures"
    cfg.write_text('update_security = "none"\n')
    with pytest.raises(config_file.ConfigFileError, match="'none' is not one of tuf, signatures"):
        config_file.load(cfg)


def test_director_digest_must_be_the_target_hash(dev: Device) -> None:
    real = dev.publish("1.1.0")
    import hashlib

    other = "0" * 64
    with pytest.raises(TufError) as err:
        dev.install("1.1.0", expected_digest=f"sha256:{other}")
    assert err.value.code == "tuf_director_mismatch"
    assert "refusing both" in err.value.message
    assert dev.active() == "1.0.0" and dev.leftovers() == []
    result = dev.install("1.1.0", expected_digest=hashlib.sha256(real).hexdigest())
    assert result.outcome == "installed" and dev.active() == "1.1.0"


def test_the_ed25519_signature_is_still_checked_behind_tuf(dev: Device, tmp_path: Path) -> None:
    from runtimes.signing import create_keypair

    create_keypair(tmp_path / "stranger.key")
    data = dev.bundle("1.1.0", key=tmp_path / "stranger.key")  # in TUF, not a trusted signer
    dev.repo.add_target(dev.role, "echo", "1.1.0", data)
    dev.repo.publish()
    refused(dev.cli_install("1.1.0"), "unknown_signer")
    assert dev.active() == "1.0.0" and dev.leftovers() == []


def test_rollout_installs_go_through_tuf(dev: Device) -> None:
    """The deployer's install path (edge_agent.deployer_install), as a rollout calls it."""
    from edge_agent.deployer_install import install_version

    steps: list[str] = []
    policy = resolve(None, dev.data, dev.creds)
    dev.repo.add_bundle("echo", "1.1.0", dev.bundle("1.1.0"))  # served, not a TUF target
    outcome = install_version(
        dev.data, dev.url, "echo", "1.1.0", rollback=False, progress=steps.append, security=policy
    )
    assert not outcome.ok and outcome.state.value == "rejected"
    assert outcome.code == "signature" and "(tuf_unknown_target)" in outcome.message
    assert dev.active() == "1.0.0"
    dev.publish("1.2.0")
    outcome = install_version(
        dev.data, dev.url, "echo", "1.2.0", rollback=False, progress=steps.append, security=policy
    )
    assert outcome.ok, outcome.message
    assert dev.active() == "1.2.0"


def test_fn_list_shows_the_metadata_expiry(dev: Device) -> None:
    listing = ok(agent_cli("fn", "list", "--data-dir", dev.data))
    expires = json.loads(dev.repo.history["timestamp"][1])["signed"]["expires"]
    assert f"TUF metadata valid; expires {expires} (timestamp)" in listing
    rows = json.loads(ok(agent_cli("fn", "list", "--json", "--data-dir", dev.data)))
    assert rows[0]["name"] == "echo"
    assert rows[0]["tuf"] == {"expires": expires, "expired": False, "not_in_metadata": []}


def test_unreachable_registry_is_a_download_failure_not_an_attack(dev: Device) -> None:
    from edge_agent.deployer_install import install_version

    policy = resolve(None, dev.data, dev.creds)
    outcome = install_version(
        dev.data, "http://127.0.0.1:9", "echo", "1.1.0", rollback=False,
        progress=lambda s: None, security=policy,
    )  # fmt: skip
    assert outcome.state.value == "failed" and outcome.code == "download_failed"
    assert dev.active() == "1.0.0" and dev.leftovers() == []


async def test_the_deployer_verifies_its_installs_through_tuf(dev: Device) -> None:
    """A rollout's desired version reaches the install path with the device's TUF policy."""
    import asyncio

    from cloud_sync.rollout.messages import StatusReport
    from cloud_sync.rollout.states import DeviceState
    from cloud_sync.state import AgentConfig
    from edge_agent.deployer import Deployer, DeployerHooks
    from edge_agent.deployer_health import HealthSample

    reports: list[StatusReport] = []

    async def report(r: StatusReport) -> None:
        reports.append(r)

    async def reload() -> None:
        return None

    hooks = DeployerHooks(report, reload, lambda name: HealthSample("1.1.0", 0, 0, 0))
    deployer = Deployer(dev.data, "edge-01", dev.url, hooks, resolve(None, dev.data, dev.creds))
    dev.repo.add_bundle("echo", "1.1.0", dev.bundle("1.1.0"))  # served, never a TUF target
    await deployer.start()
    try:
        deployer.desired(AgentConfig(raw={"functions": {"echo": {"version": "1.1.0"}}}))
        await asyncio.wait_for(deployer.idle.wait(), 60)
    finally:
        await deployer.close()
    last = reports[-1]
    assert last.state is DeviceState.REJECTED and last.code == "signature"
    assert "(tuf_unknown_target)" in (last.message or "")
    assert dev.active() == "1.0.0" and dev.leftovers() == []


def test_tuf_verifier_checks_length_and_hash_before_the_signature(
    dev: Device, tmp_path: Path
) -> None:
    """The pure check (runtimes.tuf_verify), on a file the download client did not vet."""
    import hashlib

    from edge_agent.trust import load_verifier
    from runtimes.tuf_verify import TufTarget, TufVerifier

    data = dev.bundle("1.1.0")
    good = TufTarget("echo/1.1.0.edgefn", len(data), hashlib.sha256(data).hexdigest())
    inner = load_verifier(dev.data)
    path = tmp_path / "b.efb"
    path.write_bytes(data + b"x")
    with pytest.raises(TufError) as err:
        TufVerifier(inner, good).verify(path)
    assert err.value.code == "tuf_length_mismatch"
    assert f"is more than {len(data)} bytes" in err.value.message
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(TufError) as err:
        TufVerifier(inner, good).verify(path)
    assert err.value.code == "tuf_hash_mismatch"
    path.write_bytes(data)
    assert TufVerifier(inner, good).verify(path, expect_name="echo").version == "1.1.0"


def test_a_data_dir_reached_through_a_symlink_keeps_its_generation(
    dev: Device, tmp_path: Path
) -> None:
    link = tmp_path / "via-link"
    link.symlink_to(dev.data)
    dev.data = link  # the refresh sees the path through the symlink
    dev.publish("1.1.0")
    dev.install("1.1.0")
    dev.publish("1.2.0")
    dev.install("1.2.0")
    assert dev.active() == "1.2.0" and dev.leftovers() == []
    gens = sorted(p.name for p in (link / "tuf").iterdir() if p.name.startswith("gen-"))
    assert len(gens) == 1 and os.readlink(link / "tuf" / "current") == gens[0]


def test_garbage_metadata_is_refused_and_nothing_is_kept(dev: Device) -> None:
    dev.publish("1.1.0")
    before = dev.trusted_files()
    dev.repo.override["timestamp.json"] = b"<html>502 Bad Gateway</html>"
    line = refused(dev.cli_install("1.1.0"), "tuf_bad_metadata")
    assert "TUF metadata from the registry at" in line
    assert dev.trusted_files() == before and dev.leftovers() == []
    assert dev.active() == "1.0.0"


def test_a_bare_name_installs_the_latest_version_the_metadata_names(dev: Device) -> None:
    dev.publish("1.1.0")
    dev.publish("1.10.0")  # semver order, not string order
    dev.repo.add_bundle("echo", "2.0.0", dev.bundle("2.0.0"))  # served, never a TUF target
    # The fixture serves no version list: the registry's own "latest" is never asked.
    proc = agent_cli(
        "fn", "install", "echo", "--cloud", dev.url, "--data-dir", dev.data,
        "--credentials", dev.creds,
    )  # fmt: skip
    assert "installed echo 1.10.0" in ok(proc)
    assert dev.active() == "1.10.0" and dev.leftovers() == []


def test_a_cache_that_cannot_be_written_is_a_failure_with_its_own_code(dev: Device) -> None:
    """Disk trouble in DATA_DIR/tuf is `tuf_cache` (a failure the deployer retries), never a
    traceback, and the trusted set stays."""
    from edge_agent.deployer_install import classify

    dev.publish("1.1.0")
    before = dev.trusted_files()
    top = dev.data / "tuf"
    # Root ignores directory modes; the immutable attribute stops even root from adding entries.
    lock = ["chattr", "+i", str(top)] if os.geteuid() == 0 else ["chmod", "0555", str(top)]
    unlock = ["chattr", "-i", str(top)] if os.geteuid() == 0 else ["chmod", "0755", str(top)]
    subprocess.run(lock, check=True)
    try:
        with pytest.raises(TufError) as err:
            dev.install("1.1.0")
    finally:
        subprocess.run(unlock, check=True)
    assert err.value.code == "tuf_cache" and "cannot be updated" in err.value.message
    outcome = classify(err.value)
    assert outcome.state.value == "failed" and outcome.code == "install_failed"
    assert dev.trusted_files() == before and dev.active() == "1.0.0"
    assert dev.install("1.1.0").outcome == "installed"


async def test_the_deployer_passes_the_directors_digest_to_the_tuf_check(dev: Device) -> None:
    """A rollout install names the digest from the director's instruction (DeployerHooks
    .expected_digest): a TUF target with other bytes is refused, the active version stays."""
    import asyncio

    from cloud_sync.rollout.messages import StatusReport
    from cloud_sync.rollout.states import DeviceState
    from cloud_sync.state import AgentConfig
    from edge_agent.deployer import Deployer, DeployerHooks
    from edge_agent.deployer_health import HealthSample

    dev.publish("1.1.0")  # a real TUF target, but not what the director instructed
    asked: list[tuple[str, str]] = []
    reports: list[StatusReport] = []

    def expected(name: str, version: str) -> str:
        asked.append((name, version))
        return "sha256:" + "0" * 64

    async def report(r: StatusReport) -> None:
        reports.append(r)

    async def reload() -> None:
        return None

    hooks = DeployerHooks(
        report, reload, lambda name: HealthSample("1.1.0", 0, 0, 0), expected_digest=expected
    )
    deployer = Deployer(dev.data, "edge-01", dev.url, hooks, resolve(None, dev.data, dev.creds))
    await deployer.start()
    try:
        deployer.desired(AgentConfig(raw={"functions": {"echo": {"version": "1.1.0"}}}))
        await asyncio.wait_for(deployer.idle.wait(), 60)
    finally:
        await deployer.close()
    assert asked == [("echo", "1.1.0")]
    last = reports[-1]
    assert last.state is DeviceState.REJECTED, last
    assert "tuf_director_mismatch" in (last.message or "")
    assert dev.active() == "1.0.0" and dev.leftovers() == []
