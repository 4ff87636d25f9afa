"""The capability broker: the one place a function's building-block calls are checked and served.

Flow of one call (docs/building-blocks.md)::

    function SDK --CALL frame--> runtimes.worker --CapabilityCall--> Broker.call
        check the manifest's [permissions]  (refusal: NotPermitted, logged with function,
                                             version and the caller's request id)
        invoke        -> the agent's router (cache and routing policy apply), bounded by the
                         caller's remaining deadline; a function already on the call chain is
                         refused, so A -> B -> A cannot deadlock the pools
        publish       -> the outbox (durable before the call returns; MQTT or HTTP later)
        state.*       -> the per-function SQLite store (edge_agent.state_store), bounded in bytes
        config        -> the function's `config` table from the desired state
        secret        -> the agent's secret store (edge_agent.secret_store), read per call so a
                         rotation is seen by the next call without restarting workers

The broker is built once in `edge_agent.assembly.assemble` with what it serves through passed in
as callables, so it imports neither the router nor cloud_sync.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from edge_agent.errors import UnknownFunction
from edge_agent.state_store import StateStore
from runtimes.capabilities import (
    CapabilityCall,
    CapabilityError,
    CapabilityNotFound,
    CapabilityTimeout,
    CapabilityUnavailable,
    NotPermitted,
)
from runtimes.manifest import Manifest
from runtimes.permissions import valid_topic

log = logging.getLogger("edgefn.capabilities")

# Largest payload a function may publish: events are small facts, not file transfers, and each
# one sits in the outbox until the platform acknowledges it.
MAX_PUBLISH_BYTES = 256 * 1024


class Invoke(Protocol):
    async def __call__(
        self,
        name: str,
        payload: bytes,
        *,
        request_id: str,
        trace_id: str,
        deadline_s: float,
        chain: tuple[str, ...],
        content_type: str,
    ) -> bytes: ...


@dataclass(frozen=True, slots=True)
class Event:
    """One publish, as handed to the outbox."""

    function: str
    version: str
    topic: str
    payload: bytes
    request_id: str


# Returns once the event is durable (committed to the outbox); raises CapabilityUnavailable
# when the agent has no platform to deliver it to.
Publish = Callable[[Event], Awaitable[None]]
# The function's `config` table from the desired state ({} without one).
ConfigLookup = Callable[[str], Mapping[str, Any]]
# A secret's current value, None when this device holds no secret of that name.
SecretLookup = Callable[[str], bytes | None]


def _no_secrets(name: str) -> bytes | None:
    return None


class Broker:
    """Implements `runtimes.capabilities.CapabilityHandler` for every worker of the agent."""

    def __init__(
        self,
        *,
        invoke: Invoke,
        publish: Publish,
        state: StateStore | None,
        config: ConfigLookup,
        secret: SecretLookup = _no_secrets,
    ) -> None:
        self._invoke = invoke
        self._publish = publish
        self._state = state
        self._config = config
        self._secret = secret
        self._claimed: set[tuple[str, str]] = set()  # (function, version) owning its state
        self.refusals = 0

    async def call(self, manifest: Manifest, call: CapabilityCall) -> bytes:
        try:
            return await self._serve(manifest, call)
        except NotPermitted as exc:
            self.refusals += 1
            log.warning(
                "refused %s %r for %s@%s: %s",
                call.op,
                call.target,
                manifest.name,
                manifest.version,
                exc.message,
                extra={"request_id": call.request_id, "function": manifest.name},
            )
            raise

    async def _serve(self, m: Manifest, call: CapabilityCall) -> bytes:
        perms = m.permissions
        op = call.op
        if op == "invoke":
            return await self._nested_invoke(m, call)
        if op == "publish":
            if not valid_topic(call.target):
                raise NotPermitted(f"{call.target!r} is not a topic a function may publish on")
            if not perms.may_publish(call.target):
                raise NotPermitted(f"[permissions] publish does not cover {call.target!r}")
            if len(call.payload) > MAX_PUBLISH_BYTES:
                raise NotPermitted(f"a published payload is at most {MAX_PUBLISH_BYTES} bytes")
            await self._publish(
                Event(m.name, m.version, call.target, call.payload, call.request_id)
            )
            return b""
        if op == "config":
            return json.dumps(self._config(m.name)).encode()
        if op == "secret":
            # The refusal is logged by `call` (function, version, request id, the secret's
            # name); the value is never logged, granted or not.
            if call.target not in perms.secrets:
                raise NotPermitted(f"[permissions] secrets does not list {call.target!r}")
            value = self._secret(call.target)
            if value is None:
                raise CapabilityNotFound(
                    f"secret {call.target!r} has not been delivered to this device"
                )
            return value
        # state.get / state.set / state.delete
        if perms.state_max_bytes <= 0:
            raise NotPermitted("[permissions] grants no state store")
        if self._state is None:
            raise CapabilityUnavailable("this agent has no state store")
        await self._claim(m)
        if op == "state.get":
            return await self._state.get(m.name, call.target)
        if op == "state.set":
            await self._state.set(
                m.name, call.target, call.payload, max_bytes=perms.state_max_bytes
            )
            return b""
        if op == "state.delete":
            await self._state.delete(m.name, call.target)
            return b""
        raise CapabilityNotFound(f"unknown building-block operation {op!r}")

    async def _nested_invoke(self, m: Manifest, call: CapabilityCall) -> bytes:
        target = call.target
        if target in call.chain:
            path = " -> ".join((*call.chain, target))
            raise NotPermitted(f"invocation cycle refused: {path}")
        if not m.permissions.may_invoke(target):
            raise NotPermitted(f"[permissions] invoke does not list {target!r}")
        try:
            async with asyncio.timeout(call.deadline_s):
                return await self._invoke(
                    target,
                    call.payload,
                    request_id=call.request_id,
                    trace_id=call.trace_id,
                    deadline_s=call.deadline_s,
                    chain=call.chain,
                    content_type=call.content_type,
                )
        except TimeoutError:
            raise CapabilityTimeout(
                f"{target} did not answer within the caller's remaining {call.deadline_s:.3f} s"
            ) from None
        except UnknownFunction as exc:
            raise CapabilityNotFound(exc.message) from exc

    async def _claim(self, m: Manifest) -> None:
        assert self._state is not None
        owner = (m.name, m.version)
        if owner in self._claimed:
            return
        try:
            await self._state.claim(m.name, m.version, keep=m.permissions.state_keep_on_switch)
        except CapabilityError:
            raise
        except Exception as exc:  # the store is closed or broken: say so, do not crash
            raise CapabilityUnavailable(f"the state store is unavailable: {exc}") from exc
        self._claimed.add(owner)
