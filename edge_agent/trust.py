"""Which publishers this device trusts: Ed25519 public keys in `DATA_DIR/trust/`.

One file per key, `trust/<key id>.pub` (PEM SubjectPublicKeyInfo, as `edge-cloud keys create`
writes next to the private key). `edge-agent trust add PUBFILE` validates the key and stores it
under its id, so adding the same key twice is harmless and a file name can never disagree with
the key inside. `load_verifier` is what the installer calls: every bundle must be signed by one
of these keys (`runtimes.verify.Ed25519Verifier`), and no keys means nothing can be installed.

Only someone who can write the data dir can change trust; the agent itself never adds keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from runtimes.errors import BundleError
from runtimes.signing import key_id, load_public_key, public_key_to_pem
from runtimes.verify import Ed25519Verifier, Verifier

TRUST_DIR = "trust"
KEY_SUFFIX = ".pub"


@dataclass(frozen=True, slots=True)
class TrustedKey:
    key_id: str
    path: Path


def trust_dir(data_dir: Path) -> Path:
    return Path(data_dir) / TRUST_DIR


def add_key(data_dir: Path, pubfile: Path) -> tuple[TrustedKey, bool]:
    """Trust the public key in `pubfile`; returns the stored key and whether it is new."""
    from runtimes.fsio import atomic_write

    key = load_public_key(Path(pubfile))  # refuses anything but an Ed25519 PEM public key
    kid = key_id(key)
    directory = trust_dir(data_dir)
    directory.mkdir(parents=True, exist_ok=True)
    dest = directory / f"{kid}{KEY_SUFFIX}"
    new = not dest.exists()
    atomic_write(dest, public_key_to_pem(key), 0o644)
    return TrustedKey(kid, dest), new


def list_keys(data_dir: Path) -> list[TrustedKey]:
    """Trusted keys, by key id. Raises BundleError when a file there is not a valid key."""
    directory = trust_dir(data_dir)
    if not directory.is_dir():
        return []
    keys = []
    for path in sorted(directory.glob(f"*{KEY_SUFFIX}")):
        keys.append(TrustedKey(key_id(load_public_key(path)), path))
    return keys


def remove_key(data_dir: Path, kid: str) -> Path:
    for k in list_keys(data_dir):
        if k.key_id == kid:
            k.path.unlink()
            return k.path
    raise BundleError(f"no trusted key {kid} in {trust_dir(data_dir)}", code="unknown_signer")


def set_aside_damaged(data_dir: Path) -> list[str]:
    """Move key files that are not valid keys out of the way; return what was set aside.

    A damaged file must not stop every install (one unreadable key would otherwise refuse all
    bundles). Setting it aside never widens trust: a key nobody can read verified nothing.
    The copy (`<id>.pub.corrupt-<stamp>`, `runtimes.setaside`) stays for the operator, and
    its name no longer ends in `.pub`, so it is not read again.
    """
    import logging

    from runtimes.setaside import set_aside

    directory = trust_dir(data_dir)
    if not directory.is_dir():
        return []
    moved = []
    for path in sorted(directory.glob(f"*{KEY_SUFFIX}")):
        try:
            load_public_key(path)
        except BundleError as exc:
            aside = set_aside(path)
            logging.getLogger("edgefn.trust").warning(
                "trust store: %s is not a valid key (%s): set aside as %s", path, exc.message, aside
            )
            moved.append(f"{path.name} -> {aside}")
    return moved


def load_verifier(data_dir: Path) -> Verifier:
    """The verifier every install goes through; refuses when no key is trusted yet."""
    set_aside_damaged(data_dir)
    paths = [k.path for k in list_keys(data_dir)]
    if not paths:
        raise BundleError(
            f"no trusted publisher keys in {trust_dir(data_dir)}: add one with "
            "`edge-agent trust add PUBFILE` before installing bundles",
            code="unknown_signer",
        )
    return Ed25519Verifier.from_files(paths)
