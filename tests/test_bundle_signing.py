"""Key files: created with the right modes and never overwritten; loading fails clearly."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PrivateKey

from runtimes.errors import BundleError
from runtimes.signing import (
    create_keypair,
    key_id,
    load_private_key,
    load_public_key,
    public_key_from_pem,
    raw_public_bytes,
)
from runtimes.verify import Ed25519Verifier


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_create_and_load(tmp_path: Path) -> None:
    old = os.umask(0)  # a permissive umask must not leak into the private key's mode
    try:
        kf = create_keypair(tmp_path / "signing.key")
    finally:
        os.umask(old)
    assert kf.public == tmp_path / "signing.key.pub"
    assert mode(kf.private) == 0o600
    assert mode(kf.public) == 0o644
    assert kf.private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert kf.public.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")

    priv = load_private_key(kf.private)
    pub = load_public_key(kf.public)
    assert raw_public_bytes(priv) == raw_public_bytes(pub)
    assert key_id(pub) == kf.key_id == hashlib.sha256(raw_public_bytes(pub)).hexdigest()[:16]
    assert Ed25519Verifier.from_files([kf.public]).key_ids == (kf.key_id,)


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    kf = create_keypair(tmp_path / "k")
    before = (kf.private.read_bytes(), kf.public.read_bytes())
    with pytest.raises(BundleError) as exc:
        create_keypair(tmp_path / "k")
    assert exc.value.code == "key_exists"
    assert (kf.private.read_bytes(), kf.public.read_bytes()) == before


def test_refuses_when_only_the_public_half_exists(tmp_path: Path) -> None:
    (tmp_path / "k.pub").write_bytes(b"someone else's key")
    with pytest.raises(BundleError) as exc:
        create_keypair(tmp_path / "k")
    assert exc.value.code == "key_exists"
    assert not (tmp_path / "k").exists()  # no private key without its public half
    assert (tmp_path / "k.pub").read_bytes() == b"someone else's key"


def test_refuses_a_planted_symlink(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    (tmp_path / "k").symlink_to(target)
    with pytest.raises(BundleError) as exc:
        create_keypair(tmp_path / "k")
    assert exc.value.code == "key_exists"
    assert not target.exists()


def test_encrypted_key(tmp_path: Path) -> None:
    kf = create_keypair(tmp_path / "k", password=b"correct horse")
    assert b"ENCRYPTED" in kf.private.read_bytes()
    assert key_id(load_private_key(kf.private, password=b"correct horse")) == kf.key_id
    for pw in (None, b"wrong"):
        with pytest.raises(BundleError) as exc:
            load_private_key(kf.private, password=pw)
        assert exc.value.code == "bad_key"


def test_loose_permissions_refused(tmp_path: Path) -> None:
    kf = create_keypair(tmp_path / "k")
    os.chmod(kf.private, 0o644)
    with pytest.raises(BundleError) as exc:
        load_private_key(kf.private)
    assert exc.value.code == "bad_key"
    assert "chmod 600" in exc.value.message
    assert key_id(load_private_key(kf.private, allow_loose_permissions=True)) == kf.key_id


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not a key at all",
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        b"x" * 100_000,
    ],
)
def test_corrupt_private_key(tmp_path: Path, content: bytes) -> None:
    p = tmp_path / "k"
    p.write_bytes(content)
    os.chmod(p, 0o600)
    with pytest.raises(BundleError) as exc:
        load_private_key(p)
    assert exc.value.code == "bad_key"
    assert str(p) in exc.value.message


def test_wrong_key_type(tmp_path: Path) -> None:
    other = Ed448PrivateKey.generate()
    p = tmp_path / "ed448"
    p.write_bytes(
        other.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    os.chmod(p, 0o600)
    with pytest.raises(BundleError) as exc:
        load_private_key(p)
    assert exc.value.code == "bad_key" and "Ed25519" in exc.value.message
    pem = other.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(BundleError) as exc:
        public_key_from_pem(pem)
    assert exc.value.code == "bad_key"


def test_private_key_is_not_a_public_key(tmp_path: Path) -> None:
    kf = create_keypair(tmp_path / "k")
    with pytest.raises(BundleError) as exc:
        load_public_key(kf.private)
    assert exc.value.code == "bad_key"
    with pytest.raises(BundleError) as exc:
        load_public_key(tmp_path / "missing.pub")
    assert exc.value.code == "bad_key"


def test_verifier_needs_keys() -> None:
    with pytest.raises(ValueError):
        Ed25519Verifier([])
