"""The repository's Ed25519 keys: where each lives, how it is made and loaded.

Layout under `<data_dir>/tuf/`::

    offline-keys/   0700  root-1.pem .. root-N.pem, targets.pem  (move off the host; bring back
                          only for `tuf rotate-root` / `add-publisher` / `revoke-publisher`)
    online-keys/    0700  snapshot.pem, timestamp.pem            (the running platform signs)

Every private key is PEM PKCS#8, file mode 0600, written atomically and never over an existing
file. The TUF key id is python-tuf's (sha256 over the key's canonical JSON), not the shorter
edgefn key id of `runtimes.signing`.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from securesystemslib.signer import CryptoSigner, SSlibKey

from cloud_sync.platform.tuf.errors import KeyMissing, TufError
from runtimes.fsio import atomic_write

OFFLINE_DIR = "offline-keys"
ONLINE_DIR = "online-keys"
MAX_KEY_FILE = 64 * 1024


def tuf_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "tuf"


def offline_dir(data_dir: Path) -> Path:
    return tuf_dir(data_dir) / OFFLINE_DIR


def online_dir(data_dir: Path) -> Path:
    return tuf_dir(data_dir) / ONLINE_DIR


def public_key(signer: CryptoSigner) -> SSlibKey:
    key = signer.public_key
    assert isinstance(key, SSlibKey)
    return key


def new_key(path: Path) -> CryptoSigner:
    """Make an Ed25519 key, store it at `path` (0600, directory 0700), return its signer."""
    if path.exists():
        raise TufError(f"{path} already exists: refusing to overwrite a key", code="tuf_key_exists")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    atomic_write(path, pem, 0o600)
    return CryptoSigner(private, SSlibKey.from_crypto(private.public_key()))


def load_signer(path: Path) -> CryptoSigner:
    """The signer for the private key at `path`; KeyMissing names the file when it is gone."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEY_FILE + 1)
    except FileNotFoundError:
        raise KeyMissing(
            f"{path} is missing: bring the offline keys back (--offline-keys DIR) for this step"
        ) from None
    except OSError as exc:
        raise KeyMissing(f"cannot read {path}: {exc.strerror}") from exc
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise TufError(f"{path}: not an unencrypted PEM private key", code="tuf_bad_key") from exc
    if not isinstance(private, Ed25519PrivateKey):
        raise TufError(f"{path}: not an Ed25519 key", code="tuf_bad_key")
    return CryptoSigner(private, SSlibKey.from_crypto(private.public_key()))


def load_public_pem(path: Path) -> SSlibKey:
    """A publisher's public key (`edge-cloud keys create` writes KEY.pub) as a TUF key."""
    try:
        data = Path(path).read_bytes()[:MAX_KEY_FILE]
        key = serialization.load_pem_public_key(data)
    except OSError as exc:
        raise TufError(f"cannot read {path}: {exc.strerror}", code="tuf_bad_key") from exc
    except ValueError as exc:
        raise TufError(f"{path}: not a PEM public key", code="tuf_bad_key") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise TufError(f"{path}: not an Ed25519 public key", code="tuf_bad_key")
    return SSlibKey.from_crypto(key)


def raw_public(key: SSlibKey) -> bytes:
    """The raw 32 public bytes of an Ed25519 TUF key (to match a bundle's publisher id)."""
    return bytes.fromhex(str(key.keyval["public"]))


def role_name(key: SSlibKey) -> str:
    """The delegated role a publisher key signs: `publisher-<first 16 hex of its TUF key id>`."""
    return f"publisher-{key.keyid[:16]}"
