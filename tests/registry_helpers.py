"""Helpers for the registry, author-CLI and install tests: real processes on loopback.

`Platform` runs `edge-cloud serve --port 0` as a subprocess; `cli`/`agent_cli` run the console
entry points the way a user does (`python -m ...`); `craft_bundle` writes validly signed bundles
with hostile payloads (the real builder refuses to make them); `serve_app` runs a tiny aiohttp
app in a thread for registries that misbehave on purpose. No tests live here.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from runtimes.bundle import (
    COMMON_MEMBER,
    Artifact,
    BundleManifest,
    artifact_member,
    manifest_to_table,
    sign_manifest,
)
from runtimes.manifest import parse_manifest
from runtimes.signing import key_id, load_private_key

REPO = Path(__file__).resolve().parent.parent


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    for var in (
        "EDGEFN_DATA_DIR",
        "EDGEFN_TOKEN",
        "EDGEFN_CLOUD_DATA_DIR",
        "EDGEFN_INSTALL_PAUSE_AT",
    ):
        env.pop(var, None)
    env.update(extra or {})
    return env


def cli(
    *args: str | Path,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess[str]:
    """`edge-cloud ARGS`."""
    return subprocess.run(
        [sys.executable, "-m", "cloud_sync.platform.cli", *map(str, args)],
        cwd=cwd,
        env=_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def agent_cli(
    *args: str | Path, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """`edge-agent ARGS`."""
    return subprocess.run(
        [sys.executable, "-m", "edge_agent", *map(str, args)],
        env=_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def refused(proc: subprocess.CompletedProcess[str], code: str) -> str:
    """Assert a refusal: non-zero exit and one stderr line naming `code`; returns the line."""
    assert proc.returncode != 0, f"expected a refusal, got success:\n{proc.stdout}"
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr:\n{proc.stderr}"
    assert f"({code})" in lines[0], f"expected code {code}: {lines[0]}"
    return lines[0]


@dataclass
class Platform:
    data_dir: Path
    proc: subprocess.Popen[bytes]
    url: str = ""
    lines: list[str] = field(default_factory=list)
    _reader: threading.Thread | None = None

    @property
    def token(self) -> str:
        return (self.data_dir / "admin.token").read_text().strip()

    def log_text(self) -> str:
        return "\n".join(self.lines)

    def wait_log(self, needle: str, start: int = 0, timeout: float = 10) -> list[str]:
        """Log lines from index `start` that contain `needle`, waiting until there is one."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [line for line in self.lines[start:] if needle in line]
            if found:
                return found
            time.sleep(0.02)
        raise AssertionError(f"no log line with {needle!r}:\n{self.log_text()[-3000:]}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(20)
        except subprocess.TimeoutExpired:
            # Stuck: its stacks into the log first (the platform's SIGUSR1 dump), then kill.
            self.proc.send_signal(signal.SIGUSR1)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(2)
            self.proc.kill()
            code = self.proc.wait(5)
        if self._reader is not None:
            self._reader.join(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        return code


def start_platform(data_dir: Path, *extra: str, timeout: float = 30) -> Platform:
    """Start `edge-cloud serve --port 0` and wait for its platform.json."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cloud_sync.platform.cli",
            "serve",
            "--data-dir",
            str(data_dir),
            "--port",
            "0",
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=_env(),
    )
    platform = Platform(data_dir, proc)

    def read() -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            platform.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    platform._reader = threading.Thread(target=read, daemon=True)
    platform._reader.start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            info = json.loads((data_dir / "platform.json").read_text())
        except (OSError, ValueError):
            info = {}
        if info.get("pid") == proc.pid:
            platform.url = info["url"]
            return platform
        if proc.poll() is not None:
            platform.stop()
            raise AssertionError(f"platform exited {proc.returncode}:\n{platform.log_text()}")
        time.sleep(0.02)
    platform.stop()
    raise AssertionError(f"platform did not start:\n{platform.log_text()}")


@contextlib.contextmanager
def platform_running(data_dir: Path, *extra: str) -> Iterator[Platform]:
    p = start_platform(data_dir, *extra)
    try:
        yield p
    finally:
        p.stop()


def set_version(function_dir: Path, version: str) -> None:
    manifest = function_dir / "edgefn.toml"
    lines = [
        f'version = "{version}"' if line.startswith("version = ") else line
        for line in manifest.read_text().splitlines()
    ]
    manifest.write_text("\n".join(lines) + "\n")


def build(function_dir: Path, key: Path, out: Path, *arch: str) -> Path:
    args: list[str | Path] = ["fn", "build", function_dir, "--key", key, "--out", out]
    if arch:
        args += ["--arch", ",".join(arch)]
    stdout = ok(cli(*args))
    assert stdout.strip().splitlines()[-1] == str(out.absolute())
    return out


def publish(platform: Platform, bundle: Path) -> str:
    return ok(cli("fn", "publish", bundle, "--platform", platform.url, "--token", platform.token))


def tree(root: Path) -> list[str]:
    """Every path under `root` (relative, sorted): to check nothing changed."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# ---- crafted bundles -----------------------------------------------------------------------


@dataclass
class Entry:
    name: str
    data: bytes = b""
    type: bytes = tarfile.REGTYPE
    linkname: str = ""
    mode: int = 0o644


def tar_gz(entries: Sequence[Entry]) -> bytes:
    """A .tar.gz with exactly these entries (no normalisation, no safety checks)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.type = e.type
            info.mode = e.mode
            info.linkname = e.linkname
            info.size = len(e.data) if e.type == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(e.data) if info.size else None)
    return gzip.compress(raw.getvalue(), mtime=0)


def write_outer(out: Path, members: Sequence[tuple[str, bytes]]) -> Path:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    out.write_bytes(raw.getvalue())
    return out


def craft_bundle(
    out: Path,
    key_file: Path,
    function: dict[str, Any],
    payload: bytes,
    *,
    arch: str | None = None,
    unpacked_size: int | None = None,
    signatures: bytes | None = None,
) -> Path:
    """A bundle signed by `key_file` whose one payload member (common, or `arch`) is `payload`."""
    key = load_private_key(key_file)
    member = artifact_member(arch) if arch else COMMON_MEMBER
    art = Artifact(
        file=member,
        sha256=hashlib.sha256(payload).hexdigest(),
        size=len(payload),
        unpacked_size=len(payload) if unpacked_size is None else unpacked_size,
    )
    fn = parse_manifest(function)
    manifest = BundleManifest(
        function=parse_manifest(manifest_to_table(fn)),
        artifacts={arch: art} if arch else {},
        common=None if arch else art,
        created_at="2026-11-27T12:00:00Z",
        publisher=key_id(key),
    )
    manifest_bytes = manifest.to_bytes()
    sig = sign_manifest(manifest_bytes, [key]) if signatures is None else signatures
    return write_outer(
        out, [("manifest.json", manifest_bytes), ("manifest.sig", sig), (member, payload)]
    )


# ---- misbehaving registries ----------------------------------------------------------------


@contextlib.contextmanager
def serve_app(app: web.Application) -> Iterator[str]:
    """Run `app` on 127.0.0.1 in a background thread; yields its URL."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app, access_log=None)
    ready = threading.Event()
    urls: list[str] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        urls.append(f"http://127.0.0.1:{runner.addresses[0][1]}")
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(10), "test server did not start"
    try:
        yield urls[0]
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
