"""Device side of the director (Uptane's director role): check a fleet instruction before use.

Every desired document the platform sends a device (retained MQTT message or HTTP fallback poll)
arrives wrapped in a signed envelope (docs/update-security.md, "Director")::

    {"signed": {"_type": "edgefn-director", "device": ID | "group": NAME, "counter": N,
                "issued": T, "expires": T, "document": {"version", "config"},
                "targets": {FN: {"version", "digest"}}},
     "signatures": [{"keyid": HEX, "sig": BASE64}]}

The signature is Ed25519 over `canonical(signed)` (sorted keys, no whitespace, UTF-8). The key
is the director public key the credentials file carries (`director_key`, PEM, written at
enrolment). `DirectorGate.check` answers the desired document inside, or raises
`InstructionRefused` with one stable code:

    instruction_unsigned      no envelope, but this device requires one
    instruction_malformed     an envelope that does not have the documented shape
    instruction_forged        no signature of the director key verifies
    instruction_wrong_device  signed for another device (or another group, or the other scope)
    instruction_expired       `expires` is in the past
    instruction_replayed      `counter` is lower than the last accepted one for this scope, or
                              equal with other content
    director_key_missing      `update_security = "tuf"` but the credentials carry no key

The same counter with the same content is the very instruction accepted before (a QoS 1
redelivery, the retained message on resubscribe, an HTTP poll): it passes, and the config
tracker finds nothing new in it. The accepted counters live in `<data_dir>/director-state.json`,
replaced atomically after the sync state is saved and before the message is acknowledged, so a
restart never reopens a replay (`commit`). Everything here but `commit`/`load` is pure.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from cloud_sync.errors import CloudSyncError, CredentialsError
from runtimes.fsio import atomic_write
from runtimes.setaside import set_aside

log = logging.getLogger("edgefn.director")

ENVELOPE_TYPE = "edgefn-director"
STATE_FILE = "director-state.json"
# Bounds on what we parse before the signature is checked: an instruction is a few kB.
MAX_SIGNATURES = 8

REFUSAL_CODES = frozenset(
    {
        "instruction_unsigned",
        "instruction_malformed",
        "instruction_forged",
        "instruction_wrong_device",
        "instruction_expired",
        "instruction_replayed",
        "director_key_missing",
    }
)


class InstructionRefused(CloudSyncError):
    """A fleet instruction this device must not obey; `code` is one of `REFUSAL_CODES`."""

    code = "instruction_refused"
    category = "auth"


def canonical(value: Any) -> bytes:
    """The bytes that are signed: sorted keys, no whitespace, UTF-8 (both sides use this)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def key_id(public: Ed25519PublicKey) -> str:
    """sha256 over the raw 32-byte public key, hex: which key signed (TUF's keyid idea)."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def load_public_key(pem: str) -> Ed25519PublicKey:
    """The director key from the credentials file; CloudSyncError when it is not Ed25519 PEM."""
    try:
        key = serialization.load_pem_public_key(pem.encode())
    except ValueError as exc:
        raise CloudSyncError(f"director_key is not a PEM public key ({exc})") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise CloudSyncError("director_key must be an Ed25519 public key")
    return key


def is_envelope(value: Any) -> bool:
    return isinstance(value, Mapping) and "signed" in value and "signatures" in value


def unverified_document(value: Any) -> Any:
    """The document inside an envelope WITHOUT checking it, for readers that only display or
    simulate (the fleet simulator); anything else comes back as it is."""
    if is_envelope(value) and isinstance(value["signed"], Mapping):
        return value["signed"].get("document")
    return value


@dataclass(frozen=True, slots=True)
class Instruction:
    """An instruction that passed every check; `commit` it once its document is in force."""

    scope: str  # "device" or "group:<name>"
    counter: int
    digest: str  # sha256 of canonical(signed): tells a redelivery from a replay
    document: Mapping[str, Any]
    targets: Mapping[str, Mapping[str, str]]
    expires: int


@dataclass(slots=True)
class DirectorGate:
    """Checks instructions for one device. `public_key` None: the credentials carry no key;
    then `required` (update_security "tuf") refuses everything, else documents pass unchecked
    (today's behaviour for devices enrolled before the director existed)."""

    device_id: str
    public_key: Ed25519PublicKey | None
    state_path: Path
    required: bool = True
    # The device's groups from enrolment: a group instruction for any other group is refused
    # (the HTTP fallback names the group in the answer, outside the signature's reach).
    groups: tuple[str, ...] = ()
    clock: Callable[[], float] = time.time
    accepted: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def enforcing(self) -> bool:
        return self.public_key is not None or self.required

    def load(self) -> None:
        """Read the accepted counters (blocking). A damaged file is set aside for the operator
        (`runtimes.setaside`) and the gate starts from zero, logged as an error: only someone
        who can already write the data dir can do that, and refusing every instruction forever
        would leave the device with no remote way back."""
        try:
            raw = self.state_path.read_bytes()
        except FileNotFoundError:
            return
        try:
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            self.accepted = {
                str(k): dict(v)
                for k, v in data.items()
                if isinstance(v, dict) and isinstance(v.get("counter"), int)
            }
        except (ValueError, UnicodeDecodeError) as exc:
            try:
                aside = set_aside(self.state_path)
            except OSError as err:
                aside = f"(not set aside: {err.strerror})"
            log.error("director: %s damaged (%s), kept as %s", self.state_path, exc, aside)

    def screen(
        self, scope: str, payload: Any, *, group: str | None = None
    ) -> tuple[Any, Instruction | None]:
        """`check` for what a transport delivered: bytes (MQTT) or a decoded value (HTTP).
        Bytes that are not JSON pass through untouched: the desired parser refuses them with
        its own code (`bad_desired_json`), and nothing in them can take effect."""
        value = payload
        if isinstance(payload, bytes | str):
            try:
                value = json.loads(payload)
            except (UnicodeDecodeError, ValueError):
                return payload, None
        return self.check(scope, value, group=group)

    def status(self) -> dict[str, Any]:
        """For the agent's health view: enforcing or not, and the last accepted counters."""
        return {
            "enforcing": self.enforcing,
            "key_id": key_id(self.public_key) if self.public_key is not None else None,
            "accepted": {
                scope: {"counter": v.get("counter"), "expires": v.get("expires")}
                for scope, v in sorted(self.accepted.items())
            },
        }

    def check(
        self, scope: str, payload: Any, *, group: str | None = None
    ) -> tuple[Mapping[str, Any] | Any, Instruction | None]:
        """(the desired document to offer, the instruction to commit after it is in force).

        `scope` is where it arrived ("device" or "group"); `group` the group topic's name."""
        if not self.enforcing:
            return unverified_document(payload), None
        if self.public_key is None:
            raise InstructionRefused(
                'update_security is "tuf" but the credentials carry no director_key: add '
                "the platform's director public key to them (docs/update-security.md)",
                code="director_key_missing",
            )
        if not is_envelope(payload):
            raise InstructionRefused(
                f"{scope} desired document is not signed by the director",
                code="instruction_unsigned",
            )
        signed, signatures = _shape(payload)
        blob = canonical(signed)
        if not self._verified(blob, signatures):
            raise InstructionRefused(
                f"{scope} instruction: no valid director signature", code="instruction_forged"
            )
        key = "device" if scope == "device" else f"group:{group}"
        want = ("device", self.device_id) if scope == "device" else ("group", group)
        other = "group" if scope == "device" else "device"
        foreign = scope != "device" and group not in self.groups
        if signed.get(want[0]) != want[1] or other in signed or foreign:
            named = signed.get("device") or f"group {signed.get('group')}"
            raise InstructionRefused(
                f"{scope} instruction is signed for {named}, not {want[0]} {want[1]}",
                code="instruction_wrong_device",
            )
        now = self.clock()
        if signed["expires"] <= now:
            raise InstructionRefused(
                f"{scope} instruction {signed['counter']} expired at {signed['expires']} "
                f"(now {int(now)})",
                code="instruction_expired",
            )
        digest = hashlib.sha256(blob).hexdigest()
        last = self.accepted.get(key)
        if last is not None:
            last_counter = int(last["counter"])
            same = last_counter == signed["counter"] and last.get("digest") == digest
            if signed["counter"] < last_counter or (signed["counter"] == last_counter and not same):
                raise InstructionRefused(
                    f"{scope} instruction {signed['counter']} replayed: counter "
                    f"{last_counter} was accepted already",
                    code="instruction_replayed",
                )
        return signed["document"], Instruction(
            key, signed["counter"], digest, signed["document"], signed["targets"],
            signed["expires"],
        )  # fmt: skip

    def _verified(self, blob: bytes, signatures: list[Mapping[str, Any]]) -> bool:
        assert self.public_key is not None
        mine = key_id(self.public_key)
        for entry in signatures:
            if entry.get("keyid") != mine:
                continue
            try:
                sig = base64.b64decode(str(entry.get("sig", "")), validate=True)
                self.public_key.verify(sig, blob)
            except (InvalidSignature, binascii.Error, ValueError):
                continue
            return True
        return False

    def remember(self, instruction: Instruction) -> bool:
        """Take the instruction as accepted, in memory only (the fleet simulator); False when
        a newer one was accepted meanwhile, or this one already. Counters only grow."""
        last = self.accepted.get(instruction.scope)
        if last is not None and int(last["counter"]) > instruction.counter:
            return False
        if last is not None and last.get("digest") == instruction.digest:
            return False  # the very instruction again (HTTP poll, redelivery): nothing to write
        self.accepted[instruction.scope] = {
            "counter": instruction.counter,
            "digest": instruction.digest,
            "expires": instruction.expires,
            "targets": dict(instruction.targets),
        }
        return True

    def commit(self, instruction: Instruction) -> None:
        """`remember`, then persist every accepted counter (blocking; atomic replace)."""
        if self.remember(instruction):
            atomic_write(self.state_path, canonical(self.accepted), mode=0o600)

    def expected_digest(self, function: str, version: str) -> str | None:
        """The bundle sha256 (hex) the accepted instructions name for function@version, for
        the TUF check (the target the registry's metadata names must be this one); None when
        no accepted instruction names it. The device's own instruction wins over a group's."""
        scopes = sorted(self.accepted, key=lambda s: s != "device")
        for scope in scopes:
            target = (self.accepted[scope].get("targets") or {}).get(function)
            if isinstance(target, dict) and target.get("version") == version:
                digest = target.get("digest")
                return str(digest) if digest else None
        return None


def _shape(payload: Mapping[str, Any]) -> tuple[dict[str, Any], list[Mapping[str, Any]]]:
    """The envelope's fields with their types checked, or instruction_malformed."""
    signed, signatures = payload.get("signed"), payload.get("signatures")
    problems = []
    if not isinstance(signed, dict):
        problems.append("signed must be an object")
        signed = {}
    if (
        not isinstance(signatures, list)
        or not 0 < len(signatures) <= MAX_SIGNATURES
        or not all(isinstance(s, Mapping) for s in signatures)
    ):
        problems.append(f"signatures must be a list of 1..{MAX_SIGNATURES} objects")
    if signed.get("_type") != ENVELOPE_TYPE:
        problems.append(f"signed._type must be {ENVELOPE_TYPE!r}")
    for name in ("counter", "issued", "expires"):
        value = signed.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            problems.append(f"signed.{name} must be an integer >= 0")
    if not isinstance(signed.get("document"), dict):
        problems.append("signed.document must be an object")
    targets = signed.get("targets", {})
    if not isinstance(targets, dict) or not all(
        isinstance(t, dict) and isinstance(t.get("digest"), str) for t in targets.values()
    ):
        problems.append("signed.targets must map functions to {version, digest}")
    if problems:
        raise InstructionRefused(
            "director instruction malformed: " + "; ".join(problems),
            code="instruction_malformed",
        )
    signed.setdefault("targets", {})
    assert isinstance(signatures, list)
    return signed, signatures


def director_gate(
    device_id: str,
    key_pem: str,
    data_dir: Path,
    *,
    required: bool,
    groups: tuple[str, ...] = (),
) -> DirectorGate:
    """The gate for one agent: the credentials' `director_key` ("" when they carry none) and
    whether `update_security = "tuf"` requires one. A key that does not load is a
    CredentialsError (the agent refuses to start: the file is damaged)."""
    try:
        public = load_public_key(key_pem) if key_pem else None
    except CloudSyncError as exc:
        raise CredentialsError(f"credentials: {exc.message}") from exc
    return DirectorGate(
        device_id, public, Path(data_dir) / STATE_FILE, required=required, groups=tuple(groups)
    )
