"""Build a function directory in place for this machine: the one entry point that picks the
toolchain by the manifest's runtime (Go -> `gobuild`, C++ -> `cppbuild`, Node needs none).

Used by the demo (`make run`), the tests and the bundle builder. Blocking: call it from a CLI or
through `asyncio.to_thread`.
"""

from __future__ import annotations

from pathlib import Path

from runtimes.manifest import MANIFEST_NAME, Manifest, load_manifest


def build_function(directory: Path, *, arch: str | None = None) -> Manifest:
    """Compile the function in `directory` so that its `entry` exists; return its manifest."""
    manifest = load_manifest(directory / MANIFEST_NAME)
    if manifest.runtime == "go":
        from runtimes.gobuild import build_go

        build_go(directory, directory / manifest.entry, goarch=arch)
    elif manifest.runtime == "cpp":
        from runtimes.cppbuild import build_cpp

        libs = manifest.extra.get("build", {}).get("libs", [])
        build_cpp(directory, directory, manifest.entry, arch=arch, libs=libs)
    return manifest
