"""The console's rollout pages on the real controller: a `ui.RolloutSource` over it.

The console calls its source from a worker thread (`asyncio.to_thread`), while the controller
lives on the platform's loop and is its only writer. So each call is handed back to the loop
with `run_coroutine_threadsafe`, and the console's pages see exactly what `/v1/rollouts` sees.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Mapping
from typing import Any, TypeVar

from cloud_sync.platform.rollout_api import summary
from cloud_sync.platform.rollouts import RolloutController, RolloutNotFound
from cloud_sync.platform.ui.rollouts import Action
from cloud_sync.rollout.errors import RolloutError

T = TypeVar("T")

# A page waits this long for the controller; its loop pass is short (TICK_S), so only a
# stopped or wedged loop gets near it, and then the page says so instead of hanging a thread.
CALL_TIMEOUT_S = 20.0


class ControllerSource:
    """`RolloutSource` for `cloud_sync.platform.ui`: list, get, act, preview, start."""

    def __init__(self, controller: RolloutController) -> None:
        self._controller = controller
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The platform's loop, known once the app starts (called from its on_startup)."""
        self._loop = loop

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._loop is None:
            coro.close()
            raise RolloutError("the rollout controller is not running", code="rollouts_offline")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(CALL_TIMEOUT_S)
        except TimeoutError as exc:
            future.cancel()
            raise RolloutError(
                f"the rollout controller did not answer in {CALL_TIMEOUT_S:g} s",
                code="rollouts_offline",
            ) from exc

    def list(self) -> list[dict[str, Any]]:
        return [summary(r) for r in self._call(self._controller.all())]

    def get(self, rollout_id: str) -> dict[str, Any] | None:
        try:
            return self._call(self._controller.get(rollout_id)).status_view()
        except RolloutNotFound:
            return None

    def act(self, rollout_id: str, action: Action) -> dict[str, Any]:
        return self._call(self._controller.command(rollout_id, action)).status_view()

    def preview(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        return self._call(self._controller.create(dict(spec), dry_run=True))

    def start(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        started = self._call(self._controller.create(dict(spec)))
        return self._call(self._controller.get(str(started["id"]))).status_view()
