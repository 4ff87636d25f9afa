"""Runtime name -> how to start that function: a small table, picked by the manifest's runtime.

Executables are resolved to absolute paths once (a `python3`/`node` shim on PATH can cost ~150 ms
per start). Every worker command is wrapped by `hardware.limits.wrap_command`-style code passed in
by the caller (parent-death signal, rlimits, unprivileged user), so `runtimes` stays free of
policy about *which* limits apply.
"""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from runtimes.capabilities import CapabilityHandler
from runtimes.errors import ManifestError, ToolchainError
from runtimes.invocation import Executor
from runtimes.manifest import Manifest
from runtimes.pool import Pool
from runtimes.sandbox import Sandbox
from runtimes.worker import worker_env

NODE_BOOTSTRAP = Path(__file__).resolve().parent / "node" / "bootstrap.mjs"


@functools.cache
def node_executable() -> str:
    """The real `node` binary (EDGEFN_NODE overrides), symlinks and shims resolved."""
    configured = os.environ.get("EDGEFN_NODE")
    found = configured or shutil.which("node")
    if not found or not os.access(found, os.X_OK):
        where = f"EDGEFN_NODE={configured}" if configured else "PATH"
        raise ToolchainError(
            f"Node.js is not installed (no 'node' on {where}); install it "
            '(e.g. apt-get install nodejs) to run runtime = "node" functions'
        )
    return os.path.realpath(found)


def _artifact(manifest: Manifest, function_dir: Path, suffix: str = "") -> Path:
    path = (function_dir / (manifest.entry + suffix)).resolve()
    if not path.is_relative_to(function_dir.resolve()):
        raise ManifestError(f"{manifest.name}: entry {manifest.entry!r} leaves the function dir")
    if not path.is_file():
        raise ManifestError(
            f"{function_dir / 'edgefn.toml'}: field 'entry' names {manifest.entry + suffix!r}, "
            "which does not exist (build the function first)"
        )
    return path


def command_for(manifest: Manifest, function_dir: Path) -> list[str]:
    """argv that starts one worker of this function (without limit wrappers)."""
    if manifest.runtime == "node":
        entry = _artifact(manifest, function_dir)
        flags = []
        if manifest.limits.memory_mb:
            # V8 enforces its heap limit itself ("JavaScript heap out of memory"), which holds
            # even where no cgroup can; buffers outside the heap are left to the watchdog.
            flags.append(f"--max-old-space-size={manifest.limits.memory_mb}")
        return [node_executable(), *flags, str(NODE_BOOTSTRAP), str(entry), manifest.handler]
    entry = _artifact(manifest, function_dir)
    if not os.access(entry, os.X_OK):
        raise ManifestError(f"{entry}: the function's entry is not executable")
    return [str(entry)]


def make_executor(
    manifest: Manifest,
    function_dir: Path,
    *,
    sandbox: Sandbox | None = None,
    base_env: dict[str, str] | None = None,
    capabilities: CapabilityHandler | None = None,
    extra_env: Mapping[str, str] | None = None,
) -> Executor:
    """Build (not start) the executor that runs this function.

    `extra_env` reaches the workers past the environment allow-list (the agent's own
    per-function values, e.g. the Dapr endpoint's port and token)."""
    if manifest.runtime == "cpp" and manifest.isolation == "in-process":
        from runtimes.cpp.inproc import InProcessExecutor

        return InProcessExecutor(manifest, function_dir, capabilities=capabilities)
    argv = command_for(manifest, function_dir)
    env = worker_env(
        os.environ if base_env is None else base_env,
        {
            "EDGEFN_FUNCTION": manifest.name,
            "EDGEFN_VERSION": manifest.version,
            "EDGEFN_FUNCTION_DIR": str(function_dir),
            "EDGEFN_CONCURRENCY": str(manifest.pool.concurrency),
            **manifest.env,
            **(extra_env or {}),
        },
    )
    return Pool(
        manifest, function_dir, lambda: argv, env=env, sandbox=sandbox, capabilities=capabilities
    )
