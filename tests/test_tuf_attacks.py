"""The attacks TUF exists for, each from a hostile registry on loopback, each refused.

Every test: a repository built with python-tuf's metadata API (`tests.tuf_repo_fixture`), a device
that installed echo 1.0.0 through it (real signed bundle, real install, real warm start), then the
attack. The install is attempted the way an operator does (`edge-agent fn install echo@V --cloud
URL --data-dir D --credentials FILE`) and must be refused with one stderr line carrying the
stable code; the active version stays (and a running agent keeps serving it, in the freeze test);
nothing half-written is left (`Device.leftovers`); where the refusal is in the metadata, the
trusted metadata on disk is exactly what it was before.

The director attacks (forged or replayed fleet instructions) are tested with the director.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.registry_helpers import agent_cli, ok, refused
from tests.tuf_repo_fixture import Device, make_device


@pytest.fixture
def dev(tmp_path: Path) -> Iterator[Device]:
    with make_device(tmp_path) as d:
        yield d


def attacked(dev: Device, version: str, code: str, *, active: str = "1.0.0",
             metadata_kept: bool = True) -> str:  # fmt: skip
    """Attempt `fn install echo@version`; assert a clean refusal with `code`; the stderr line."""
    before = dev.trusted_files()
    functions = sorted(str(p) for p in (dev.data / "functions").rglob("*"))
    line = refused(dev.cli_install(version), code)
    assert "install refused" in line
    assert dev.active() == active
    assert sorted(str(p) for p in (dev.data / "functions").rglob("*")) == functions
    assert dev.leftovers() == []
    if metadata_kept:
        assert dev.trusted_files() == before, "the trusted metadata changed"
    return line


def test_arbitrary_software_not_in_the_metadata_is_refused(dev: Device) -> None:
    # A bundle validly signed by the trusted publisher key, served by the registry, but never
    # published as a TUF target: the Ed25519 signature alone would have accepted it.
    dev.repo.add_bundle("echo", "1.1.0", dev.bundle("1.1.0"))
    line = attacked(dev, "1.1.0", "tuf_unknown_target")
    assert "echo/1.1.0.edgefn is not a target in the trusted TUF metadata" in line


def test_arbitrary_software_under_a_published_name_is_refused(dev: Device) -> None:
    # 1.1.0 is a target; the registry serves other (validly signed) bytes at its digest's URL.
    real = dev.publish("1.1.0")
    digest = next(d for d, b in dev.repo.bundles.items() if b == real)
    dev.repo.override[f"bundles/{digest}"] = dev.bundle("1.1.0-evil")
    line = attacked(dev, "1.1.0", "tuf_hash_mismatch", metadata_kept=False)
    assert "is not the target in the trusted TUF metadata" in line


def test_rollback_of_metadata_versions_is_refused(dev: Device) -> None:
    dev.publish("1.1.0")
    dev.install("1.1.0")  # the device now trusts timestamp v2
    # The attacker replays the older, validly signed timestamp v1 (and so the older snapshot).
    dev.repo.override["timestamp.json"] = dev.repo.history["timestamp"][1]
    dev.publish("1.2.0")  # the release the attacker wants to hide
    line = attacked(dev, "1.2.0", "tuf_rollback", active="1.1.0")
    assert "New timestamp version 1 must be >= 2" in line


def test_indefinite_freeze_blocks_new_installs_and_installed_keeps_serving(
    dev: Device,
) -> None:
    from tests.harness import start_agent

    # The last honest timestamp expires in 2 s; the mirror then serves it forever.
    dev.publish("1.1.0", timestamp_expires=datetime.now(UTC).replace(microsecond=0)
                + timedelta(seconds=2))  # fmt: skip
    dev.install("1.1.0")
    dev.publish("1.2.0")  # the fix the frozen mirror never shows
    dev.repo.override["timestamp.json"] = dev.repo.history["timestamp"][2]
    deadline = time.monotonic() + 10
    expires = json.loads(dev.repo.history["timestamp"][2])["signed"]["expires"]
    until = datetime.strptime(expires, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    while datetime.now(UTC) <= until and time.monotonic() < deadline:
        time.sleep(0.1)
    assert datetime.now(UTC) > until
    agent = start_agent(dev.data, "--require-signed")
    try:
        line = attacked(dev, "1.2.0", "tuf_expired", active="1.1.0")
        assert "timestamp.json is expired" in line
        assert "no new install until the registry re-signs it" in line
        resp = agent.invoke("echo", b"still here", {"Content-Type": "application/octet-stream"})
        assert resp.status == 200 and resp.body == b"still here"
        assert resp.headers.get("X-Edgefn-Version") == "1.1.0"
    finally:
        agent.stop()
    listing = ok(agent_cli("fn", "list", "--data-dir", dev.data))
    assert "TUF metadata EXPIRED: new installs are refused" in listing


def test_mix_and_match_is_refused(dev: Device) -> None:
    dev.publish("1.1.0")  # snapshot v2 names echo's role v2, which lists 1.1.0
    # The mirror serves the publisher role v1 (validly signed, never published with snapshot v2)
    # under the name snapshot v2 asks for.
    dev.repo.override[f"2.{dev.role}.json"] = dev.repo.history[dev.role][1]
    line = attacked(dev, "1.1.0", "tuf_mix_and_match")
    assert f"Expected {dev.role} v2, got v1" in line


def test_endless_metadata_is_cut_at_its_bound(dev: Device) -> None:
    dev.publish("1.1.0")
    dev.repo.override["timestamp.json"] = b"{" + b" " * (1 << 20) + b"}"
    line = attacked(dev, "1.1.0", "tuf_too_large")
    assert "exceeding the maximum allowed length of 16384" in line  # stopped, not read whole


def test_endless_bundle_is_cut_at_the_declared_length(dev: Device) -> None:
    real = dev.publish("1.1.0")
    digest = next(d for d, b in dev.repo.bundles.items() if b == real)
    dev.repo.override[f"bundles/{digest}"] = real + b"\0" * (1 << 20)
    line = attacked(dev, "1.1.0", "tuf_too_large", metadata_kept=False)
    assert f"more than the {len(real)} bytes the trusted TUF metadata declares" in line


def test_root_signed_by_one_of_two_required_keys_is_refused(tmp_path: Path) -> None:
    with make_device(tmp_path, root_keys=2, root_threshold=2) as dev:
        dev.repo.rotate_root(sign_with_old=1)  # v2 carries one of the two v1 signatures
        dev.publish("1.1.0")
        line = attacked(dev, "1.1.0", "tuf_unsigned")
        assert "root was signed by 1/2 keys" in line


def test_revoked_publisher_key_new_bundles_refused_installed_flagged(dev: Device) -> None:
    dev.repo.revoke(dev.role)  # the publisher's key is compromised: removed from delegations
    dev.publish("1.1.0")  # still signed by the revoked key, still in its (orphaned) role
    line = attacked(dev, "1.1.0", "tuf_unknown_target", metadata_kept=False)
    assert "its publisher's key was revoked" in line
    listing = ok(agent_cli("fn", "list", "--data-dir", dev.data))
    assert "echo 1.0.0 (active): not in the trusted TUF metadata" in listing
    rows = json.loads(ok(agent_cli("fn", "list", "--json", "--data-dir", dev.data)))
    assert rows[0]["tuf"]["not_in_metadata"] == ["1.0.0"]
    assert rows[0]["tuf"]["expired"] is False


def test_root_rotation_across_two_versions_is_followed(dev: Device) -> None:
    dev.repo.rotate_root()  # v2: new root keys, signed by v1's and v2's
    dev.repo.rotate_root(new_timestamp_key=True)  # v3: new again, and a new timestamp key
    dev.publish("1.1.0")  # its timestamp is signed by a key only root v3 names
    proc = dev.cli_install("1.1.0")
    assert "installed echo 1.1.0" in ok(proc)
    assert dev.active() == "1.1.0"
    history = sorted(p.name for p in (dev.data / "tuf" / "current" / "root_history").iterdir())
    assert history == ["1.root.json", "2.root.json", "3.root.json"]
    assert dev.leftovers() == []


def test_root_rotation_that_skips_the_intermediate_signatures_is_refused(dev: Device) -> None:
    dev.repo.rotate_root()
    dev.repo.rotate_root(sign_with_old=0)  # v3 signed only by its own keys, not v2's
    dev.publish("1.1.0")
    line = attacked(dev, "1.1.0", "tuf_unsigned")
    assert "root was signed by 0/1 keys" in line
