"""The operator token: who may change what the registry serves.

Flow: `load_or_create_token(path)` at platform start - the first start generates 32 random bytes
as hex (`secrets.token_hex`; never starts with '-', which a command line would take for an
option) into `<data_dir>/admin.token`, created with O_EXCL and mode 0600, so an existing token is
never replaced; later starts read it. Requests that change state send
`Authorization: Bearer <token>`; `check_bearer` compares in constant time (`hmac.compare_digest`)
so response timing tells an attacker nothing about how much of a guess was right.

No header is "who are you?" (401, with `WWW-Authenticate: Bearer`); a header with the wrong token
is "you may not" (403). Reads (listing, bundle downloads) are not authenticated: bundles are
signed and devices verify them, and they are not secret (docs/bundle-format.md, threat model).
"""

from __future__ import annotations

import hmac
import os
import secrets
import stat
from collections.abc import Callable
from enum import Enum
from pathlib import Path

from aiohttp.web import BaseRequest

from cloud_sync.errors import CredentialsError

# 32 bytes = 256 bits of entropy: not guessable online or offline.
TOKEN_BYTES = 32
# A token file is one line; anything much bigger is not ours.
MAX_TOKEN_FILE = 4096


class AuthResult(Enum):
    OK = "ok"
    MISSING = "missing"  # -> 401
    WRONG = "wrong"  # -> 403


def load_or_create_token(path: Path) -> str:
    """The operator token stored at `path`, generated (0600) on first use."""
    path = Path(path)
    token = secrets.token_hex(TOKEN_BYTES)
    try:
        fd = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
    except FileExistsError:
        return read_token(path)
    except OSError as exc:
        raise CredentialsError(f"{path}: cannot create the operator token: {exc}") from exc
    try:
        os.fchmod(fd, 0o600)  # the umask may only remove bits; make the mode exact
        os.write(fd, (token + "\n").encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    return token


def read_token(path: Path) -> str:
    """Read an existing token file, refusing one that others may read (it grants publishing)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise CredentialsError(f"{path}: cannot read the operator token: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as f:
        mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
        data = f.read(MAX_TOKEN_FILE + 1)
    if mode & 0o077:
        raise CredentialsError(
            f"{path}: operator token is readable by others (mode {mode:04o}); chmod 600 it"
        )
    token = data.decode("ascii", "replace").strip()
    if len(data) > MAX_TOKEN_FILE or not token or any(c.isspace() for c in token):
        raise CredentialsError(f"{path}: not an operator token file")
    return token


def check_bearer(authorization: str | None, token: str) -> AuthResult:
    """Judge an `Authorization` header against the operator token."""
    if not authorization:
        return AuthResult.MISSING
    scheme, _, presented = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        return AuthResult.MISSING
    # Compare bytes of equal meaning; compare_digest's time depends only on the lengths.
    ok = hmac.compare_digest(presented.strip().encode("utf-8"), token.encode("utf-8"))
    return AuthResult.OK if ok else AuthResult.WRONG


def operator_only(token: str) -> Callable[[BaseRequest], tuple[AuthResult, str]]:
    """An `authorize` for routes only the operator may call (the device-aware one extends it)."""

    def authorize(request: BaseRequest) -> tuple[AuthResult, str]:
        return check_bearer(request.headers.get("Authorization"), token), "operator"

    return authorize
