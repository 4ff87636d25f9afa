"""Stage a Node function for a bundle (or for its tests): its files plus its npm dependencies.

Node functions are arch-independent: a bundle carries one common payload and no per-arch
artifacts. The flow of `stage_node`:

1. copy the author's directory without what a device does not need (`runtimes.sources`:
   VCS data, bundles, the function's own tests; node_modules is never copied);
2. with dependencies in package.json, install them into the copy with npm (`npm ci` when there
   is a package-lock.json, else `npm install`), production only, no install scripts, no bin
   symlinks; the lock file npm wrote is kept next to the author's package.json when they had
   none, so the next build installs the same versions instead of floating;
3. prune the test and benchmark folders npm packages publish.

`stage_node_tests` does steps 1-2 with the function's tests and dev dependencies, for
`edge-cloud fn test`. npm runs on the build machine only; devices never run it.
Blocking: callers on an event loop use `asyncio.to_thread`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from runtimes.errors import BuildError
from runtimes.sources import copy_function, prune_packages, source_epoch
from runtimes.toolchain import run_tool

# npm talks to the registry; a wedged network must end in an error, not a hung build.
NPM_TIMEOUT_S = 600.0
LOCK_FILE = "package-lock.json"

Say = Callable[[str], None]


def _quiet(_line: str) -> None:
    pass


def dependencies(package_json: Path) -> dict[str, str]:
    """The `dependencies` table of a package.json ({} when the file is absent)."""
    if not package_json.exists():
        return {}
    try:
        doc = json.loads(package_json.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BuildError(f"{package_json}: not valid JSON: {exc}") from exc
    deps = doc.get("dependencies") if isinstance(doc, dict) else None
    return dict(deps) if isinstance(deps, dict) else {}


def _dev_dependencies(package_json: Path) -> dict[str, str]:
    doc = json.loads(package_json.read_text(encoding="utf-8"))
    deps = doc.get("devDependencies") if isinstance(doc, dict) else None
    return dict(deps) if isinstance(deps, dict) else {}


def _npm_install(stage: Path, *, production: bool, count: int, say: Say) -> str:
    """Run npm in `stage`; returns the verb used ("ci" or "install")."""
    npm = shutil.which("npm")
    if npm is None:
        raise BuildError("npm is not installed; it installs the function's dependencies")
    verb = "ci" if (stage / LOCK_FILE).exists() else "install"
    # --no-bin-links: bundles hold no symlinks; --ignore-scripts: no dependency code runs on the
    # build machine (native addons, which need install scripts, would be arch-specific anyway).
    argv = [npm, verb, "--no-bin-links", "--ignore-scripts", "--no-audit", "--no-fund"]
    argv += ["--loglevel=error"]
    if production:
        argv.append("--omit=dev")
    say(f"node: npm {verb}{' --omit=dev' if production else ''} ({count} dependencies) ...")
    run_tool(argv, what=f"npm {verb}", timeout=NPM_TIMEOUT_S, cwd=stage)
    return verb


def _keep_lock(src: Path, stage: Path, say: Say) -> None:
    """Write npm's lock file next to the author's package.json when they had none.

    Its mtime is set to the sources' date from before it existed, so writing it does not
    change the next build's `created_at` (and with it the bundle bytes).
    """
    target = src / LOCK_FILE
    made = stage / LOCK_FILE
    if target.exists() or not made.exists():
        return
    epoch = source_epoch(src)
    tmp = target.with_name(f".{LOCK_FILE}.{os.getpid()}.tmp")
    try:
        shutil.copyfile(made, tmp)
        os.utime(tmp, (epoch, epoch))
        os.replace(tmp, target)
    except OSError as exc:
        say(f"warning: cannot write {target} ({exc.strerror}); versions may float")
        return
    finally:
        tmp.unlink(missing_ok=True)
    say(f"node: wrote {target} (commit it: the next build installs these exact versions)")


def stage_node(src: Path, stage: Path, say: Say = _quiet) -> None:
    """Copy the function into `stage` (new dir) with production dependencies installed."""
    src = Path(src).resolve()
    copy_function(src, stage, drop_tests=True)
    deps = dependencies(stage / "package.json")
    if not (stage / "package.json").exists():
        say("node: no package.json, no dependencies to install")
        return
    if not deps:
        say("node: package.json has no dependencies")
        return
    _npm_install(stage, production=True, count=len(deps), say=say)
    _keep_lock(src, stage, say)
    removed = prune_packages(stage / "node_modules")
    if removed:
        say(f"node: left out {len(removed)} test/benchmark folders of npm packages")
    native = sorted(p.relative_to(stage) for p in (stage / "node_modules").rglob("*.node"))
    if native:
        say(f"warning: native addons ({', '.join(map(str, native[:3]))}) only run on this arch")


def stage_node_tests(src: Path, stage: Path, say: Say = _quiet) -> None:
    """Copy the function with its tests into `stage`, all dependencies (dev too) installed."""
    src = Path(src).resolve()
    copy_function(src, stage, drop_tests=False)
    package = stage / "package.json"
    if not package.exists():
        return
    count = len(dependencies(package)) + len(_dev_dependencies(package))
    if count:
        _npm_install(stage, production=False, count=count, say=say)
        _keep_lock(src, stage, say)
