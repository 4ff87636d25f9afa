"""`edge-cloud fn test DIR`: run the function's own tests with the real toolchain.

Node: the function is staged with all its npm dependencies (dev too) in a private copy and
`node --test` runs there. Go: `go test ./...` in the copy `runtimes.gobuild` prepares for a
build (same SDK replace, same relative replaces). C++: `test/*.cpp` compiled with the
function's sources and run. The author's directory gets at most a package-lock.json (when it had
none), exactly as `fn build` writes it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from cloud_sync.author.output import EXIT_ERROR, EXIT_USAGE, fail, say

# A test suite that runs longer than this is wedged, not slow.
TEST_TIMEOUT_S = 600.0


def _run(argv: list[str], cwd: Path) -> int:
    """Run a test step with the author's terminal attached; its exit code."""
    try:
        return subprocess.run(
            argv, cwd=cwd, stdin=subprocess.DEVNULL, timeout=TEST_TIMEOUT_S, check=False
        ).returncode
    except FileNotFoundError:
        print(f"edge-cloud: {argv[0]} is not installed", file=sys.stderr)
        return 127
    except subprocess.TimeoutExpired:
        print(f"edge-cloud: {argv[0]} ran longer than {TEST_TIMEOUT_S:g} s", file=sys.stderr)
        return 124


def cmd_fn_test(args: argparse.Namespace) -> int:
    from runtimes.errors import RuntimeErrorBase
    from runtimes.manifest import MANIFEST_NAME, load_manifest

    directory: Path = args.dir.resolve()
    try:
        manifest = load_manifest(directory / MANIFEST_NAME)
    except RuntimeErrorBase as exc:
        return fail(exc.message, EXIT_USAGE)
    try:
        if manifest.runtime == "node":
            code = _node_test(directory)
        elif manifest.runtime == "go":
            from runtimes.gobuild import run_go_tests

            code = run_go_tests(directory, timeout=TEST_TIMEOUT_S)
        else:
            libs = manifest.extra.get("build", {}).get("libs", [])
            code = _cpp_test(directory, libs)
    except RuntimeErrorBase as exc:
        return fail(exc.message, EXIT_ERROR)
    if code != 0:
        return fail(f"tests of {manifest.name} failed (exit {code})", EXIT_ERROR)
    say(f"tests of {manifest.name} passed")
    return 0


def _node_test(directory: Path) -> int:
    from runtimes.launchers import node_executable
    from runtimes.nodebuild import stage_node_tests

    with tempfile.TemporaryDirectory(prefix="edgefn-nodetest-") as tmp:
        work = Path(tmp) / "src"
        stage_node_tests(directory, work, say)
        return _run([node_executable(), "--test"], work)


def _cpp_test(directory: Path, libs: list[str]) -> int:
    from runtimes.cppbuild import SDK_INCLUDE, SOURCE_SUFFIXES, compiler_for

    sources = [str(p) for p in sorted(directory.iterdir()) if p.suffix in SOURCE_SUFFIXES]
    tests = [str(p) for p in sorted((directory / "test").glob("*")) if p.suffix in SOURCE_SUFFIXES]
    if not tests:
        print(f"edge-cloud: no tests in {directory / 'test'}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="edgefn-cpptest-") as tmp:
        exe = Path(tmp) / "test"
        link = [lib if lib.startswith("-l") else f"-l{lib}" for lib in libs]
        argv = [compiler_for(None), "-std=c++17", "-O1", "-pthread", "-I", str(directory)]
        argv += ["-I", str(SDK_INCLUDE), *sources, *tests, "-o", str(exe), *link]
        code = _run(argv, directory)
        if code != 0:
            return code
        return _run([str(exe)], directory)
