"""Builds a C++ function's source directory into its two artifacts with the system g++.

One source, two forms (docs/runtime-cpp.md):

- `<entry>.so`: the in-process library, loaded by `runtimes.cpp.inproc` with dlopen;
- `<entry>`: the isolated worker executable, the same objects linked with the SDK's worker main
  (`runtimes/cpp/worker_main.cpp`), started by the warm pool.

Flow: pick the compiler for the target arch -> compile every `*.cpp`/`*.cc` at the top of the
source directory once into position-independent objects (shared by both links) -> link the `.so`
with a version script that exports only the two C ABI symbols -> compile the worker main and link
the executable. Both are linked in a scratch directory and moved into place, so a failed build
never leaves a half-written artifact where a previous good one was.

Blocking on purpose (the CLI calls it directly); async callers use `asyncio.to_thread`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from hardware.arch import TABLE, host_arch, lookup
from hardware.errors import UnknownArchitecture
from runtimes.errors import BuildError, ToolchainError
from runtimes.toolchain import run_tool

_CPP_DIR = Path(__file__).resolve().parent / "cpp"
SDK_INCLUDE = _CPP_DIR / "include"
WORKER_MAIN = _CPP_DIR / "worker_main.cpp"

# The flags every function gets. -fvisibility=hidden plus the version script keep the library's
# dynamic symbol table down to the ABI, so two functions in one agent can never bind to each
# other's symbols. -fno-gnu-unique keeps dlclose able to unload a library (g++ otherwise marks
# libraries with inline statics "unique", which pins them in memory).
CXXFLAGS: tuple[str, ...] = (
    "-O2",
    "-fPIC",
    "-fvisibility=hidden",
    "-fvisibility-inlines-hidden",
    "-fno-gnu-unique",
    "-std=c++17",
    "-pthread",
)
EXPORTED_SYMBOLS: tuple[str, ...] = ("edgefn_abi_version", "edgefn_invoke", "edgefn_config_changed")
SOURCE_SUFFIXES = (".cpp", ".cc")
# One translation unit of a small function compiles in seconds; minutes means a runaway template
# or a stuck toolchain, and the caller deserves an error instead of a hang.
COMPILE_TIMEOUT_S = 600.0


def compiler_for(arch: str | None = None) -> str:
    """Absolute path of the g++ that targets `arch` (None: this machine), or ToolchainError.

    `arch` is any spelling `hardware.arch` accepts (x86_64, arm64, armhf, linux-armv7l, ...).
    """
    host = host_arch()
    try:
        target = lookup(arch) if arch else host
    except UnknownArchitecture as exc:
        known = ", ".join(a.name for a in TABLE)
        raise ToolchainError(
            f"no known C++ cross compiler for arch {arch!r}; known: {known}"
        ) from exc
    if target == host:
        found = shutil.which("g++")
        if not found:
            raise ToolchainError(
                'g++ is not installed; it builds runtime = "cpp" functions (apt-get install g++)'
            )
        return found
    found = shutil.which(f"{target.triple}-g++")
    if not found:
        raise ToolchainError(
            f"{target.triple}-g++ is not installed, so the {target.name} artifacts are skipped; "
            f"install the Debian package {target.cross_package} to build them"
        )
    return found


def _run(argv: list[str], what: str) -> None:
    run_tool(argv, what=what, timeout=COMPILE_TIMEOUT_S)


def _sources(src_dir: Path) -> list[Path]:
    found = sorted(p for p in src_dir.iterdir() if p.suffix in SOURCE_SUFFIXES and p.is_file())
    if not found:
        raise BuildError(f"{src_dir}: no C++ sources ({', '.join(SOURCE_SUFFIXES)}) to build")
    return found


def build_cpp(
    src_dir: Path,
    out_dir: Path,
    entry: str,
    *,
    arch: str | None = None,
    libs: Sequence[str] = (),
) -> tuple[Path, Path]:
    """Compile `src_dir` into `out_dir/<entry>.so` and `out_dir/<entry>`; returns both paths.

    `libs` are extra libraries to link, by name ("m", "z") or as "-lname". Compile errors raise
    BuildError with the end of the compiler output; a missing (cross) compiler ToolchainError.
    """
    cxx = compiler_for(arch)
    src_dir = Path(src_dir).resolve()
    out_dir = Path(out_dir).resolve()
    so_path = out_dir / f"{entry}.so"
    exe_path = out_dir / entry
    sources = _sources(src_dir)
    link_libs = [lib if lib.startswith("-l") else f"-l{lib}" for lib in libs]
    includes = ["-I", str(src_dir), "-I", str(SDK_INCLUDE)]

    exe_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgefn-cppbuild-", dir=exe_path.parent) as tmp:
        scratch = Path(tmp)
        objects: list[str] = []
        for index, source in enumerate(sources):
            obj = scratch / f"{index}-{source.stem}.o"
            _run([cxx, *CXXFLAGS, *includes, "-c", str(source), "-o", str(obj)], str(source))
            objects.append(str(obj))

        script = scratch / "exports.map"
        script.write_text(
            "{\n  global:\n"
            + "".join(f"    {name};\n" for name in EXPORTED_SYMBOLS)
            + "  local:\n    *;\n};\n",
            encoding="utf-8",
        )
        tmp_so = scratch / "out.so"
        _run(
            [
                cxx,
                "-shared",
                "-pthread",
                f"-Wl,--version-script={script}",
                # Unresolved symbols fail here, not later as a dlopen error on a device.
                "-Wl,-z,defs",
                "-o",
                str(tmp_so),
                *objects,
                *link_libs,
            ],
            f"linking {so_path.name}",
        )

        main_obj = scratch / "worker_main.o"
        _run(
            [cxx, *CXXFLAGS, *includes, "-c", str(WORKER_MAIN), "-o", str(main_obj)],
            "compiling the worker main",
        )
        tmp_exe = scratch / "out.exe"
        _run(
            [cxx, "-pthread", "-o", str(tmp_exe), *objects, str(main_obj), *link_libs],
            f"linking {exe_path.name}",
        )
        # os.replace, not copy: an agent may have the old .so mapped; a new inode leaves it intact.
        os.replace(tmp_so, so_path)
        os.replace(tmp_exe, exe_path)
    return so_path, exe_path
