"""Issue 17's contract end to end: the platform's TUF repository (tufrepo) and the device's
TUF verification (tufclient) together, through the exact commands the issue names.

`edge-cloud tuf init` + `add-publisher` on the platform's data dir, a publisher-signed publish,
`edge-cloud device enroll` (the pinned root in the credentials file), then
`edge-agent fn install NAME@VERSION --cloud URL --data-dir D --credentials FILE`: verified
through the registry's `/v1/tuf/` metadata (the device's TUF cache appears, `fn list` shows the
metadata's expiry), and a bundle the registry has but TUF does not name is refused."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.registry_helpers import Platform, agent_cli, cli, ok, platform_running
from tests.tuf_repo_helpers import bundle, new_key, tuf_publish

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("keys")
    return {name: new_key(d, name) for name in ("alice", "mallory")}


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, Path]) -> Iterator[Platform]:
    data = tmp_path_factory.mktemp("cloud")
    ok(cli("tuf", "init", "--data-dir", data))
    ok(cli("tuf", "add-publisher", "--data-dir", data, "--key", f"{keys['alice']}.pub",
           "--functions", "echo"))  # fmt: skip
    with platform_running(data, "--no-mqtt") as p:
        yield p


def test_enrolled_device_installs_through_tuf_and_lists_the_expiry(
    platform: Platform, keys: dict[str, Path], tmp_path: Path
) -> None:
    tuf_publish(platform, bundle(tmp_path / "b", keys["alice"], "echo", "1.0.0"), keys["alice"])
    creds = tmp_path / "dev.json"
    ok(cli("device", "enroll", "dev-e2e-1", "--out", creds, "--data-dir", platform.data_dir,
           "--platform", platform.url))  # fmt: skip
    assert "tuf_root" in json.loads(creds.read_text())
    data = tmp_path / "device"
    ok(agent_cli("trust", "add", f"{keys['alice']}.pub", "--data-dir", data))
    out = ok(agent_cli("fn", "install", "echo@1.0.0", "--cloud", platform.url, "--data-dir", data,
                       "--credentials", creds))  # fmt: skip
    assert "echo" in out and "1.0.0" in out
    assert (data / "tuf").is_dir() and any((data / "tuf").iterdir())  # the trusted cache
    listed = json.loads(ok(agent_cli("fn", "list", "--data-dir", data, "--json")))
    rows = listed if isinstance(listed, list) else listed.get("functions", [])
    echo = next(r for r in rows if r["name"] == "echo")
    assert echo["tuf"]["expires"], echo  # the metadata's expiry is shown


def test_a_bundle_tuf_does_not_name_is_refused(
    platform: Platform, keys: dict[str, Path], tmp_path: Path
) -> None:
    """A version the TUF metadata does not name: refused before any bundle byte is fetched.
    (Hostile registries serving crafted metadata are tests/test_tuf_attacks.py.)"""
    creds = tmp_path / "dev.json"
    ok(cli("device", "enroll", "dev-e2e-2", "--out", creds, "--data-dir", platform.data_dir,
           "--platform", platform.url))  # fmt: skip
    data = tmp_path / "device"
    ok(agent_cli("trust", "add", f"{keys['alice']}.pub", "--data-dir", data))
    proc = agent_cli("fn", "install", "echo@9.9.9", "--cloud", platform.url, "--data-dir", data,
                     "--credentials", creds)  # fmt: skip
    assert proc.returncode != 0
    assert "tuf_unknown_target" in proc.stdout + proc.stderr
    assert not (data / "functions" / "echo").exists()
