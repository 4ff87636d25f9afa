"""Secrets, the parts on each side: sealed boxes, the stores, and `secret()` through a real agent.

Real files, real SQLite, real Node workers (the conformance function's `blocks` op); the whole
loop through a platform, Mosquitto and an agent process is tests/test_secrets_e2e.py.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from cloud_sync.platform.secret_store import KEY_FILE, SecretStore, load_or_create_key
from cloud_sync.sealbox import SealError, device_aad, open_box, platform_aad, seal
from edge_agent import secret_store
from edge_agent.agent import Agent
from edge_agent.settings import Settings
from runtimes.sandbox import Sandbox
from tests.test_building_blocks import blocks, make_fn, run

VALUE = b"clear-value-0123456789"


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _sealed(key: ec.EllipticCurvePrivateKey, name: str, version: int, value: bytes) -> object:
    box = seal(key.public_key(), value, device_aad("edge-01", name, version))
    return secret_store.SealedSecret(name, version, box)


# ---- sealed boxes ---------------------------------------------------------------------------


def test_a_box_opens_only_with_its_key_and_its_associated_data() -> None:
    key = _key()
    box = seal(key.public_key(), VALUE, device_aad("edge-01", "api-key", 3))
    assert VALUE not in json.dumps(box).encode()
    assert open_box(key, box, device_aad("edge-01", "api-key", 3)) == VALUE
    for aad in (
        device_aad("edge-02", "api-key", 3),  # another device
        device_aad("edge-01", "other", 3),  # another secret
        device_aad("edge-01", "api-key", 2),  # an older version
    ):
        with pytest.raises(SealError):
            open_box(key, box, aad)
    with pytest.raises(SealError):
        open_box(_key(), box, device_aad("edge-01", "api-key", 3))
    altered = dict(box, ct=box["ct"][:-4] + ("AAAA" if box["ct"][-4:] != "AAAA" else "BBBB"))
    with pytest.raises(SealError):
        open_box(key, altered, device_aad("edge-01", "api-key", 3))
    # Two boxes of the same value differ (fresh ephemeral key and nonce each time).
    assert seal(key.public_key(), VALUE, b"x")["ct"] != seal(key.public_key(), VALUE, b"x")["ct"]


# ---- the agent's store at rest --------------------------------------------------------------


def test_the_agent_store_is_sealed_at_rest_0600_and_survives_a_reload(tmp_path: Path) -> None:
    key = _key()
    path = tmp_path / secret_store.FILE_NAME
    store = secret_store.SecretStore(path, "edge-01", key)
    store.replace([_sealed(key, "api-key", 1, VALUE)])  # type: ignore[list-item]
    assert store.get("api-key") == VALUE
    raw = path.read_bytes()
    assert VALUE not in raw and b"clear-value" not in raw
    assert path.stat().st_mode & 0o777 == 0o600
    again = secret_store.SecretStore(path, "edge-01", key)
    again.load()
    assert again.get("api-key") == VALUE and again.versions() == {"api-key": 1}
    # A box that does not open (sealed to another key) changes nothing, file or memory.
    with pytest.raises(SealError):
        again.replace([_sealed(_key(), "api-key", 2, b"other")])  # type: ignore[list-item]
    assert again.get("api-key") == VALUE and path.read_bytes() == raw


@pytest.mark.parametrize(
    "damage",
    [b"{not json", b'{"format": 1, "device_id": "edge-01", "secrets": []}', b"", b"\x00" * 64],
)
def test_a_damaged_secrets_file_is_set_aside_not_fatal(tmp_path: Path, damage: bytes) -> None:
    path = tmp_path / secret_store.FILE_NAME
    path.write_bytes(damage)
    store = secret_store.SecretStore(path, "edge-01", _key())
    store.load()
    assert store.versions() == {} and store.get("api-key") is None
    assert store.set_aside and (tmp_path / store.set_aside).read_bytes() == damage
    assert not path.exists()


def test_a_file_of_another_device_or_key_is_set_aside(tmp_path: Path) -> None:
    key = _key()
    path = tmp_path / secret_store.FILE_NAME
    secret_store.SecretStore(path, "edge-01", key).replace(
        [_sealed(key, "api-key", 1, VALUE)]  # type: ignore[list-item]
    )
    other = secret_store.SecretStore(path, "edge-01", _key())  # the device was re-enrolled
    other.load()
    assert other.versions() == {} and other.set_aside


# ---- the platform's store -------------------------------------------------------------------


def test_platform_store_versions_grow_per_name_and_a_device_value_wins(tmp_path: Path) -> None:
    store = SecretStore(tmp_path / "secrets.db")
    try:
        assert store.set("api-key", "group", "north", {"b": "1"}, 5) == 1
        assert store.set("api-key", "device", "edge-01", {"b": "2"}, 5) == 2
        assert store.set("api-key", "group", "north", {"b": "3"}, 5) == 3
        assert store.set("other", "group", "north", {"b": "4"}, 1) == 1
        mine = store.for_device("edge-01", ["north"])
        assert {n: (r.scope, r.version) for n, r in mine.items()} == {
            "api-key": ("device", 2),
            "other": ("group", 1),
        }
        theirs = store.for_device("edge-02", ["north"])
        assert theirs["api-key"].version == 3
        listing = [r.listing() for r in store.rows()]
        assert all("sealed" not in r and "box" not in r for r in listing)
        store.ack("edge-01", {"api-key": 2})
        store.ack("edge-01", {"api-key": 2, "other": 1})
        assert store.acks() == {"api-key": {"edge-01": 2}, "other": {"edge-01": 1}}
    finally:
        store.close()


def test_the_platform_key_is_made_once_with_mode_0600(tmp_path: Path) -> None:
    first = load_or_create_key(tmp_path)
    assert (tmp_path / KEY_FILE).stat().st_mode & 0o777 == 0o600
    again = load_or_create_key(tmp_path)
    box = seal(first.public_key(), VALUE, platform_aad("device", "edge-01", "api-key"))
    assert open_box(again, box, platform_aad("device", "edge-01", "api-key")) == VALUE


# ---- secret() through a real agent and real Node workers ------------------------------------


async def test_secret_reaches_only_functions_that_name_it_and_rotation_needs_no_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    agent = Agent(Settings(data_dir=tmp_path / "d", port=0))
    make_fn(agent.settings.data_dir, "reader", permissions='secrets = ["api-key"]')
    make_fn(agent.settings.data_dir, "nosy", permissions='secrets = ["other"]')
    await agent.open(sandbox=Sandbox())
    try:
        await agent.functions.sync()
        key = _key()
        store = secret_store.SecretStore(
            agent.settings.data_dir / secret_store.FILE_NAME, "edge-01", key
        )
        agent.secrets = store  # what _start_secrets does for an agent joined to a platform
        call = blocks({"op": "secret", "target": "api-key"})
        [res] = await run(agent, "reader", call)
        assert res["code"] == "not_found"  # not delivered yet
        store.replace([_sealed(key, "api-key", 1, VALUE)])  # type: ignore[list-item]
        [res] = await run(agent, "reader", call)
        assert res == {"value": VALUE.decode()}
        pids = agent.functions.loaded["reader"].executor.status()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="edgefn.capabilities"):
            [res] = await run(agent, "nosy", call, request_id="req-nosy-7")
        assert res["code"] == "not_permitted"
        refusal = [r for r in caplog.records if "refused secret" in r.getMessage()]
        assert refusal and "nosy@1.0.0" in refusal[0].getMessage()
        assert getattr(refusal[0], "request_id", None) == "req-nosy-7"
        assert all(VALUE.decode() not in r.getMessage() for r in caplog.records)
        # Rotation: the same workers answer the new value on their next call.
        store.replace([_sealed(key, "api-key", 2, b"rotated-value")])  # type: ignore[list-item]
        for i in range(5):
            [res] = await run(agent, "reader", call, request_id=f"after-{i}")
            assert res == {"value": "rotated-value"}
        after = agent.functions.loaded["reader"].executor.status()
        assert [w.pid for w in after.workers] == [w.pid for w in pids.workers]  # type: ignore[attr-defined]
    finally:
        await agent.stop()
