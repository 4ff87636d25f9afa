"""The CI skip rule (tests/ci_skips.py), on small test files run by a real inner pytest."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SOURCE = """
import pytest

def test_needs_a_tool():
    pytest.skip("no frobnicator here")

@pytest.mark.ci_may_skip("checks the frobnicator's absence")
def test_allowed():
    pytest.skip("the frobnicator is installed")

@pytest.mark.skipif(True, reason="not on this kernel")
def test_marked_skipif():
    pass

@pytest.mark.xfail(reason="known bug")
def test_expected_failure():
    assert False

def test_passes():
    pass
"""


@pytest.fixture(autouse=True)
def _inner_setup(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    # The inner pytest runs in a temp dir: it finds `tests.ci_skips` through PYTHONPATH, and
    # gets the asyncio setting ours has (pytest-asyncio warns without it).
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")


def _run(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, ci: str | None
) -> pytest.RunResult:
    pytester.makepyfile(test_sample=SOURCE)
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    return pytester.runpytest_subprocess("-p", "tests.ci_skips", "-ra")


def test_outside_ci_skips_stay_skips_and_are_summarised(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = _run(pytester, monkeypatch, None)
    result.assert_outcomes(passed=1, skipped=3, xfailed=1)
    result.stdout.fnmatch_lines(["*SKIPPED*no frobnicator here*", "*3 skipped on this machine*"])


def test_under_ci_an_unmarked_skip_fails_with_its_reason(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = _run(pytester, monkeypatch, "true")
    # A skip in setup (a skipif mark, a fixture) fails as an error, one in the test as a failure.
    result.assert_outcomes(passed=1, failed=1, errors=1, skipped=1, xfailed=1)
    result.stdout.fnmatch_lines(
        [
            "*skipped under CI=true, where this test is expected to run*no frobnicator here*",
            "*skipped under CI=true*not on this kernel*",
        ]
    )
    assert result.ret == pytest.ExitCode.TESTS_FAILED


def test_a_marker_without_a_reason_is_refused(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_bare="""
import pytest

@pytest.mark.ci_may_skip
def test_x():
    pass
"""
    )
    result = pytester.runpytest_subprocess("-p", "tests.ci_skips")
    result.stderr.fnmatch_lines(["*ci_may_skip needs a reason*"])
    assert result.ret == pytest.ExitCode.USAGE_ERROR
