"""The in-process C++ host and the C++ build step, with real g++-built libraries.

The conformance function (tests/functions/conformance/cpp) is built once per module with
`runtimes.cppbuild.build_cpp`; small hostile libraries (no entry point, wrong ABI) and a
rendezvous library for the concurrency check are compiled here with g++ directly.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import platform
import shutil
import subprocess
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from runtimes.cpp import INCLUDE_DIR
from runtimes.cpp.inproc import InProcessExecutor
from runtimes.cppbuild import EXPORTED_SYMBOLS, build_cpp, compiler_for
from runtimes.errors import (
    BuildError,
    BundleError,
    FunctionError,
    InvocationTimeout,
    ManifestError,
    Overloaded,
    ToolchainError,
    Unavailable,
)
from runtimes.invocation import Invocation
from runtimes.manifest import Manifest, parse_manifest

CONFORMANCE_DIR = Path(__file__).resolve().parent / "functions" / "conformance" / "cpp"

# Blocks until `n` calls are inside at once (or 10 s passed): proves calls really overlap
# without measuring time. "tid" answers the OS thread id the call ran on.
RENDEZVOUS_SRC = r"""
#include <edgefn.hpp>
#include <sys/syscall.h>
#include <unistd.h>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <string>

namespace {
std::mutex mu;
std::condition_variable cv;
int arrived = 0;

std::string handle(std::string_view req) {
    if (req == "tid") return std::to_string(static_cast<long>(syscall(SYS_gettid)));
    int n = std::stoi(std::string(req));
    std::unique_lock<std::mutex> lock(mu);
    ++arrived;
    cv.notify_all();
    bool met = cv.wait_for(lock, std::chrono::seconds(10), [n] { return arrived >= n; });
    return met ? "met" : "alone";
}
}  // namespace
EDGEFN_FUNCTION(handle)
"""

NO_ENTRY_SRC = (
    'extern "C" __attribute__((visibility("default"))) int something_else() { return 1; }'
)

WRONG_ABI_SRC = r"""
#include <edgefn.h>
extern "C" uint32_t edgefn_abi_version(void) { return 999; }
extern "C" int32_t edgefn_invoke(const edgefn_call*) { return EDGEFN_OK; }
"""


def compile_so(source: str, out: Path) -> Path:
    src = out.with_suffix(".cpp")
    src.write_text(source, encoding="utf-8")
    flags = ["-O2", "-fPIC", "-shared", "-std=c++17", "-pthread", "-I", str(INCLUDE_DIR)]
    subprocess.run(
        [compiler_for(), *flags, "-o", str(out), str(src)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return out


@pytest.fixture(scope="module")
def conformance_so(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cpp-conformance")
    so_path, _ = build_cpp(CONFORMANCE_DIR, out, "conformance")
    return so_path


@pytest.fixture(scope="module")
def rendezvous_so(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_so(RENDEZVOUS_SRC, tmp_path_factory.mktemp("cpp-rdv") / "rendezvous.so")


def manifest(**fields: Any) -> Manifest:
    pool = fields.pop("pool", {})
    return parse_manifest(
        {
            "name": "conformance-cpp",
            "version": "1.0.0",
            "runtime": "cpp",
            "entry": "conformance",
            "isolation": "in-process",
            "timeout_ms": 5000,
            "pool": pool,
            **fields,
        }
    )


@pytest.fixture
async def make_executor(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    made: list[InProcessExecutor] = []

    async def make(library: Path, **fields: Any) -> InProcessExecutor:
        ex = InProcessExecutor(manifest(**fields), tmp_path, library=library)
        made.append(ex)
        await ex.start()
        return ex

    yield make
    for ex in made:
        await ex.close(drain_s=10)


def inv(payload: bytes, *, timeout_s: float = 5.0, request_id: str = "r1", **kw: Any) -> Invocation:
    return Invocation(payload=payload, request_id=request_id, timeout_s=timeout_s, **kw)


def op(name: str, **fields: Any) -> bytes:
    return json.dumps({"op": name, **fields}).encode()


def mapped(path: Path) -> bool:
    return str(path) in Path("/proc/self/maps").read_text()


MODES = [pytest.param(True, id="inline"), pytest.param(False, id="pooled")]


# --- ABI refusal ---------------------------------------------------------------------------


async def test_refuses_library_without_entry_point(tmp_path: Path) -> None:
    lib = compile_so(NO_ENTRY_SRC, tmp_path / "noentry.so")
    ex = InProcessExecutor(manifest(), tmp_path, library=lib)
    with pytest.raises(BundleError) as err:
        await ex.start()
    message = str(err.value)
    assert str(lib) in message
    assert "edgefn_invoke" in message and "edgefn_abi_version" in message
    assert "does not export" in message
    assert not mapped(lib)  # refused libraries are not left loaded


async def test_refuses_wrong_abi_version(tmp_path: Path) -> None:
    lib = compile_so(WRONG_ABI_SRC, tmp_path / "wrongabi.so")
    ex = InProcessExecutor(manifest(), tmp_path, library=lib)
    with pytest.raises(BundleError) as err:
        await ex.start()
    message = str(err.value)
    assert str(lib) in message
    assert "version 999" in message and "versions 1 to 2" in message
    assert not mapped(lib)


# A library built against ABI 1 (before building blocks): the struct it knows is a prefix of
# version 2's, so the host still loads and runs it.
ABI1_SRC = r"""
#include <cstring>
#include <edgefn.h>
extern "C" uint32_t edgefn_abi_version(void) { return 1; }
extern "C" int32_t edgefn_invoke(const edgefn_call* c) {
    uint8_t* out = c->alloc(c->host, c->payload_len);
    if (out) std::memcpy(out, c->payload, c->payload_len);
    return EDGEFN_OK;
}
"""


async def test_a_library_of_abi_version_1_still_loads_and_answers(tmp_path: Path) -> None:
    lib = compile_so(ABI1_SRC, tmp_path / "abi1.so")
    ex = InProcessExecutor(manifest(), tmp_path, library=lib)
    await ex.start()
    try:
        assert (await ex.invoke(Invocation(b"old", "r-1", 5.0))).payload == b"old"
    finally:
        await ex.close()


async def test_inline_functions_hear_unavailable_for_building_blocks(
    tmp_path: Path, conformance_so: Path
) -> None:
    """Inline calls run on the loop thread: waiting there for the loop would deadlock, so the
    host refuses the call itself, and the function still answers."""

    class Never:
        async def call(self, manifest: Manifest, call: Any) -> bytes:
            raise AssertionError("an inline call must not reach the handler")

    ex = InProcessExecutor(
        manifest(inline=True), tmp_path, library=conformance_so, capabilities=Never()
    )
    await ex.start()
    try:
        req = json.dumps({"op": "blocks", "calls": [{"op": "config", "target": ""}]}).encode()
        answer = await ex.invoke(Invocation(req, "r-2", 5.0, content_type="application/json"))
        result = json.loads(answer.payload)["results"][0]
        assert result["code"] == "unavailable" and "inline" in result["message"]
    finally:
        await ex.close()


async def test_refuses_an_executable(tmp_path: Path, conformance_so: Path) -> None:
    exe = conformance_so.with_suffix("")  # the worker executable of the same build
    with pytest.raises(BundleError, match="cannot load"):
        await InProcessExecutor(manifest(), tmp_path, library=exe).start()


async def test_missing_library_names_the_file(tmp_path: Path) -> None:
    ex = InProcessExecutor(manifest(), tmp_path)
    assert ex.library_path == (tmp_path / "conformance.so").resolve()
    with pytest.raises(ManifestError, match=r"conformance\.so"):
        await ex.start()


# --- calls -----------------------------------------------------------------------------------


@pytest.mark.parametrize("inline", MODES)
async def test_echo_is_byte_exact(
    make_executor: Callable[..., Any], conformance_so: Path, inline: bool
) -> None:
    ex = await make_executor(conformance_so, inline=inline)
    payload = b"\x00\xff" + bytes(range(256)) * 64 + b"\x00"
    result = await ex.invoke(inv(payload))
    assert result.payload == payload
    assert result.content_type == "application/octet-stream"
    assert (await ex.invoke(inv(b""))).payload == b""
    assert ex.status().invocations == 2


@pytest.mark.parametrize("inline", MODES)
async def test_context_and_json_answer(
    make_executor: Callable[..., Any], conformance_so: Path, inline: bool
) -> None:
    ex = await make_executor(conformance_so, inline=inline)
    result = await ex.invoke(
        inv(op("context"), request_id="req-7", trace_id="t-1", content_type="application/json")
    )
    assert result.content_type == "application/json"
    body = json.loads(result.payload)
    assert body["request_id"] == "req-7"
    assert body["function"] == "conformance-cpp"
    assert body["version"] == "1.0.0"
    assert body["trace_id"] == "t-1"
    assert 0 < body["deadline_ms_left"] <= 5000


@pytest.mark.parametrize("inline", MODES)
@pytest.mark.parametrize(
    ("request_body", "message"),
    [
        (op("throw", message="bad input"), "bad input"),
        (op("panic", message="deep down"), "deep down"),
        (op("throw_nonstd"), "not derived from std::exception"),
    ],
    ids=["std-exception", "nested-throw", "throw-42"],
)
async def test_exceptions_become_function_errors(
    make_executor: Callable[..., Any],
    conformance_so: Path,
    inline: bool,
    request_body: bytes,
    message: str,
) -> None:
    ex = await make_executor(conformance_so, inline=inline)
    with pytest.raises(FunctionError) as err:
        await ex.invoke(inv(request_body))
    assert message in str(err.value)
    assert err.value.code == "function_error" and err.value.status == 500
    assert (await ex.invoke(inv(b"still fine"))).payload == b"still fine"
    assert ex.status().errors == 1


async def test_logs_reach_the_agent_log(
    make_executor: Callable[..., Any], conformance_so: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ex = await make_executor(conformance_so)
    with caplog.at_level("INFO", logger="edgefn.cpp"):
        result = await ex.invoke(inv(op("log", message="hello from C++"), request_id="r42"))
    assert json.loads(result.payload) == {"logged": True}
    lines = [r for r in caplog.records if r.name == "edgefn.cpp"]
    assert any("hello from C++" in r.getMessage() and "r42" in r.getMessage() for r in lines)


async def test_inline_runs_on_the_loop_thread_pooled_does_not(
    make_executor: Callable[..., Any], rendezvous_so: Path
) -> None:
    loop_tid = threading.get_native_id()
    inline = await make_executor(rendezvous_so, inline=True)
    pooled = await make_executor(rendezvous_so, inline=False)
    assert int((await inline.invoke(inv(b"tid"))).payload) == loop_tid
    assert int((await pooled.invoke(inv(b"tid"))).payload) != loop_tid


async def test_pooled_calls_run_concurrently(
    make_executor: Callable[..., Any], rendezvous_so: Path
) -> None:
    ex = await make_executor(rendezvous_so, pool={"concurrency": 4})
    assert ex.status().threads == 4
    # Each call waits inside the library until all four are in: only true concurrency meets.
    results = await asyncio.gather(*(ex.invoke(inv(b"4", timeout_s=30)) for _ in range(4)))
    assert [r.payload for r in results] == [b"met"] * 4


async def test_pool_is_bounded(make_executor: Callable[..., Any], conformance_so: Path) -> None:
    ex = await make_executor(conformance_so, pool={"concurrency": 1, "max_queue": 0})
    busy = asyncio.ensure_future(ex.invoke(inv(op("sleep", ms=300))))
    await asyncio.sleep(0)
    with pytest.raises(Overloaded):
        await ex.invoke(inv(b"x"))
    assert json.loads((await busy).payload) == {"slept": 300}


# --- deadlines -------------------------------------------------------------------------------


async def test_inline_overrun_is_a_timeout_and_counted(
    make_executor: Callable[..., Any], conformance_so: Path
) -> None:
    ex = await make_executor(conformance_so, inline=True)
    with pytest.raises(InvocationTimeout) as err:
        await ex.invoke(inv(op("sleep", ms=300), timeout_s=0.05))
    assert err.value.status == 504
    status = ex.status()
    assert status.overruns == 1 and status.timeouts == 1
    assert (await ex.invoke(inv(b"next"))).payload == b"next"


async def test_pooled_overrun_answers_at_the_deadline_and_is_counted(
    make_executor: Callable[..., Any], conformance_so: Path
) -> None:
    ex = await make_executor(conformance_so)
    with pytest.raises(InvocationTimeout):
        await ex.invoke(inv(op("sleep", ms=600), timeout_s=0.05))
    status = ex.status()
    # The caller has its 504 while the call still holds its thread: it cannot be stopped.
    assert status.overruns == 1
    assert status.overdue_running == 1 and status.running == 1
    for _ in range(200):  # bounded: the sleep ends after 0.6 s
        if ex.status().in_flight == 0:
            break
        await asyncio.sleep(0.02)
    status = ex.status()
    assert status.in_flight == 0 and status.overdue_running == 0
    assert status.overruns == 1


# --- unloading -------------------------------------------------------------------------------


@pytest.mark.parametrize("inline", MODES)
async def test_close_unloads_the_library(
    tmp_path: Path, conformance_so: Path, inline: bool
) -> None:
    private = tmp_path / "conformance.so"  # a private path: dlopen shares handles per file
    shutil.copyfile(conformance_so, private)
    ex = InProcessExecutor(manifest(inline=inline), tmp_path)
    await ex.start()
    assert mapped(private)
    await ex.invoke(inv(b"x"))
    await ex.close()
    assert not mapped(private)
    assert ex.status().loaded is False and ex.status().health == "stopped"
    with pytest.raises(Unavailable):
        await ex.invoke(inv(b"x"))


async def test_close_waits_for_running_calls_before_unloading(
    tmp_path: Path, conformance_so: Path
) -> None:
    private = tmp_path / "conformance.so"
    shutil.copyfile(conformance_so, private)
    ex = InProcessExecutor(manifest(), tmp_path)
    await ex.start()
    call = asyncio.ensure_future(ex.invoke(inv(op("sleep", ms=500))))
    for _ in range(200):
        if ex.status().running == 1:
            break
        await asyncio.sleep(0.01)
    await ex.close(drain_s=0.01)  # gives up waiting: the running call must keep its code
    assert mapped(private)
    assert ex.status().health == "stopping"
    assert json.loads((await call).payload) == {"slept": 500}
    assert not mapped(private)  # the last call out unloaded it


async def test_close_refuses_calls_still_queued(tmp_path: Path, conformance_so: Path) -> None:
    ex = InProcessExecutor(manifest(pool={"concurrency": 1}), tmp_path, library=conformance_so)
    await ex.start()
    running = asyncio.ensure_future(ex.invoke(inv(op("sleep", ms=300))))
    queued = asyncio.ensure_future(ex.invoke(inv(b"never runs")))
    await asyncio.sleep(0)
    await ex.close(drain_s=0.01)
    with pytest.raises(Unavailable):
        await queued
    assert json.loads((await running).payload) == {"slept": 300}


# --- the build step --------------------------------------------------------------------------


def test_only_the_entry_points_are_exported(conformance_so: Path) -> None:
    out = subprocess.run(
        ["nm", "-D", "--defined-only", str(conformance_so)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    names = {line.split()[-1] for line in out.splitlines() if line.strip()}
    assert names == set(EXPORTED_SYMBOLS)


def test_build_produces_a_worker_executable(conformance_so: Path) -> None:
    exe = conformance_so.with_suffix("")
    assert exe.is_file() and os.access(exe, os.X_OK)


def test_compile_error_is_a_build_error(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "broken.cpp").write_text(
        "#include <edgefn.hpp>\nstd::string handle(std::string_view r) { return r + ; }\n"
        "EDGEFN_FUNCTION(handle)\n",
        encoding="utf-8",
    )
    with pytest.raises(BuildError) as err:
        build_cpp(src, tmp_path / "out", "broken")
    assert err.value.code == "build_failed" and err.value.status == 422
    assert "broken.cpp" in str(err.value) and "error" in str(err.value)
    assert not (tmp_path / "out" / "broken.so").exists()


def test_no_sources_is_a_build_error(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="no C\\+\\+ sources"):
        build_cpp(tmp_path, tmp_path / "out", "nothing")


def test_missing_gxx_is_a_toolchain_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH with no compiler on it
    with pytest.raises(ToolchainError, match="g\\+\\+ is not installed"):
        build_cpp(CONFORMANCE_DIR, tmp_path / "out", "conformance")


@pytest.mark.ci_may_skip("checks the cross compiler's absence; skips where it is installed")
def test_missing_cross_compiler_names_the_debian_package(tmp_path: Path) -> None:
    other = "x86_64" if platform.machine() == "aarch64" else "aarch64"
    triple = f"{other}-linux-gnu"
    if shutil.which(f"{triple}-g++"):
        pytest.skip(f"{triple}-g++ is installed here")
    with pytest.raises(ToolchainError) as err:
        build_cpp(CONFORMANCE_DIR, tmp_path / "out", "conformance", arch=other)
    assert "skipped" in str(err.value)
    assert f"g++-{triple.replace('_', '-')}" in str(err.value)


# --- the example -------------------------------------------------------------------------------

ROUTE_DIR = Path(__file__).resolve().parents[1] / "examples" / "route-cpp"


def haversine_m(a: tuple[float, float], b: tuple[float, float]) -> float:
    lat1, lon1, lat2, lon2 = map(math.radians, (*a, *b))
    h = (
        math.sin((lat2 - lat1) / 2) ** 2
        + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    )
    return 2 * 6371008.8 * math.asin(math.sqrt(h))


@pytest.mark.slow
async def test_route_example_same_source_both_modes(tmp_path: Path) -> None:
    from runtimes import protocol

    # One build, both artifacts: <entry>.so for in-process, <entry> for the worker.
    _, exe = await asyncio.to_thread(build_cpp, ROUTE_DIR, tmp_path, "route")
    paris, london, brussels = (48.8566, 2.3522), (51.5074, -0.1278), (50.8503, 4.3517)
    request = json.dumps({"points": [paris, brussels, london], "speed_kmh": 90}).encode()
    expected = haversine_m(paris, brussels) + haversine_m(brussels, london)

    route = parse_manifest(
        {"name": "route-cpp", "version": "1.0.0", "runtime": "cpp", "entry": "route"}
        | {"isolation": "in-process", "inline": True}
    )
    ex = InProcessExecutor(route, tmp_path)
    await ex.start()
    try:
        answer = json.loads((await ex.invoke(inv(request))).payload)
        with pytest.raises(FunctionError, match="at least two points"):
            await ex.invoke(inv(json.dumps({"points": [paris]}).encode()))
    finally:
        await ex.close()
    assert answer["legs"] == 2
    assert answer["distance_m"] == pytest.approx(expected, abs=0.1)
    assert answer["eta_s"] == pytest.approx(expected / (90 / 3.6), abs=0.1)

    proc = await asyncio.to_thread(
        subprocess.run,
        [str(exe)],
        input=protocol.encode_invoke(1, request, deadline_ms=5000),
        capture_output=True,
        timeout=30,
        check=True,
    )
    frames = list(protocol.FrameDecoder().feed(proc.stdout))
    kinds = [f.kind for f in frames]
    assert kinds == [protocol.Kind.READY, protocol.Kind.LOG, protocol.Kind.RESULT]
    assert frames[1].text(protocol.Key.LOG_LEVEL) == "debug"
    assert json.loads(frames[2].payload) == answer
