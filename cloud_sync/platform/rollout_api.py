"""`/v1/rollouts`: the platform HTTP API of the rollout controller (operator token only).

    POST /v1/rollouts                  {spec..., "dry_run": bool, "supersede": bool}
                                       201 {"id", "waves", "ineligible", "superseded"};
                                       200 with dry_run: the plan, nothing started
    GET  /v1/rollouts                  {"rollouts": [summary...]}
    GET  /v1/rollouts/{id}             the `Rollout.status_view()` JSON (`rollout status --json`)
    POST /v1/rollouts/{id}/pause|resume|abort   the status view after the step

Errors are the platform's JSON shape `{"error": {"code", "message", "fields"?}}` with stable
codes: `bad_rollout_spec` / `bad_selector` / `bad_gate` 422 (every bad field listed),
`version_not_found` 404, `rollout_not_found` 404, `empty_target` 422, `rollout_active` 409
(names the active rollout; retry with supersede), `rollout_state` 409.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from cloud_sync.platform.auth import AuthResult, check_bearer
from cloud_sync.platform.registry import error_response
from cloud_sync.platform.rollouts import RolloutController
from cloud_sync.rollout.errors import RolloutError, SpecError
from cloud_sync.rollout.model import Rollout

_STATUS = {
    "version_not_found": 404,
    "rollout_not_found": 404,
    "rollout_active": 409,
    "rollout_state": 409,
    "empty_target": 422,
}


def summary(r: Rollout) -> dict[str, Any]:
    """One line of `rollout list`: no device list (a fleet's would be megabytes)."""
    view = r.status_view()
    view.pop("devices")
    view.pop("spec")
    view["target"] = str(r.spec.target)
    view["created_at"] = r.created_at
    view["updated_at"] = r.updated_at
    return view


class RolloutApi:
    def __init__(self, controller: RolloutController, operator_token: str) -> None:
        self.controller = controller
        self._token = operator_token

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/rollouts", self.create),
            web.get("/v1/rollouts", self.list_rollouts),
            web.get("/v1/rollouts/{id}", self.status),
            web.post("/v1/rollouts/{id}/{verb:pause|resume|abort}", self.command),
        ]

    def _denied(self, request: web.Request) -> web.Response | None:
        result = check_bearer(request.headers.get("Authorization"), self._token)
        if result is AuthResult.OK:
            return None
        if result is AuthResult.MISSING:
            return error_response(
                401, "unauthorized", "send the operator token", **{"WWW-Authenticate": "Bearer"}
            )
        return error_response(403, "forbidden", "rollouts need the operator token")

    async def create(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        try:
            body = await request.json()
        except ValueError:
            return error_response(400, "bad_request", "body must be JSON")
        if not isinstance(body, dict):
            return error_response(400, "bad_request", "body must be a JSON object")
        dry_run = bool(body.pop("dry_run", False))
        supersede = bool(body.pop("supersede", False))
        try:
            doc = await self.controller.create(body, dry_run=dry_run, supersede=supersede)
        except RolloutError as exc:
            return _error(exc)
        return web.json_response(doc, status=200 if dry_run else 201)

    async def list_rollouts(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        items = await self.controller.all()
        return web.json_response({"rollouts": [summary(r) for r in items]})

    async def status(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        try:
            r = await self.controller.get(request.match_info["id"])
        except RolloutError as exc:
            return _error(exc)
        return web.json_response(r.status_view())

    async def command(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        try:
            r = await self.controller.command(request.match_info["id"], request.match_info["verb"])
        except RolloutError as exc:
            return _error(exc)
        return web.json_response(r.status_view())


def _error(exc: RolloutError) -> web.Response:
    status = _STATUS.get(exc.code, 422 if isinstance(exc, SpecError) else 400)
    return web.json_response({"error": exc.to_dict()}, status=status)
