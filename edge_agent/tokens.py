"""Bearer tokens for the local API: a small file of hashes in the data dir (`tokens.json`).

A token is 256 random bits (`eft_` + 43 base64url characters), printed once by `edge-agent
token create` and never stored: the file keeps its SHA-256 only. A plain, fast hash is right
here, unlike for passwords: a slow KDF protects guessable secrets against offline guessing, and
a 256-bit random value cannot be guessed however fast the hash is, while every request pays for
the hash. A stolen `tokens.json` therefore lets nobody call the API.

The file is replaced atomically (`runtimes.fsio.atomic_write`) under an flock, so concurrent
`token create`/`revoke` commands never lose each other's change and a running agent (which
re-reads the file when it changes, `edge_agent.auth`) never sees half of one.

Scopes: `invoke:NAME` (one function), `invoke:*` (every function), `admin` (cache purge,
function and health details, metrics). Revoking deletes the record. Tokens pushed by the
platform (desired `lan.tokens`, hashes only) sit beside local ones, marked `source =
"platform"`; `set_pushed` replaces that set. With `auth = "mtls"` the same file grants scopes
to client certificates by subject CN (`token create --client-cn`).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edge_agent.errors import AgentError
from runtimes.fsio import atomic_write

ADMIN = "admin"
INVOKE_ANY = "invoke:*"
TOKEN_PREFIX = "eft_"
# Function names as the manifest allows them, plus "*".
_SCOPE_RE = re.compile(r"^(admin|invoke:(\*|[A-Za-z0-9][A-Za-z0-9._-]{0,127}))$")
FILE_VERSION = 1


class TokenError(AgentError):
    """A token command cannot be done (bad scope, unknown id, unreadable store)."""

    code = "token_error"
    status = 400


def hash_token(token: str) -> str:
    """The stored form of a token (see the module docstring for why plain SHA-256)."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def check_scope(scope: str) -> str:
    if not _SCOPE_RE.match(scope):
        raise TokenError(f"bad scope {scope!r}: use invoke:NAME, invoke:* or admin")
    return scope


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """What is known about a token; never the token itself."""

    id: str
    sha256: str
    scopes: tuple[str, ...]
    created_at: float
    expires_at: float | None = None  # unix time; None: never
    # A grant for a client certificate (auth = "mtls") instead of a token: the certificate's
    # subject CN, checked by TLS against the client CA. sha256 is then empty.
    client_cn: str | None = None
    # "local" (made with `edge-agent token create`) or "platform" (pushed through desired state
    # `lan.tokens`; replaced as a whole set whenever the desired config changes).
    source: str = "local"

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def allows(self, scope: str) -> bool:
        """`admin` is not a superset: an admin token invokes only what its scopes name."""
        if scope in self.scopes:
            return True
        return scope.startswith("invoke:") and INVOKE_ANY in self.scopes

    def public(self) -> dict[str, Any]:
        """The listing form: no hash either (it identifies the token across files)."""
        return {
            "id": self.id,
            "scopes": list(self.scopes),
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "client_cn": self.client_cn,
            "source": self.source,
        }

    @classmethod
    def from_json(cls, item: dict[str, Any]) -> TokenRecord:
        return cls(
            id=str(item["id"]),
            sha256=str(item["sha256"]),
            scopes=tuple(str(s) for s in item["scopes"]),
            created_at=float(item["created_at"]),
            expires_at=None if item.get("expires_at") is None else float(item["expires_at"]),
            client_cn=None if item.get("client_cn") is None else str(item["client_cn"]),
            source=str(item.get("source", "local")),
        )


class TokenStore:
    """The token file. Blocking file I/O: the agent calls it from a thread."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> list[TokenRecord]:
        """All records; a missing file is an empty store."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise TokenError(f"cannot read {self.path}: {exc.strerror}") from exc
        try:
            doc = json.loads(raw)
            return [TokenRecord.from_json(item) for item in doc["tokens"]]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise TokenError(f"{self.path} is not a token store: {exc}") from exc

    def create(
        self, scopes: list[str], *, expires_at: float | None = None
    ) -> tuple[TokenRecord, str]:
        """A new token: returns its record and the token, which exists nowhere else."""
        if not scopes:
            raise TokenError("a token needs at least one --scope")
        clean = tuple(dict.fromkeys(check_scope(s) for s in scopes))
        token = TOKEN_PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()[:43]
        with self._locked() as records:
            ids = {r.id for r in records}
            token_id = secrets.token_hex(4)
            while token_id in ids:
                token_id = secrets.token_hex(4)
            record = TokenRecord(token_id, hash_token(token), clean, time.time(), expires_at)
            records.append(record)
        return record, token

    def grant_certificate(
        self, client_cn: str, scopes: list[str], *, expires_at: float | None = None
    ) -> TokenRecord:
        """Scopes for client certificates with subject CN `client_cn` (auth = "mtls")."""
        if not client_cn or not scopes:
            raise TokenError("a certificate grant needs --client-cn and at least one --scope")
        clean = tuple(dict.fromkeys(check_scope(s) for s in scopes))
        with self._locked() as records:
            if any(r.client_cn == client_cn for r in records):
                raise TokenError(f"CN {client_cn!r} already has a grant: revoke it first")
            ids = {r.id for r in records}
            grant_id = secrets.token_hex(4)
            while grant_id in ids:
                grant_id = secrets.token_hex(4)
            record = TokenRecord(grant_id, "", clean, time.time(), expires_at, client_cn)
            records.append(record)
        return record

    def revoke(self, token_id: str) -> TokenRecord:
        with self._locked() as records:
            for i, record in enumerate(records):
                if record.id == token_id:
                    del records[i]
                    return record
        raise TokenError(f"no token with id {token_id!r} (see `edge-agent token list`)")

    def set_pushed(self, entries: list[dict[str, Any]]) -> tuple[int, list[str]]:
        """Make the platform-pushed tokens exactly `entries` (desired `lan.tokens`, validated by
        cloud_sync.state); local ones are kept. Returns (how many pushed now, ids skipped
        because a local token has that id)."""
        with self._locked() as records:
            local = [r for r in records if r.source != "platform"]
            taken = {r.id for r in local}
            pushed, skipped = [], []
            for item in entries:
                if item["id"] in taken:
                    skipped.append(item["id"])
                    continue
                pushed.append(
                    TokenRecord(
                        id=item["id"],
                        sha256=item["sha256"],
                        scopes=tuple(dict.fromkeys(check_scope(s) for s in item["scopes"])),
                        created_at=0.0,
                        expires_at=None if item.get("expires") is None else float(item["expires"]),
                        source="platform",
                    )
                )
            # created_at 0 for pushed ones: re-applying the same desired state then leaves the
            # records equal and the file untouched (the running agent reloads only on change).
            records[:] = local + pushed
        return len(pushed), skipped

    def set_aside_if_damaged(self) -> str | None:
        """At agent start: move a token file that is not a token store out of the way (under
        the lock, so a `token create` in flight is not lost); return the set-aside name.

        Fails closed: the agent then starts with no token at all, so with `auth = "token"`
        every call that needs one gets 401, never an open API. The damaged copy stays for the
        operator (`runtimes.setaside`). An unreadable file (permissions) is not damage: it is
        left alone and the Authenticator refuses every token while it lasts.
        """
        from runtimes.setaside import set_aside

        if not self.path.is_file():
            return None
        lock = self.path.with_name(f".{self.path.name}.lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                self.read()
                return None
            except TokenError as exc:
                if isinstance(exc.__cause__, OSError):
                    return None
            return set_aside(self.path)
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[list[TokenRecord]]:
        """Read-modify-write under an exclusive lock; the file is replaced only on success."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = self.path.with_name(f".{self.path.name}.lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            records = self.read()
            before = list(records)
            yield records
            if records != before:
                doc = {"version": FILE_VERSION, "tokens": [asdict(r) for r in records]}
                # 0600: hashes are not secrets, but who holds which scope is nobody else's business.
                atomic_write(self.path, json.dumps(doc, indent=1).encode() + b"\n", mode=0o600)
        finally:
            os.close(fd)  # releases the lock
