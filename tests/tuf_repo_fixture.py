"""A TUF repository built in the test with python-tuf's metadata API, and a hostile registry.

`TufRepo` is the registry side the device talks to, made by hand so that tests can also make
what an honest repository never would: old versions kept around to replay, expired documents,
documents signed by too few keys, renamed files. Layout and names follow the platform contract
(docs/update-security.md): consistent snapshots (`{N}.root.json`, `{N}.snapshot.json`,
`{N}.targets.json`, `{N}.publisher-<keyid16>.json`), `timestamp.json`, targets at
`{name}/{version}.edgefn` with length and sha256, one delegated role per publisher key with
paths `{fn}/*`.

`serve(repo)` runs it on 127.0.0.1 (aiohttp in a thread): `/v1/tuf/...` from the repository's
files, `/v1/registry/bundles/sha256:<hex>` from its bundles, and `repo.override[path]` first:
bytes to serve instead, or `STALL` to send headers and a few bytes and then nothing. It counts
the metadata bytes it serves (`repo.served_metadata_bytes`) for the benchmark.

Bundles are real: `signed_bundle` writes a Node function bundle signed with an Ed25519
publisher key the way `tests.registry_helpers.craft_bundle` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aiohttp import web
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import (
    DelegatedRole,
    Delegations,
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from tests.registry_helpers import Entry, craft_bundle, serve_app, tar_gz

STALL = b"__stall__"
HANDLER = b"exports.handler = async (event) => event;\n"
SER = JSONSerializer(compact=True)


def in_days(days: float) -> datetime:
    return (datetime.now(UTC) + timedelta(days=days)).replace(microsecond=0)


def signed_bundle(out: Path, key_file: Path, name: str, version: str, pad: int = 0) -> Path:
    """A real, signed Node bundle of `name@version` (`pad` bytes of filler to size it)."""
    entries = [Entry("handler.js", HANDLER)]
    if pad:
        # Incompressible so the bundle is about `pad` bytes; deterministic per name@version.
        seed = hashlib.sha256(f"{name}@{version}".encode()).digest()
        blob = b"".join(
            hashlib.sha256(seed + i.to_bytes(4, "big")).digest() for i in range(pad // 32 + 1)
        )
        entries.append(Entry("blob.bin", blob[:pad]))
    fn = {"name": name, "version": version, "runtime": "node", "entry": "handler.js"}
    return craft_bundle(out, key_file, fn, tar_gz(entries))


@dataclass
class TufRepo:
    root_signers: list[CryptoSigner]
    online: dict[str, CryptoSigner]  # timestamp, snapshot, targets
    root: Metadata[Root]
    targets: Metadata[Targets]
    delegated: dict[str, Metadata[Targets]] = field(default_factory=dict)
    publishers: dict[str, CryptoSigner] = field(default_factory=dict)  # role -> key
    files: dict[str, bytes] = field(default_factory=dict)  # path under /v1/tuf/ -> bytes
    bundles: dict[str, bytes] = field(default_factory=dict)  # sha256 hex -> bytes
    versions: dict[tuple[str, str], str] = field(default_factory=dict)  # (name, version) -> hex
    override: dict[str, bytes] = field(default_factory=dict)
    history: dict[str, dict[int, bytes]] = field(default_factory=dict)  # role -> version -> bytes
    served_metadata_bytes: int = 0
    served_requests: list[str] = field(default_factory=list)
    snapshot_version: int = 0
    timestamp_version: int = 0

    # -- building ---------------------------------------------------------------------------

    @classmethod
    def create(cls, *, root_keys: int = 1, root_threshold: int = 1) -> TufRepo:
        root_signers = [CryptoSigner.generate_ed25519() for _ in range(root_keys)]
        online = {r: CryptoSigner.generate_ed25519() for r in ("timestamp", "snapshot", "targets")}
        root = Root(expires=in_days(365), consistent_snapshot=True)
        for s in root_signers:
            root.add_key(s.public_key, "root")
        root.roles["root"].threshold = root_threshold
        for role, s in online.items():
            root.add_key(s.public_key, role)
        targets = Targets(expires=in_days(30))
        targets.delegations = Delegations(keys={}, roles={})
        repo = cls(root_signers, online, Metadata(root), Metadata(targets))
        repo._store_root(root_signers)
        return repo

    def _store_root(self, signers: list[CryptoSigner]) -> None:
        self.root.signatures.clear()
        for s in signers:
            self.root.sign(s, append=True)
        data = self.root.to_bytes(SER)
        self.files[f"{self.root.signed.version}.root.json"] = data
        self.history.setdefault("root", {})[self.root.signed.version] = data

    def root_bytes(self, version: int = 1) -> bytes:
        return self.history["root"][version]

    def add_publisher(self, fn: str) -> str:
        """A publisher key allowed to sign `{fn}/*`; returns its role name."""
        signer = CryptoSigner.generate_ed25519()
        key = signer.public_key
        role = f"publisher-{key.keyid[:16]}"
        dl = self.targets.signed.delegations
        assert dl is not None and dl.roles is not None
        dl.keys[key.keyid] = key
        dl.roles[role] = DelegatedRole(role, [key.keyid], 1, True, [f"{fn}/*"])
        self.delegated[role] = Metadata(Targets(expires=in_days(30)))
        self.publishers[role] = signer
        return role

    def revoke(self, role: str) -> None:
        """Remove the publisher's delegation (and key): what it signed is no longer trusted."""
        dl = self.targets.signed.delegations
        assert dl is not None and dl.roles is not None
        keyids = dl.roles.pop(role).keyids
        for k in keyids:
            dl.keys.pop(k, None)

    def add_target(self, role: str, name: str, version: str, data: bytes) -> TargetFile:
        path = f"{name}/{version}.edgefn"
        tf = TargetFile.from_data(path, data, ["sha256"])
        self.delegated[role].signed.targets[path] = tf
        self.add_bundle(name, version, data)
        return tf

    def add_bundle(self, name: str, version: str, data: bytes) -> str:
        """Serve `data` at the registry's bundle URL (and version document), TUF or not."""
        digest = hashlib.sha256(data).hexdigest()
        self.bundles[digest] = data
        self.versions[(name, version)] = digest
        return digest

    def publish(self, *, timestamp_expires: datetime | None = None) -> None:
        """New versions of every targets role, the snapshot naming them, a timestamp."""
        self.snapshot_version += 1
        snap = Snapshot(version=self.snapshot_version, expires=in_days(7))
        for role, md in [("targets", self.targets), *self.delegated.items()]:
            md.signed.version = self.snapshot_version
            md.signatures.clear()
            md.sign(self.online["targets"] if role == "targets" else self.publishers[role])
            data = md.to_bytes(SER)
            self.files[f"{md.signed.version}.{role}.json"] = data
            self.history.setdefault(role, {})[md.signed.version] = data
            snap.meta[f"{role}.json"] = MetaFile(version=md.signed.version)
        smd = Metadata(snap)
        smd.sign(self.online["snapshot"])
        sdata = smd.to_bytes(SER)
        self.files[f"{self.snapshot_version}.snapshot.json"] = sdata
        self.history.setdefault("snapshot", {})[self.snapshot_version] = sdata
        self.sign_timestamp(expires=timestamp_expires)

    def sign_timestamp(
        self, *, expires: datetime | None = None, version: int | None = None
    ) -> bytes:
        self.timestamp_version = version or self.timestamp_version + 1
        ts = Timestamp(
            version=self.timestamp_version,
            expires=expires or in_days(1),
            snapshot_meta=MetaFile(version=self.snapshot_version),
        )
        tmd = Metadata(ts)
        tmd.sign(self.online["timestamp"])
        data = tmd.to_bytes(SER)
        self.files["timestamp.json"] = data
        self.history.setdefault("timestamp", {})[self.timestamp_version] = data
        return data

    def rotate_root(
        self,
        *,
        new_root_keys: int = 1,
        threshold: int = 1,
        sign_with_old: int | None = None,
        new_timestamp_key: bool = False,
    ) -> list[CryptoSigner]:
        """Root v(N+1) with fresh root keys, signed by `sign_with_old` old keys (default: the
        old threshold) and all new ones. Returns the new root signers."""
        old = self.root_signers
        old_threshold = self.root.signed.roles["root"].threshold
        new_root = copy.deepcopy(self.root.signed)
        new_root.version += 1
        for s in old:
            new_root.revoke_key(s.public_key.keyid, "root")
        new = [CryptoSigner.generate_ed25519() for _ in range(new_root_keys)]
        for s in new:
            new_root.add_key(s.public_key, "root")
        new_root.roles["root"].threshold = threshold
        if new_timestamp_key:
            new_root.revoke_key(self.online["timestamp"].public_key.keyid, "timestamp")
            self.online["timestamp"] = CryptoSigner.generate_ed25519()
            new_root.add_key(self.online["timestamp"].public_key, "timestamp")
        self.root = Metadata(new_root)
        n_old = old_threshold if sign_with_old is None else sign_with_old
        self._store_root(old[:n_old] + new)
        self.root_signers = new
        return new

    # -- serving ----------------------------------------------------------------------------

    def app(self) -> web.Application:
        async def tuf(request: web.Request) -> web.StreamResponse:
            path = request.match_info["path"]
            self.served_requests.append(path)
            data = self.override.get(path, self.files.get(path))
            if data is None:
                return web.json_response({"code": "not_found", "message": path}, status=404)
            if data == STALL:
                resp = web.StreamResponse()
                resp.content_length = 4096
                await resp.prepare(request)
                await resp.write(b"{")
                # Bounded: until the test lifts the stall (or 30 s), then the answer is cut.
                for _ in range(600):
                    if self.override.get(path) != STALL:
                        break
                    await asyncio.sleep(0.05)
                return resp
            self.served_metadata_bytes += len(data)
            return web.Response(body=data, content_type="application/json")

        async def bundle(request: web.Request) -> web.StreamResponse:
            digest = request.match_info["digest"].removeprefix("sha256:")
            key = f"bundles/{digest}"
            data = self.override.get(key, self.bundles.get(digest))
            if data is None:
                return web.json_response({"code": "not_found", "message": digest}, status=404)
            return web.Response(body=data, content_type="application/octet-stream")

        async def version(request: web.Request) -> web.StreamResponse:
            name, v = request.match_info["name"], request.match_info["version"]
            digest = self.versions.get((name, v))
            if digest is None:
                return web.json_response({"code": "not_found", "message": name}, status=404)
            doc = {"name": name, "version": v, "digest": f"sha256:{digest}"}
            return web.json_response({**doc, "size": len(self.bundles[digest]), "arches": []})

        app = web.Application()
        app.router.add_get("/v1/registry/functions/{name}/versions/{version}", version)
        app.router.add_get("/v1/tuf/{path:.+}", tuf)
        app.router.add_get("/v1/registry/bundles/{digest}", bundle)
        return app


@contextlib.contextmanager
def serve(repo: TufRepo) -> Iterator[str]:
    with serve_app(repo.app()) as url:
        yield url


def credentials_file(path: Path, repo: TufRepo, **extra: Any) -> Path:
    """A credentials file with the pinned root (only the fields `fn install` reads)."""
    import json

    doc = {"format": 1, "tuf_root": json.loads(repo.root_bytes(1)), **extra}
    path.write_text(json.dumps(doc))
    path.chmod(0o600)
    return path


# ---- a device that trusts the repository --------------------------------------------------


@dataclass
class Device:
    """A data dir enrolled with `repo`'s root, trusting `key` for bundles, with echo installed."""

    dir: Path
    data: Path
    key: Path
    creds: Path
    repo: TufRepo
    url: str
    role: str  # echo's publisher role

    def bundle(self, version: str, *, key: Path | None = None, pad: int = 0) -> bytes:
        out = self.dir / f"echo-{version}.efb"
        return signed_bundle(out, key or self.key, "echo", version, pad).read_bytes()

    def publish(self, version: str, **kw: Any) -> bytes:
        """Sign echo `version` into echo's publisher role and publish the repository."""
        data = self.bundle(version)
        self.repo.add_target(self.role, "echo", version, data)
        self.repo.publish(**kw)
        return data

    def install(self, version: str, **kw: Any) -> Any:
        """In-process, the way the deployer's thread does it."""
        from edge_agent.install import InstallOptions, install_from_registry
        from edge_agent.install_faults import InstallFaults
        from edge_agent.update_security import resolve

        opts = InstallOptions(
            data_dir=self.data,
            faults=InstallFaults(),
            security=resolve("tuf", self.data, self.creds),
        )
        return install_from_registry(self.url, "echo", version, opts, **kw)

    def cli_install(self, version: str, *extra: str) -> Any:
        """`edge-agent fn install echo@VERSION --cloud URL --data-dir D --credentials FILE`."""
        from tests.registry_helpers import agent_cli

        return agent_cli(
            "fn", "install", f"echo@{version}", "--cloud", self.url,
            "--data-dir", self.data, "--credentials", self.creds, *extra,
        )  # fmt: skip

    def active(self) -> str:
        return (self.data / "functions" / "echo" / "active").read_text().strip()

    def trusted_files(self) -> dict[str, bytes]:
        """The trusted metadata set `tuf/current` points at, file by file."""
        cur = (self.data / "tuf" / "current").resolve()
        return {
            str(p.relative_to(cur)): p.read_bytes()
            for p in sorted(cur.rglob("*"))
            if p.is_file() and not p.is_symlink()
        }

    def leftovers(self) -> list[str]:
        """Half-written things: download parts, unpack staging dirs, refresh work dirs."""
        out = [p.name for p in (self.data / "staging").glob("*.part")]
        out += [p.name for p in (self.data / "functions").rglob(".staging*")]
        out += [p.name for p in (self.data / "tuf").glob(".work-*")]
        return out


@contextlib.contextmanager
def make_device(tmp: Path, *, root_keys: int = 1, root_threshold: int = 1) -> Iterator[Device]:
    """A repository serving echo 1.0.0 and a device that installed it through TUF."""
    from edge_agent.trust import add_key
    from runtimes.signing import create_keypair

    tmp.mkdir(parents=True, exist_ok=True)
    create_keypair(tmp / "publisher.key")
    repo = TufRepo.create(root_keys=root_keys, root_threshold=root_threshold)
    role = repo.add_publisher("echo")
    data = tmp / "device"
    add_key(data, tmp / "publisher.key.pub")
    creds = credentials_file(tmp / "credentials.json", repo)
    with serve(repo) as url:
        dev = Device(tmp, data, tmp / "publisher.key", creds, repo, url, role)
        dev.publish("1.0.0")
        dev.install("1.0.0")
        yield dev
