"""Helpers for the TUF repository tests: init through the real CLI, publish, ngclient updaters."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

from tuf.ngclient import Updater

from tests.harness import http
from tests.registry_helpers import Entry, Platform, cli, craft_bundle, ok, tar_gz


def fn(name: str, version: str) -> dict[str, str]:
    return {"name": name, "version": version, "runtime": "node", "entry": "handler.js"}


def bundle(out: Path, key: Path, name: str, version: str, payload: bytes = b"") -> Path:
    """A validly signed bundle of `name@version` (crafted: no build toolchain needed)."""
    js = payload or f"exports.handler = async () => '{name}@{version}';\n".encode()
    out.mkdir(parents=True, exist_ok=True)
    data = tar_gz([Entry("handler.js", js)])
    return craft_bundle(out / f"{name}-{version}.efb", key, fn(name, version), data)


def new_key(directory: Path, name: str) -> Path:
    ok(cli("keys", "create", "--out", directory / f"{name}.key"))
    return directory / f"{name}.key"


def tuf_publish(platform: Platform, path: Path, key: Path | None) -> str:
    extra: list[str | Path] = ["--key", key] if key is not None else []
    return ok(
        cli("fn", "publish", path, "--platform", platform.url, "--token", platform.token, *extra)
    )


def updater(platform: Platform, workdir: Path, root: bytes | None) -> Updater:
    """An ngclient updater caching under `workdir`, seeded with `root` (None: what it cached)."""
    meta = workdir / "metadata"
    meta.mkdir(parents=True, exist_ok=True)
    (workdir / "targets").mkdir(exist_ok=True)
    return Updater(
        bootstrap=root,
        metadata_dir=str(meta),
        metadata_base_url=f"{platform.url}/v1/tuf/",
        target_base_url=f"{platform.url}/v1/tuf/targets/",
        target_dir=str(workdir / "targets"),
    )


def root_v1(data_dir: Path) -> bytes:
    return (data_dir / "tuf" / "metadata" / "1.root.json").read_bytes()


def fetch_verified(up: Updater, name: str, version: str, expected: Path) -> Path:
    """Find the target (refreshing once per updater), download it: the same bytes as `expected`."""
    info = up.get_targetinfo(f"{name}/{version}.edgefn")
    assert info is not None, f"{name}/{version}.edgefn not in the TUF metadata"
    assert info.length == expected.stat().st_size
    assert info.hashes == {"sha256": hashlib.sha256(expected.read_bytes()).hexdigest()}
    got = Path(up.download_target(info))
    assert got.read_bytes() == expected.read_bytes()
    return got


def get_json(url: str) -> tuple[int, dict[str, object]]:
    resp = http("GET", url)
    return resp.status, json.loads(resp.body)


def fresh(workdir: Path) -> Path:
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    return workdir


def refused(proc: subprocess.CompletedProcess[str], code: str) -> str:
    """A refusal: non-zero exit, one stderr line naming `code` (`(code)` or `(code, HTTP n)`)."""
    assert proc.returncode != 0, f"expected a refusal, got success:\n{proc.stdout}"
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr:\n{proc.stderr}"
    assert f"({code})" in lines[0] or f"({code}, HTTP" in lines[0], lines[0]
    return lines[0]
