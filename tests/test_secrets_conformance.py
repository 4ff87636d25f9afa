"""The `secret` building-block call in every runtime (Node, Go, C++ worker and in process).

A real pool of the conformance function, with a recording capability handler in place of the
agent's broker (the broker's checks are tested in tests/test_secrets.py): the SDK's
`context.secret(name)` / `edgefn.Secret(ctx, name)` sends CALL `secret` with the name as TARGET,
gets the value's bytes back unchanged, and sees the broker's refusal codes.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from runtimes.capabilities import CapabilityCall, CapabilityNotFound, NotPermitted
from runtimes.cpp.inproc import InProcessExecutor
from runtimes.invocation import Invocation
from runtimes.launchers import make_executor
from runtimes.manifest import Manifest, load_manifest
from runtimes.pool import Pool


class SecretHandler:
    def __init__(self) -> None:
        self.calls: list[CapabilityCall] = []

    async def call(self, manifest: Manifest, call: CapabilityCall) -> bytes:
        self.calls.append(call)
        if call.op != "secret":
            raise CapabilityNotFound(f"unexpected op {call.op}")
        if call.target == "forbidden":
            raise NotPermitted("[permissions] secrets does not list 'forbidden'")
        if call.target == "missing":
            raise CapabilityNotFound("not delivered")
        return b"value-of-" + call.target.encode()


@pytest.fixture(params=["node", "go", "cpp", "cpp-inproc"])
async def pool(
    request: pytest.FixtureRequest, built_conformance: dict[str, Path]
) -> AsyncIterator[tuple[Pool | InProcessExecutor, SecretHandler]]:
    runtime, _, mode = str(request.param).partition("-")
    directory = built_conformance[runtime]
    handler = SecretHandler()
    manifest = load_manifest(directory / "edgefn.toml")
    executor: Pool | InProcessExecutor
    if mode == "inproc":  # C++ ctx.secret() through the pybind11 host
        executor = InProcessExecutor(
            manifest, directory, library=directory / f"{manifest.entry}.so", capabilities=handler
        )
    else:
        made = make_executor(manifest, directory, capabilities=handler)
        assert isinstance(made, Pool)
        executor = made
    await executor.start()
    yield executor, handler
    await executor.close()


async def test_secret_calls_carry_the_name_and_answer_with_the_value_or_a_code(
    pool: tuple[Pool | InProcessExecutor, SecretHandler],
) -> None:
    executor, handler = pool
    calls = [
        {"op": "secret", "target": "api-key"},
        {"op": "secret", "target": "forbidden"},
        {"op": "secret", "target": "missing"},
    ]
    body = json.dumps({"op": "blocks", "calls": calls}).encode()
    inv = Invocation(body, "caller-9", 3.0, content_type="application/json")
    answer = json.loads((await executor.invoke(inv)).payload)["results"]
    assert answer[0] == {"value": "value-of-api-key"}
    assert answer[1]["code"] == "not_permitted"
    assert answer[2]["code"] == "not_found"
    assert sorted(c.target for c in handler.calls) == ["api-key", "forbidden", "missing"]
    assert all(c.op == "secret" and c.request_id == "caller-9" for c in handler.calls)
