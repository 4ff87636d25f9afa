"""`edge-cloud fn build DIR --key FILE [--out B] [--arch LIST]`: compile, pack, sign.

Flow: read edgefn.toml -> load the key (fail before a long build) -> per target arch (host
first, then `--arch`; names from `hardware.arch`) compile into a private payload dir (Go
cross-compiles with GOARCH/GOARM; C++ uses the g++ cross compiler when installed, else prints
"skipped <arch>" and goes on; Node is arch-independent: one common payload staged by
`runtimes.nodebuild`) -> `runtimes.bundle.build_bundle` packs, checks what a device will check,
and signs, with `created_at` from `runtimes.sources.source_epoch` so that the same sources and
key build the same bytes. Progress goes to stdout; the bundle path is always the last line, so
scripts can take `| tail -1`.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import tempfile
from pathlib import Path

from cloud_sync.author.arches import target_arches
from cloud_sync.author.output import EXIT_ERROR, EXIT_USAGE, fail, say, timed
from hardware.arch import Arch
from runtimes.manifest import Manifest


def arch_label(arches: list[str] | tuple[str, ...]) -> str:
    """How the author output names a bundle's arches: "any" when it has none (Node)."""
    return ", ".join(arches) or "any (arch-independent)"


def build_payloads(src: Path, manifest: Manifest, arches: list[Arch], tmp: Path) -> dict[str, Path]:
    """Go/C++: one payload dir per arch that could be built (artifact key -> dir)."""
    from runtimes.errors import ToolchainError

    payloads: dict[str, Path] = {}
    if manifest.runtime == "go":
        from runtimes.gobuild import build_go

        for arch in arches:
            out = tmp / arch.name
            goarm = f", GOARM={arch.goarm}" if arch.goarm else ""
            what = (
                f"go: building {manifest.name} for {arch.bundle_key} (GOARCH={arch.goarch}{goarm})"
            )
            timed(what, functools.partial(build_go, src, out / manifest.entry, goarch=arch.name))
            payloads[arch.bundle_key] = out
    elif manifest.runtime == "cpp":
        from runtimes.cppbuild import build_cpp

        libs = manifest.extra.get("build", {}).get("libs", [])
        for i, arch in enumerate(arches):
            out = tmp / arch.name
            out.mkdir()
            build = functools.partial(
                build_cpp, src, out, manifest.entry, arch=None if i == 0 else arch.name, libs=libs
            )
            try:
                timed(f"c++: building {manifest.name} for {arch.bundle_key}", build)
            except ToolchainError as exc:
                if i == 0:
                    raise
                say(f"skipped {arch.name}: install {arch.cross_package} ({exc.message})")
                continue
            payloads[arch.bundle_key] = out
    return payloads


def include_common(src: Path, manifest: Manifest, tmp: Path) -> Path | None:
    """Go/C++: files named by [build] include (globs) go into the common payload."""
    from runtimes.errors import BuildError

    patterns = manifest.extra.get("build", {}).get("include", [])
    if not patterns:
        return None
    common = tmp / "common"
    for pattern in patterns:
        matches = sorted(src.glob(pattern))
        if not matches:
            raise BuildError(f"[build] include: {pattern!r} matches nothing in {src}")
        for path in matches:
            rel = path.relative_to(src)
            dest = common / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            if path.is_dir():
                shutil.copytree(path, dest, symlinks=True, dirs_exist_ok=True)
            else:
                shutil.copy2(path, dest, follow_symlinks=False)
    return common


def cmd_fn_build(args: argparse.Namespace) -> int:
    from runtimes.bundle import build_bundle
    from runtimes.errors import RuntimeErrorBase
    from runtimes.manifest import MANIFEST_NAME, load_manifest
    from runtimes.nodebuild import stage_node
    from runtimes.signing import key_id, load_private_key
    from runtimes.sources import rfc3339, source_epoch

    src: Path = args.dir.resolve()
    try:
        manifest = load_manifest(src / MANIFEST_NAME)
        key = load_private_key(args.key)
        arches = target_arches(args.arch)
    except RuntimeErrorBase as exc:
        return fail(exc.message, EXIT_USAGE)
    except ValueError as exc:
        return fail(str(exc), EXIT_USAGE)
    out: Path = (args.out or Path(f"{manifest.name}-{manifest.version}.efb")).absolute()
    say(f"building {manifest.name} {manifest.version} ({manifest.runtime}) from {src}")
    # Dated before the build: a package-lock.json the build writes keeps this date.
    built_outputs = (manifest.entry, f"{manifest.entry}.so")
    created_at = rfc3339(source_epoch(src, exclude=built_outputs))
    try:
        with tempfile.TemporaryDirectory(prefix="edgefn-build-") as tmp_s:
            tmp = Path(tmp_s)
            common: Path | None
            if manifest.runtime == "node":
                if args.arch:
                    say("node: arch-independent, one bundle runs on every arch")
                common = tmp / "common"
                stage_node(src, common, say)
                payloads: dict[str, Path] = {}
            else:
                payloads = build_payloads(src, manifest, arches, tmp)
                common = include_common(src, manifest, tmp)
            timed(
                f"packing and signing ({arch_label(tuple(payloads))}) with key {key_id(key)}",
                lambda: build_bundle(manifest, payloads, common, key, out, created_at=created_at),
            )
    except RuntimeErrorBase as exc:
        return fail(f"build of {manifest.name} failed: {exc.message}", EXIT_ERROR)
    except OSError as exc:
        return fail(f"build of {manifest.name} failed: {exc}", EXIT_ERROR)
    say(f"built {manifest.name} {manifest.version} for {arch_label(tuple(payloads))}")
    say(str(out))
    return 0
