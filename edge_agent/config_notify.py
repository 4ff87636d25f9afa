"""`config()` change notification: tell a function's running workers its config changed.

When the agent applies a new desired config (`Agent._apply_config`), every loaded function whose
`config` table differs from the one before gets a NOTIFY `config` frame on each ready worker,
carrying the new table as JSON (docs/protocol.md); an in-process C++ library gets the same
through its executor's `notify_config` (`runtimes.cpp.inproc_notify`). The SDKs hand it to the
function without an invocation: Node `context.onConfigChange(fn)`, Go `edgefn.ConfigChanges()`,
C++ `edgefn::on_config_change(fn)`. Pushed rather than
polled, because a function that caches its config must hear of a change even while idle; a worker
started afterwards reads `config()` itself, so nothing is lost between the two.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from cloud_sync.state import AgentConfig
    from edge_agent.functions import LoadedFunction

log = logging.getLogger("edgefn.agent")


@runtime_checkable
class ConfigListener(Protocol):
    """An executor that can be told of config changes: a worker pool (NOTIFY frames to the
    workers that announced them) or the in-process C++ executor. Returns how many were told."""

    def notify_config(self, config: bytes) -> int: ...


def function_config(config: AgentConfig | None, name: str) -> Mapping[str, Any]:
    """The `config` table of function `name` in a desired config ({} without one)."""
    fc = config.functions.get(name) if config is not None else None
    return fc.config if fc is not None else {}


def notify_config_changes(
    loaded: Mapping[str, LoadedFunction], before: AgentConfig | None, after: AgentConfig
) -> dict[str, int]:
    """Notify the workers of every function whose config changed; name -> workers told."""
    told: dict[str, int] = {}
    for name, fn in loaded.items():
        new = function_config(after, name)
        executor = fn.executor
        if function_config(before, name) == new or not isinstance(executor, ConfigListener):
            continue
        told[name] = executor.notify_config(json.dumps(new).encode())
        log.info("%s: config changed, %d running instance(s) notified", name, told[name])
    return told
