"""Shared fixtures: functions built once per session with the real toolchains."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtimes.build import build_function
from tests.harness import FUNCTIONS

# The real-Mosquitto fixtures (`mosquitto`, `mosquitto_factory`); skips that fail under CI=true
# unless marked `ci_may_skip` (tests/ci_skips.py); one PostgreSQL per run (`postgres_server`,
# `postgres_db`; tests/postgres.py); `backend`, every store test on SQLite and PostgreSQL
# (tests/platform_backends.py); `pytester` for testing that plugin.
pytest_plugins = [
    "tests.mosquitto",
    "tests.postgres",
    "tests.platform_backends",
    "tests.s3server",
    "tests.ci_skips",
    "pytester",
]


@pytest.fixture(scope="session")
def built_conformance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """runtime -> a built copy of that runtime's conformance function."""
    root = tmp_path_factory.mktemp("conformance")
    out: dict[str, Path] = {}
    for runtime in ("node", "go", "cpp"):
        dest = root / runtime
        shutil.copytree(FUNCTIONS / "conformance" / runtime, dest)
        build_function(dest)
        out[runtime] = dest
    yield out
