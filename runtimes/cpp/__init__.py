"""C++ functions: one source, two ways to run it.

- `process` isolation (the default): the source is linked with the SDK's worker main into an
  executable `<entry>` that speaks docs/protocol.md; the warm pool runs it like a Go worker.
- `in-process` isolation: the source is linked into `<entry>.so`, loaded into the agent by the
  pybind11 host (`runtimes.cpp._host`) and driven by `runtimes.cpp.inproc.InProcessExecutor`.

Both artifacts come from `runtimes.cppbuild.build_cpp`. The C ABI is `include/edgefn.h`, the
author-facing layer `include/edgefn.hpp`, the worker host `include/edgefn_worker.hpp`.
"""

from __future__ import annotations

from pathlib import Path

from runtimes.errors import ManifestError
from runtimes.manifest import Manifest

INCLUDE_DIR = Path(__file__).resolve().parent / "include"
INPROC_SUFFIX = ".so"


def inproc_artifact(manifest: Manifest, function_dir: Path) -> Path:
    """The in-process library of a C++ function: `<function_dir>/<entry>.so`."""
    root = function_dir.resolve()
    path = (root / (manifest.entry + INPROC_SUFFIX)).resolve()
    if not path.is_relative_to(root):
        raise ManifestError(f"{manifest.name}: entry {manifest.entry!r} leaves the function dir")
    return path


def worker_artifact(manifest: Manifest, function_dir: Path) -> Path:
    """The isolated worker executable of a C++ function: `<function_dir>/<entry>`."""
    root = function_dir.resolve()
    path = (root / manifest.entry).resolve()
    if not path.is_relative_to(root):
        raise ManifestError(f"{manifest.name}: entry {manifest.entry!r} leaves the function dir")
    return path
