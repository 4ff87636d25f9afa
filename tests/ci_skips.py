"""pytest plugin: under `CI=true` a skipped test fails the run, unless it says why it may skip.

Tests that enforce limits (cgroups, root, a compiler) skip where the machine lacks what they
need. On a developer's machine that is a fair answer; in CI it would hide a broken setup behind
a green run, so there a skip is a failure, naming the skip's reason. A test that may honestly
skip in CI too (it needs a network mirror, or checks what happens when a cross compiler is
*absent*) says so with `@pytest.mark.ci_may_skip("why")`. Loaded by tests/conftest.py; the
marker is registered in pyproject.toml.
"""

from __future__ import annotations

import os
from collections.abc import Generator

import pytest

MARKER = "ci_may_skip"


def in_ci() -> bool:
    """`CI=true` (GitHub Actions, GitLab, .ci/run) or `CI=1`."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def pytest_configure(config: pytest.Config) -> None:
    # Also registered in pyproject.toml; registering here keeps the plugin usable on its own.
    config.addinivalue_line("markers", f"{MARKER}(reason): this test may skip under CI=true")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        marker = item.get_closest_marker(MARKER)
        if marker is not None and not (marker.args and str(marker.args[0]).strip()):
            raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.{MARKER} needs a reason")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if (
        report.skipped
        and not hasattr(report, "wasxfail")  # an expected failure is reported as a skip too
        and in_ci()
        and item.get_closest_marker(MARKER) is None
    ):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        reason = reason.removeprefix("Skipped: ")
        report.outcome = "failed"
        report.longrepr = (
            f"skipped under CI=true, where this test is expected to run: {reason}\n"
            f"Install what it needs in `make test`, or mark it "
            f'@pytest.mark.{MARKER}("why it may skip in CI").'
        )
    return report


# An outer wrapper: the terminal reporter prints the short summary (`-ra`, the reasons) after its
# own yield, so this line lands below it, at the end of the output where it is seen.
@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> Generator[None]:
    yield
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        return
    where = "CI" if in_ci() else "this machine"
    terminalreporter.write_sep("-", f"{len(skipped)} skipped on {where} (reasons above)")
    if not in_ci():
        terminalreporter.write_line(
            f"under CI=true these fail the run unless marked @pytest.mark.{MARKER}(reason)"
        )
