"""The installer's fault-injection seam on its own: read from the environment once, strictly."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from edge_agent import install_faults
from edge_agent.install import InstallOptions
from edge_agent.install_faults import NO_FAULTS, STEPS, InstallFaults


def test_no_variable_means_no_faults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(install_faults.PAUSE_ENV, raising=False)
    opts = InstallOptions(data_dir=tmp_path)
    assert opts.faults == NO_FAULTS
    for step in STEPS:
        opts.reached(step)  # returns at once: nothing to wait for
    assert not (tmp_path / "staging").exists()


def test_the_variable_is_read_when_the_options_are_built(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(install_faults.PAUSE_ENV, "switch")
    monkeypatch.setenv(install_faults.PAUSE_MARKER_ENV, str(tmp_path / "m"))
    opts = InstallOptions(data_dir=tmp_path)
    monkeypatch.delenv(install_faults.PAUSE_ENV)  # later changes do not matter: read once
    assert opts.faults == InstallFaults("switch", tmp_path / "m")


def test_an_unknown_step_is_refused() -> None:
    with pytest.raises(ValueError, match="not one of download, verify"):
        InstallFaults.from_env({install_faults.PAUSE_ENV: "unpak"})


def test_pause_writes_the_marker_then_sleeps(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(install_faults, "PAUSE_S", 0.01)  # the sleep itself is not the point
    (tmp_path / "staging").mkdir()
    faults = InstallFaults.from_env({install_faults.PAUSE_ENV: "verify"})
    faults.at("download", tmp_path)
    assert not (tmp_path / "staging" / "paused-at-download").exists()
    done = threading.Event()
    worker = threading.Thread(target=lambda: (faults.at("verify", tmp_path), done.set()))
    worker.start()
    worker.join(10)
    assert done.is_set()
    marker = tmp_path / "staging" / "paused-at-verify"
    assert marker.read_text() == str(os.getpid())
