"""Usage sampling of real processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from hardware.usage import ProcessUsage, UsageSampler, over_memory, system_usage

# Holds ~64 MB resident (bytes are written, so every page is touched), then waits (bounded).
_HOLD = "import sys, time; b = b'x' * (64 << 20); print('ready', flush=True); time.sleep(30)"
# Starts _HOLD as its child, then waits (bounded).
_PARENT = (
    "import subprocess, sys, time; "
    f"c = subprocess.Popen([sys.executable, '-c', {_HOLD!r}]); "
    "print(c.pid, flush=True); time.sleep(30)"
)
# Spins (bounded).
_SPIN = "import time\nend = time.monotonic() + 30\nwhile time.monotonic() < end: pass"


@pytest.fixture
def spawn() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the process and anything it started
        proc.wait()
        if proc.stdout:
            proc.stdout.close()


def _start(started: list[subprocess.Popen[str]], code: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    started.append(proc)
    return proc


def test_rss_of_a_worker_and_its_children(spawn: list[subprocess.Popen[str]]) -> None:
    parent = _start(spawn, _PARENT)
    assert parent.stdout is not None
    assert int(parent.stdout.readline()) > 0  # the child's pid
    # The child prints "ready" to the inherited pipe once its memory is resident.
    assert parent.stdout.readline().strip() == "ready"
    with_children = UsageSampler().sample([parent.pid])[parent.pid]
    alone = UsageSampler(include_children=False).sample([parent.pid])[parent.pid]
    assert with_children.children == 1
    assert with_children.rss_mb >= 64
    assert alone.rss_mb < 64
    assert over_memory(with_children, 64)
    assert not over_memory(with_children, 0)  # 0 = no limit


def test_cpu_percent_is_measured_between_samples(spawn: list[subprocess.Popen[str]]) -> None:
    spinner = _start(spawn, _SPIN)
    sampler = UsageSampler()
    first = sampler.sample([spinner.pid])
    assert first[spinner.pid].cpu_percent == 0.0  # no previous sample yet
    time.sleep(0.5)
    second = sampler.sample([spinner.pid])
    assert second[spinner.pid].cpu_percent > 0.0


def test_vanished_pids_are_left_out(spawn: list[subprocess.Popen[str]]) -> None:
    proc = _start(spawn, "pass")
    proc.wait()
    assert UsageSampler().sample([proc.pid]) == {}


def test_system_usage_is_sane() -> None:
    usage = system_usage()
    assert 0 < usage.memory_available_mb <= usage.memory_total_mb
    assert usage.load_1m >= 0.0


def test_over_memory_boundary() -> None:
    usage = ProcessUsage(pid=1, rss_mb=64.0, cpu_percent=0.0, threads=1, children=0)
    assert not over_memory(usage, 64)
    assert over_memory(usage, 63)
