"""Ed25519 key files for signing bundles: create, load, and name keys by a short id.

Files: the private key is PEM PKCS#8 (optionally encrypted with a passphrase), created mode 0600
with O_EXCL so an existing key is never overwritten; the public key sits beside it as `<file>.pub`,
PEM SubjectPublicKeyInfo (the format `openssl pkey -pubin` reads, and self-describing, so a wrong
key type is caught on load rather than at the first failed signature).

A key id is the first 16 hex digits of sha256 over the raw 32-byte public key. It only selects
which trusted key to try; a signature is always checked against the full key.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from runtimes.errors import BundleError

PUBLIC_SUFFIX = ".pub"
KEY_ID_HEX = 16
MAX_KEY_FILE = 64 * 1024  # a PEM Ed25519 key is ~120 bytes; anything big is not a key file


@dataclass(frozen=True, slots=True)
class KeyFiles:
    private: Path
    public: Path
    key_id: str


def raw_public_bytes(key: Ed25519PublicKey | Ed25519PrivateKey) -> bytes:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """Short, stable name of a key: first 16 hex of sha256(raw public key bytes)."""
    return hashlib.sha256(raw_public_bytes(key)).hexdigest()[:KEY_ID_HEX]


def public_key_to_pem(key: Ed25519PublicKey | Ed25519PrivateKey) -> bytes:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _write_new(path: Path, data: bytes, mode: int) -> None:
    # O_EXCL: never replace a key; O_NOFOLLOW: never write through a planted symlink.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have removed bits, never added: set it exactly
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def create_keypair(out: Path, *, password: bytes | None = None) -> KeyFiles:
    """Create a new signing key at `out` (0600) and its public key at `out.pub` (0644).

    Refuses when either file exists, so a key in use is never lost. A missing directory is made
    (0700: it holds a private key). Pass `password` to encrypt the private key (a CI secret
    store usually makes that unnecessary).
    """
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    except (FileExistsError, NotADirectoryError):
        raise BundleError(
            f"{out.parent}: cannot make this directory for the key: a file is in the way",
            code="key_dir_blocked",
        ) from None
    pub_path = out.with_name(out.name + PUBLIC_SUFFIX)
    for p in (out, pub_path):
        if os.path.lexists(p):
            raise BundleError(
                f"{p}: already exists; refusing to overwrite a key", code="key_exists"
            )
    key = Ed25519PrivateKey.generate()
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    try:
        _write_new(out, pem, 0o600)
    except FileExistsError:
        raise BundleError(
            f"{out}: already exists; refusing to overwrite a key", code="key_exists"
        ) from None
    try:
        _write_new(pub_path, public_key_to_pem(key), 0o644)
    except BaseException as exc:
        out.unlink()  # no private key without its public half
        if isinstance(exc, FileExistsError):
            raise BundleError(
                f"{pub_path}: already exists; refusing to overwrite a key", code="key_exists"
            ) from None
        raise
    return KeyFiles(private=out, public=pub_path, key_id=key_id(key))


def _read_key_file(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEY_FILE + 1)
    except OSError as exc:
        raise BundleError(f"{path}: cannot read key file: {exc}", code="bad_key") from exc
    if len(data) > MAX_KEY_FILE:
        raise BundleError(f"{path}: too large to be a key file", code="bad_key")
    return data


def load_private_key(
    path: Path, *, password: bytes | None = None, allow_loose_permissions: bool = False
) -> Ed25519PrivateKey:
    """Load a signing key written by `create_keypair` (or `openssl genpkey -algorithm ed25519`).

    Refuses a key file that group or others may read, like ssh does: a leaked signing key lets
    anyone publish functions to every device that trusts it.
    """
    path = Path(path)
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError as exc:
        raise BundleError(f"{path}: cannot read key file: {exc}", code="bad_key") from exc
    if mode & 0o077 and not allow_loose_permissions:
        raise BundleError(
            f"{path}: private key is readable by others (mode {mode:04o}); chmod 600 it",
            code="bad_key",
        )
    data = _read_key_file(path)
    try:
        key = serialization.load_pem_private_key(data, password=password)
    except TypeError as exc:  # encrypted without password, or password for a plain key
        raise BundleError(f"{path}: {exc}", code="bad_key") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise BundleError(
            f"{path}: not a PEM private key (or wrong passphrase): {exc}", code="bad_key"
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError(
            f"{path}: key type is {type(key).__name__}, expected Ed25519", code="bad_key"
        )
    return key


def public_key_from_pem(data: bytes, where: str = "public key") -> Ed25519PublicKey:
    """Parse a PEM public key (e.g. a trusted key embedded in the agent's config)."""
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise BundleError(f"{where}: not a PEM public key: {exc}", code="bad_key") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError(
            f"{where}: key type is {type(key).__name__}, expected Ed25519", code="bad_key"
        )
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Load a `.pub` file written by `create_keypair`."""
    path = Path(path)
    return public_key_from_pem(_read_key_file(path), str(path))
