"""A data dir the agent cannot use at start: a clear one-line error and exit status 4, no
traceback. Real file systems: a read-only and a full tmpfs mounted by the test (root only)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest


def mount_tmpfs(where: Path, options: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[Path]:
    where = tmp_path / "mnt"
    yield where
    subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


def run_agent(data_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge_agent", "run", "--data-dir", str(data_dir), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_read_only_data_dir(mounted: Path) -> None:
    mount_tmpfs(mounted, "size=1m")
    (mounted / "functions").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(mounted)], check=True)
    proc = run_agent(mounted)
    assert proc.returncode == 4, proc.stderr
    assert f"data dir {mounted} is not writable: Read-only file system" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_full_data_dir(mounted: Path) -> None:
    mount_tmpfs(mounted, "size=64k")
    (mounted / "functions").mkdir()
    fd = os.open(mounted / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for _ in range(64):  # bounded: 64 x 4 KiB fills a 64 KiB file system
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    proc = run_agent(mounted)
    assert proc.returncode == 4, proc.stderr
    assert "No space left on device" in proc.stderr
    assert "Traceback" not in proc.stderr
