"""The device's TUF refresh: timestamp -> snapshot -> targets -> delegated roles, then one target.

Flow of `refresh_target(...)` (python-tuf's `ngclient.Updater` does the TUF client workflow; this
module gives it the agent's HTTP client and a crash-safe cache):

1. take `DATA_DIR/tuf/.lock` (one refresh at a time per device: installs of two functions
   share the metadata);
2. copy the trusted set `DATA_DIR/tuf/current` points at into a fresh `tuf/.work-<rand>/`
   (or, on the first refresh, start from the root pinned at enrolment);
3. run the Updater in that work directory against `{cloud}/v1/tuf/`: root rotations (each new
   root signed by a threshold of the old root's keys and its own), then the timestamp, the
   snapshot it names and the targets the snapshot names (consistent snapshots: `{N}.role.json`),
   then, for the one target path asked for, the delegated roles that may sign it. Every bound
   (rotations, delegations, bytes per document) is ngclient's `UpdaterConfig`, read through
   `HttpFetcher`, which streams so an endless answer stops at the bound;
4. only when all of that verified: fsync the work directory's files, rename it to
   `tuf/gen-<rand>/`, point `tuf/current` (a symlink) at it atomically, remove the older
   generation.

So a refresh is all or nothing on disk: `kill -9` at any point leaves `current` at the
previous trusted set, and the next refresh removes the leftover work directory. Nothing a failed
refresh downloaded (a rollback, an expired timestamp, a bad signature) is ever kept.

Blocking (urllib); async callers use `asyncio.to_thread`. Errors leave as
`runtimes.tuf_verify.TufError` with a stable code.
"""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import json
import os
import secrets
import shutil
import ssl
from collections.abc import Iterator
from pathlib import Path
from urllib import parse
from urllib.parse import urlsplit

from tuf.api import exceptions as tuf_exc
from tuf.ngclient.config import UpdaterConfig
from tuf.ngclient.fetcher import FetcherInterface
from tuf.ngclient.updater import Updater

from cloud_sync.http_client import Endpoint
from runtimes.fsio import fsync_dir
from runtimes.tuf_verify import TARGET_SUFFIX, TrustedView, TufError, TufTarget, tuf_error

TUF_DIR = "tuf"
CURRENT = "current"
METADATA_PATH = "/v1/tuf/"
# Per socket operation: a registry that stalls mid-document is an error after this long, not a
# hung install (ngclient has no timeout of its own; the fetcher is where it belongs).
DEFAULT_TIMEOUT_S = 15.0
CHUNK = 16 * 1024
# An error answer (404 for the next root version, on every refresh) is read up to this much.
MAX_ERROR_BODY = 64 * 1024
# ngclient's defaults, tightened where edgefn's documents are known to be small: a timestamp is
# ~1 kB; top-level targets holds only delegations (one per publisher key).
CONFIG = UpdaterConfig(
    max_root_rotations=32,
    max_delegations=8,
    root_max_length=512_000,
    timestamp_max_length=16_384,
    snapshot_max_length=2_000_000,
    targets_max_length=5_000_000,
    prefix_targets_with_hash=True,
)


class HttpFetcher(FetcherInterface):
    """ngclient's downloads over one kept-alive connection, with the agent's TLS and token.

    One refresh is five or six small GETs; reusing the connection saves a TCP (and TLS)
    handshake for each but the first, which is most of a refresh's time on a remote link.
    The endpoint's `timeout_s` bounds the connect and every read. Bodies are streamed, so
    ngclient stops an endless answer at its bound; the connection is then dropped.
    """

    def __init__(self, endpoint: Endpoint) -> None:
        self._ep = endpoint
        parts = urlsplit(endpoint.base_url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port
        self._prefix = parts.path.rstrip("/")
        self._conn: http.client.HTTPConnection | None = None
        self._used = False

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._used = False

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self._https:
                ctx = self._ep.tls() or ssl.create_default_context()
                self._conn = http.client.HTTPSConnection(
                    self._host, self._port, timeout=self._ep.timeout_s, context=ctx
                )
            else:
                self._conn = http.client.HTTPConnection(
                    self._host, self._port, timeout=self._ep.timeout_s
                )
        return self._conn

    def _fetch(self, url: str) -> Iterator[bytes]:
        base = self._ep.base_url
        if not url.startswith(base + "/"):
            raise tuf_exc.DownloadError(f"refusing to fetch {url}: not under {base}")
        path = self._prefix + url[len(base) :]
        resp = self._get(path, url)
        if resp.status != 200:
            with contextlib.suppress(OSError, http.client.HTTPException):
                resp.read(MAX_ERROR_BODY)  # small error bodies: the connection stays usable
            if not resp.isclosed():
                self.close()
            raise tuf_exc.DownloadHTTPError(f"HTTP {resp.status} for {url}", resp.status)
        return self._chunks(resp, url)

    def _get(self, path: str, url: str) -> http.client.HTTPResponse:
        # A kept-alive connection the server has closed meanwhile fails at once: retry once
        # on a fresh one; a fresh connection that fails is the answer.
        for attempt in (1, 2):
            reused = self._used
            try:
                conn = self._connection()
                conn.request("GET", path, headers=self._ep.headers())
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                if reused and attempt == 1:
                    continue
                raise tuf_exc.DownloadError(
                    f"cannot reach {self._ep.name} at {url}: {exc}"
                ) from exc
            self._used = True
            return resp
        raise AssertionError("unreachable")  # pragma: no cover

    def _chunks(self, resp: http.client.HTTPResponse, url: str) -> Iterator[bytes]:
        try:
            while chunk := resp.read(CHUNK):
                yield chunk
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise tuf_exc.DownloadError(f"download of {url} cut: {exc}") from exc
        finally:
            if not resp.isclosed():  # stopped early (over the bound): drop the connection
                self.close()


def tuf_dir(data_dir: Path) -> Path:
    return Path(data_dir) / TUF_DIR


def current_dir(data_dir: Path) -> Path | None:
    """The trusted set a completed refresh left, or None before the first one."""
    link = tuf_dir(data_dir) / CURRENT
    return link.resolve() if link.is_symlink() and link.resolve().is_dir() else None


def trusted_view(data_dir: Path) -> TrustedView | None:
    """The cached trusted metadata, offline (for `fn list`); None when there is none."""
    cur = current_dir(data_dir)
    return TrustedView(cur) if cur is not None else None


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _sweep(directory: Path, keep: Path | None) -> None:
    """Remove work directories of interrupted refreshes and generations no longer current.

    Compared by name: `keep` is resolved, `directory` may be reached through a symlink.
    """
    keep_name = keep.name if keep is not None else None
    for entry in directory.iterdir():
        if entry.name.startswith((".work-", "gen-", ".current-")) and entry.name != keep_name:
            if entry.is_symlink() or entry.is_file():
                entry.unlink()
            else:
                shutil.rmtree(entry, ignore_errors=True)


def _link_tree(src: Path, dest: Path) -> None:
    """`dest` as a tree of hard links to `src`'s files (symlinks copied as symlinks)."""
    dest.mkdir(mode=0o700)
    for entry in src.iterdir():
        target = dest / entry.name
        if entry.is_symlink():
            os.symlink(os.readlink(entry), target)
        elif entry.is_dir():
            _link_tree(entry, target)
        else:
            os.link(entry, target)


def _fsync_tree(root: Path) -> None:
    """fsync what the refresh wrote (files linked from the previous generation are durable)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            if p.is_symlink() or p.stat().st_nlink > 1:
                continue
            fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def refresh_target(
    data_dir: Path,
    cloud_url: str,
    target_path: str,
    *,
    pinned_root: bytes | None,
    token: str = "",
    ssl_context: ssl.SSLContext | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> TufTarget:
    """Refresh the trusted metadata from `cloud_url` and return `target_path`'s target.

    Raises TufError: `tuf_no_root` with neither a cached set nor a pinned root,
    `tuf_unavailable` when the platform serves no TUF metadata, `tuf_unknown_target` when the
    fresh metadata does not name the path, and the codes of `runtimes.tuf_verify.tuf_error`.
    """
    found, _ = _refresh(
        data_dir, cloud_url, target_path, pinned_root, token, ssl_context, timeout_s
    )
    if found is None:
        raise TufError(
            f"{target_path} is not a target in the trusted TUF metadata of "
            f"{cloud_url.rstrip('/')} (not published, or its publisher's key was revoked)",
            code="tuf_unknown_target",
        )
    return found


def refresh_versions(
    data_dir: Path,
    cloud_url: str,
    name: str,
    *,
    pinned_root: bytes | None,
    token: str = "",
    ssl_context: ssl.SSLContext | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> list[str]:
    """Refresh, then every version of `name` the trusted metadata names (for "the latest":
    the metadata's word, not the registry's, so a frozen "latest" cannot hide a release)."""
    probe = f"{name}/{TARGET_SUFFIX}"  # walks to the role delegated `{name}/*`
    _, gen = _refresh(data_dir, cloud_url, probe, pinned_root, token, ssl_context, timeout_s)
    return TrustedView(gen).versions_of(name)


def _refresh(
    data_dir: Path,
    cloud_url: str,
    target_path: str,
    pinned_root: bytes | None,
    token: str,
    ssl_context: ssl.SSLContext | None,
    timeout_s: float,
) -> tuple[TufTarget | None, Path]:
    """The refresh (module docstring): the target, and the generation now current."""
    try:
        return _refresh_locked(
            data_dir, cloud_url, target_path, pinned_root, token, ssl_context, timeout_s
        )
    except OSError as exc:  # the data dir: full, read-only, permissions
        raise TufError(
            f"the trusted TUF metadata in {tuf_dir(data_dir)} cannot be updated: {exc}",
            code="tuf_cache",
        ) from exc


def _refresh_locked(
    data_dir: Path,
    cloud_url: str,
    target_path: str,
    pinned_root: bytes | None,
    token: str,
    ssl_context: ssl.SSLContext | None,
    timeout_s: float,
) -> tuple[TufTarget | None, Path]:
    base = cloud_url.rstrip("/")
    if urlsplit(base).scheme not in ("http", "https"):
        raise TufError(f"not a registry URL: {cloud_url!r}", code="tuf_unavailable")
    top = tuf_dir(data_dir)
    with _locked(top):
        cur = current_dir(data_dir)
        _sweep(top, cur)
        if cur is None and pinned_root is None:
            raise TufError(
                "update_security is 'tuf' but this device has no pinned TUF root: enrol it "
                "again with a platform that serves TUF metadata (the credentials file's "
                "'tuf_root'), or set update_security = 'signatures'",
                code="tuf_no_root",
            )
        work = top / f".work-{secrets.token_hex(6)}"
        if cur is not None:
            # Hard links, not copies: ngclient never writes a file in place (temp + rename),
            # so the trusted generation cannot change through them, and they need no fsync.
            _link_tree(cur, work)
        else:
            work.mkdir(mode=0o700)
        try:
            found = _run_updater(
                work,
                base,
                target_path,
                pinned_root if cur is None else None,
                Endpoint(
                    base,
                    token=token,
                    ssl_context=ssl_context,
                    timeout_s=timeout_s,
                    name="the registry",
                ),
            )
            _fsync_tree(work)
            gen = top / f"gen-{secrets.token_hex(6)}"
            os.rename(work, gen)
            tmp_link = top / f".current-{secrets.token_hex(6)}"
            os.symlink(gen.name, tmp_link)
            os.replace(tmp_link, top / CURRENT)
            fsync_dir(top)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        if cur is not None:
            shutil.rmtree(cur, ignore_errors=True)
    return found, gen


def _run_updater(
    work: Path, base: str, path: str, bootstrap: bytes | None, endpoint: Endpoint
) -> TufTarget | None:
    where = f"the registry at {base}"
    fetcher = HttpFetcher(endpoint)
    try:
        updater = Updater(
            metadata_dir=str(work),
            metadata_base_url=base + METADATA_PATH,
            target_base_url=base + METADATA_PATH + "targets/",
            fetcher=fetcher,
            config=CONFIG,
            bootstrap=bootstrap,
        )
        updater.refresh()
        tf = updater.get_targetinfo(path)
    except tuf_exc.DownloadHTTPError as exc:
        if exc.status_code == 404 and str(exc).endswith("/timestamp.json"):
            raise TufError(
                f"{where} serves no TUF metadata ({exc}); this device's update_security is "
                "'tuf': refusing to install without it",
                code="tuf_unavailable",
            ) from None
        raise tuf_error(exc, where) from None
    except (tuf_exc.RepositoryError, tuf_exc.DownloadError) as exc:
        raise tuf_error(exc, where) from None
    except (ValueError, TypeError, KeyError) as exc:  # a pinned root that does not parse
        raise TufError(
            f"the pinned TUF root is not usable: {exc}", code="tuf_bad_metadata"
        ) from exc
    finally:
        fetcher.close()
    if tf is None:
        return None
    return TufTarget.from_target_file(tf, _signing_role(work, path))


def _signing_role(work: Path, path: str) -> str:
    """Which role's just-verified file names `path`, for messages ('targets' if unsure).

    Plain JSON, no second verification: ngclient verified these files a moment ago, and
    canonical-JSON signature checks are most of a refresh's CPU time.
    """
    for f in sorted(work.glob("*.json")):
        if f.name in ("root.json", "timestamp.json", "snapshot.json"):
            continue
        try:
            signed = json.loads(f.read_bytes())["signed"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(signed, dict) and path in (signed.get("targets") or {}):
            return parse.unquote(f.name.removesuffix(".json"))
    return "targets"
