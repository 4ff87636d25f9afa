"""The director's two halves on real files: the platform signs (`cloud_sync.platform.director`,
its key and its SQLite counters in a data dir), the device checks (`cloud_sync.director_check`,
its counters in a state file). No network: the end-to-end attacks are in test_director_e2e.py."""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud_sync.director_check import (
    STATE_FILE,
    DirectorGate,
    InstructionRefused,
    canonical,
    director_gate,
    key_id,
    unverified_document,
)
from cloud_sync.errors import CredentialsError
from cloud_sync.platform.director import (
    DEFAULT_TTL_S,
    Director,
    DirectorError,
    ensure_director_key,
    key_path,
    public_pem,
)

DOC = {"version": 3, "config": {"functions": {"echo": {"version": "1.2.0"}}}}
DIGESTS = {("echo", "1.2.0"): "ab" * 32, ("echo", "1.1.0"): "cd" * 32}


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def director(tmp_path: Path, clock: Clock) -> Iterator[Director]:
    d = Director(tmp_path / "plat", lambda n, v: DIGESTS.get((n, v)), clock=clock)
    yield d
    d.close()


def gate(tmp_path: Path, director: Director, clock: Clock, device: str = "dev-a") -> DirectorGate:
    g = director_gate(
        device, director.public_pem, tmp_path / device, required=True, groups=("west",)
    )
    g.clock = clock
    g.load()
    return g


def resign(env: dict[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """What an attacker with their own key (or the stolen one, for the expiry case) sends."""
    sig = base64.b64encode(key.sign(canonical(env["signed"]))).decode()
    return {
        "signed": env["signed"],
        "signatures": [{"keyid": key_id(key.public_key()), "sig": sig}],
    }


def refused(g: DirectorGate, payload: Any, code: str, scope: str = "device") -> str:
    with pytest.raises(InstructionRefused) as info:
        g.screen(scope, json.dumps(payload).encode(), group="west")
    assert info.value.code == code, info.value.message
    return info.value.message


# ---- the platform signs --------------------------------------------------------------------


def test_the_key_is_created_once_private_and_never_replaced(tmp_path: Path) -> None:
    path = ensure_director_key(tmp_path)
    assert path == key_path(tmp_path)
    assert path.stat().st_mode & 0o777 == 0o600
    before = path.read_bytes()
    assert ensure_director_key(tmp_path) == path and path.read_bytes() == before
    assert public_pem(tmp_path).startswith("-----BEGIN PUBLIC KEY-----")


def test_envelopes_name_device_counter_expiry_and_bundle_digests(
    director: Director, clock: Clock
) -> None:
    env = director.for_device("dev-a", DOC)
    signed = env["signed"]
    assert signed["device"] == "dev-a" and signed["counter"] == 1 and "group" not in signed
    assert signed["issued"] == int(clock.now)
    assert signed["expires"] == int(clock.now) + DEFAULT_TTL_S
    assert signed["document"] == DOC
    assert signed["targets"] == {"echo": {"version": "1.2.0", "digest": "ab" * 32}}
    (sig,) = env["signatures"]
    director.key.public_key().verify(base64.b64decode(sig["sig"]), canonical(signed))
    assert sig["keyid"] == director.key_id
    # Same document, still fresh: byte-identical (a republish is a redelivery, not a replay).
    assert director.for_device("dev-a", DOC) == env
    # A new document: the next counter. Another device counts on its own.
    doc2 = {"version": 4, "config": {"functions": {"echo": {"version": "1.1.0"}}}}
    assert director.for_device("dev-a", doc2)["signed"]["counter"] == 2
    assert director.for_device("dev-b", doc2)["signed"]["counter"] == 1
    group = director.for_group("west", doc2)["signed"]
    assert group["group"] == "west" and "device" not in group and group["counter"] == 1


def test_counters_survive_a_restart_of_the_platform(tmp_path: Path, clock: Clock) -> None:
    lookup = lambda n, v: DIGESTS.get((n, v))  # noqa: E731
    first = Director(tmp_path, lookup, clock=clock)
    try:
        assert first.for_device("dev-a", DOC)["signed"]["counter"] == 1
        assert first.for_device("dev-a", {"version": 4, "config": {}})["signed"]["counter"] == 2
    finally:
        first.close()
    again = Director(tmp_path, lookup, clock=clock)
    try:
        assert again.key_id == first.key_id  # the same key, read back
        assert again.for_device("dev-a", {"version": 5, "config": {}})["signed"]["counter"] == 3
    finally:
        again.close()


def test_instructions_past_half_their_life_are_due_and_reissued(
    director: Director, clock: Clock
) -> None:
    env = director.for_device("dev-a", DOC)
    assert director.due() == []
    clock.now += DEFAULT_TTL_S * 0.6
    assert director.due() == [("device", "dev-a")]
    renewed = director.for_device("dev-a", DOC)
    assert renewed["signed"]["counter"] == 2
    assert renewed["signed"]["expires"] > env["signed"]["expires"]
    assert director.due() == []


def test_a_ttl_under_a_minute_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DirectorError) as info:
        Director(tmp_path, lambda n, v: None, ttl_s=5)
    assert info.value.code == "bad_director_ttl"


# ---- the device checks ---------------------------------------------------------------------


def test_a_valid_instruction_passes_and_its_counter_is_kept_across_restarts(
    tmp_path: Path, director: Director, clock: Clock
) -> None:
    g = gate(tmp_path, director, clock)
    env = director.for_device("dev-a", DOC)
    doc, instruction = g.screen("device", json.dumps(env).encode())
    assert doc == DOC and instruction is not None and instruction.counter == 1
    g.commit(instruction)
    assert g.expected_digest("echo", "1.2.0") == "ab" * 32
    assert g.expected_digest("echo", "9.9.9") is None
    state = tmp_path / "dev-a" / STATE_FILE
    assert state.stat().st_mode & 0o777 == 0o600
    written = state.stat().st_mtime_ns, state.stat().st_ino
    # The same instruction again (QoS 1 redelivery, retained on resubscribe): it passes, and
    # nothing is rewritten (an HTTP poll every few seconds must not wear the flash).
    doc, redelivered = g.screen("device", env)
    assert doc == DOC and redelivered is not None
    g.commit(redelivered)
    assert (state.stat().st_mtime_ns, state.stat().st_ino) == written
    newer = director.for_device("dev-a", {"version": 4, "config": {}})
    g.commit(g.screen("device", newer)[1])  # type: ignore[arg-type]
    # A restarted agent reads the counters back: the old one is a replay now.
    again = gate(tmp_path, director, clock)
    assert again.expected_digest("echo", "1.2.0") is None  # the newer one names no version
    refused(again, env, "instruction_replayed")


def test_forged_tampered_and_unsigned_instructions_are_refused(
    tmp_path: Path, director: Director, clock: Clock
) -> None:
    g = gate(tmp_path, director, clock)
    env = director.for_device("dev-a", DOC)
    attacker = Ed25519PrivateKey.generate()
    refused(g, resign(env, attacker), "instruction_forged")
    tampered = copy.deepcopy(env)
    tampered["signed"]["document"]["config"]["functions"]["echo"]["version"] = "0.1.0"
    refused(g, tampered, "instruction_forged")
    # The attacker's signature under the director's key id: still forged.
    wrong = resign(env, attacker)
    wrong["signatures"][0]["keyid"] = director.key_id
    refused(g, wrong, "instruction_forged")
    refused(g, DOC, "instruction_unsigned")
    bad = copy.deepcopy(env)
    bad["signed"]["counter"] = "7"
    assert "counter" in refused(g, bad, "instruction_malformed")
    refused(g, {"signed": env["signed"], "signatures": []}, "instruction_malformed")
    assert g.accepted == {}  # nothing accepted, nothing written
    assert not (tmp_path / "dev-a" / STATE_FILE).exists()


def test_wrong_device_wrong_group_and_wrong_scope_are_refused(
    tmp_path: Path, director: Director, clock: Clock
) -> None:
    g = gate(tmp_path, director, clock)
    refused(g, director.for_device("dev-b", DOC), "instruction_wrong_device")
    refused(g, director.for_group("east", DOC), "instruction_wrong_device", scope="group")
    # Genuine for "east", and the (unsigned) HTTP answer names "east": not one of our groups.
    with pytest.raises(InstructionRefused) as info:
        g.screen("group", director.for_group("east", DOC), group="east")
    assert info.value.code == "instruction_wrong_device"
    # A group's instruction on the device topic (and the other way round).
    refused(g, director.for_group("west", DOC), "instruction_wrong_device")
    refused(g, director.for_device("dev-a", DOC), "instruction_wrong_device", scope="group")
    doc, instruction = g.screen("group", director.for_group("west", DOC), group="west")
    assert doc == DOC and instruction is not None and instruction.scope == "group:west"


def test_expired_and_replayed_instructions_are_refused(
    tmp_path: Path, director: Director, clock: Clock
) -> None:
    g = gate(tmp_path, director, clock)
    old = director.for_device("dev-a", DOC)
    new = director.for_device("dev-a", {"version": 4, "config": {}})
    g.commit(g.screen("device", new)[1])  # type: ignore[arg-type]
    assert "counter 2 was accepted" in refused(g, old, "instruction_replayed")
    # The same counter with other content: a replay too (never two documents under one).
    same_counter = copy.deepcopy(old)
    same_counter["signed"]["counter"] = 2
    refused(g, resign(same_counter, director.key), "instruction_replayed")
    clock.now += DEFAULT_TTL_S + 1
    refused(g, new, "instruction_expired")


def test_without_a_director_key_only_the_config_decides(tmp_path: Path, director: Director) -> None:
    lenient = director_gate("dev-a", "", tmp_path, required=False)
    assert lenient.screen("device", DOC) == (DOC, None)
    env = director.for_device("dev-b", DOC)  # cannot be checked: the document is used as is
    assert lenient.screen("device", env) == (DOC, None)
    strict = director_gate("dev-a", "", tmp_path, required=True)
    refused(strict, DOC, "director_key_missing")
    with pytest.raises(CredentialsError):
        director_gate("dev-a", "-----BEGIN PUBLIC KEY-----\nnope\n", tmp_path, required=True)


def test_a_damaged_counter_file_is_set_aside(
    tmp_path: Path, director: Director, clock: Clock
) -> None:
    (tmp_path / "dev-a").mkdir()
    (tmp_path / "dev-a" / STATE_FILE).write_text("{torn")
    g = gate(tmp_path, director, clock)
    assert g.accepted == {}
    assert any(p.name.startswith(STATE_FILE + ".corrupt-") for p in (tmp_path / "dev-a").iterdir())
    assert not (tmp_path / "dev-a" / STATE_FILE).exists()


def test_unverified_document_only_unwraps() -> None:
    env = {"signed": {"document": DOC}, "signatures": []}
    assert unverified_document(env) == DOC
    assert unverified_document(DOC) == DOC
    assert unverified_document(None) is None
