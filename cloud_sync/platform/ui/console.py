"""The console's routes: login, the pages, the actions; built once by `Console(...)`.

Every page handler goes through `_page`: no valid session -> a redirect to /ui/login; with a
session it renders the body and wraps it in the layout (or, for the live poll's
`X-Fragment: 1` request, returns the body alone). Every POST except the login form goes
through `_action`, which checks the session and its CSRF token before anything happens, and
refuses a cross-origin `Origin` header as a second guard. The login form compares the operator
token in constant time, or checks an operator account (`OperatorAccounts.verify`, scrypt).
"""

from __future__ import annotations

import asyncio
import hmac
import importlib.resources
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from cloud_sync.platform.fleet_store import FleetStore, UnknownDevice
from cloud_sync.platform.operators import OperatorAccounts
from cloud_sync.platform.store import RegistryStore, VersionRecord
from cloud_sync.platform.ui import pages, rollouts
from cloud_sync.platform.ui.fleet_view import PAGE_SIZE, FleetQuery, FleetView
from cloud_sync.platform.ui.html import Html, h, render
from cloud_sync.platform.ui.session import COOKIE, SESSION_TTL_S, Session, Sessions, csrf_ok
from hardware.errors import EdgefnError

log = logging.getLogger("edgefn.console")

STATIC_TYPES = {"ui.css": "text/css", "ui.js": "text/javascript"}
# Pages only the console frames; nothing else may frame or script them.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline';"
    " frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
Handler = Callable[[web.Request, Session], Awaitable[Html | web.StreamResponse]]


class Console:
    def __init__(
        self,
        *,
        token: str,
        fleet: FleetStore,
        registry: RegistryStore,
        accounts: OperatorAccounts | None,
        rollout_source: rollouts.RolloutSource | None = None,
    ) -> None:
        self._token = token
        self._fleet = fleet
        self._view = FleetView(fleet.engine)
        self._registry = registry
        self._accounts = accounts
        self._rollouts = rollout_source
        self.sessions = Sessions()
        self._static = {
            name: importlib.resources.files(__package__).joinpath("static", name).read_bytes()
            for name in STATIC_TYPES
        }

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/ui", self.index),
            web.get("/ui/", self.index),
            web.get("/ui/login", self.login_form),
            web.post("/ui/login", self.login),
            web.post("/ui/logout", self._action(self.logout)),
            web.get("/ui/static/{name}", self.static),
            web.get("/ui/fleet", self._page("Fleet", self.fleet, live=True)),
            web.get("/ui/devices/{id}", self._page("Device", self.device, live=True)),
            web.get("/ui/functions", self._page("Functions", self.functions)),
            web.get("/ui/rollouts", self._page("Rollouts", self.rollout_list, live=True)),
            web.get("/ui/rollouts/new", self._page("New rollout", self.rollout_new)),
            web.post("/ui/rollouts/new", self._action(self.rollout_submit)),
            web.get("/ui/rollouts/{id}", self._page("Rollout", self.rollout_detail, live=True)),
            web.post("/ui/rollouts/{id}/{action}", self._action(self.rollout_act)),
        ]

    def close(self) -> None:
        self._view.close()

    # ---- plumbing --------------------------------------------------------------------------

    def _session(self, request: web.Request) -> Session | None:
        return self.sessions.get(request.cookies.get(COOKIE))

    def _page(self, title: str, handler: Handler, *, live: bool = False) -> Any:
        async def page(request: web.Request) -> web.StreamResponse:
            session = self._session(request)
            if session is None:
                raise web.HTTPSeeOther("/ui/login", headers=SECURITY_HEADERS)
            body = await handler(request, session)
            if isinstance(body, web.StreamResponse):
                return body
            if request.headers.get("X-Fragment") == "1":
                return _html(body, {"X-Fragment": "1"})
            doc = render("layout.html", title=title, body=body, csrf=session.csrf,
                         user=session.user, live="1" if live else "0")  # fmt: skip
            return _html(doc)

        return page

    def _action(self, handler: Handler) -> Any:
        async def action(request: web.Request) -> web.StreamResponse:
            session = self._session(request)
            if session is None:
                raise web.HTTPSeeOther("/ui/login", headers=SECURITY_HEADERS)
            if not _same_origin(request):
                return _html(Html("<p>cross-origin request refused</p>"), status=403)
            form = await request.post()
            presented = form.get("csrf") or request.headers.get("X-CSRF-Token")
            if not csrf_ok(session, presented if isinstance(presented, str) else None):
                log.warning(
                    "console: %s %s without a valid CSRF token", request.method, request.path
                )
                return _html(Html("<p>missing or wrong CSRF token</p>"), status=403)
            body = await handler(request, session)
            if isinstance(body, web.StreamResponse):
                return body
            return _html(render("layout.html", title="Result", body=body, csrf=session.csrf,
                                user=session.user, live="0"))  # fmt: skip

        return action

    # ---- login -----------------------------------------------------------------------------

    async def index(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPSeeOther("/ui/fleet")

    async def login_form(self, request: web.Request, error: str = "") -> web.StreamResponse:
        return _html(render("login.html", error=error), status=401 if error else 200)

    async def login(self, request: web.Request) -> web.StreamResponse:
        if not _same_origin(request):
            return await self.login_form(request, "cross-origin login refused")
        form = await request.post()
        user, secret = str(form.get("user") or "").strip(), str(form.get("secret") or "")
        if user:
            ok = self._accounts is not None and await asyncio.to_thread(
                self._accounts.verify, user, secret
            )
        else:
            user = "operator"
            ok = hmac.compare_digest(secret.strip().encode(), self._token.encode())
        if not ok:
            log.warning("console: refused login for %r from %s", user, request.remote)
            return await self.login_form(request, "wrong name, token or password")
        sid, _ = self.sessions.create(user)
        resp = web.HTTPSeeOther("/ui/fleet", headers=SECURITY_HEADERS)
        resp.set_cookie(COOKIE, sid, httponly=True, samesite="Strict", secure=request.secure,
                        path="/ui", max_age=int(SESSION_TTL_S))  # fmt: skip
        raise resp

    async def logout(self, request: web.Request, session: Session) -> web.StreamResponse:
        self.sessions.drop(request.cookies.get(COOKIE))
        resp = web.HTTPSeeOther("/ui/login", headers=SECURITY_HEADERS)
        resp.del_cookie(COOKIE, path="/ui")
        raise resp

    async def static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in self._static:
            raise web.HTTPNotFound()
        return web.Response(body=self._static[name], content_type=STATIC_TYPES[name],
                            headers={"Cache-Control": "max-age=300"})  # fmt: skip

    # ---- pages -----------------------------------------------------------------------------

    async def fleet(self, request: web.Request, session: Session) -> Html:
        q = request.query
        try:
            number = max(1, int(q.get("page", "1")))
        except ValueError:
            number = 1
        query = FleetQuery(search=q.get("q", "").strip(), label=q.get("label", "").strip(),
                           state=q.get("state", ""), sort=q.get("sort", "id"),
                           descending=q.get("dir") == "desc", page=number,
                           page_size=PAGE_SIZE)  # fmt: skip
        page = await asyncio.to_thread(self._view.page, query)
        return pages.fleet_body(query, page)

    async def device(self, request: web.Request, session: Session) -> Html:
        ident = request.match_info["id"]

        def load() -> tuple[Any, ...] | None:
            found = self._fleet.describe(ident)
            if not found:
                return None
            desired = self._fleet.desired(ident).config
            reported = self._fleet.records(ident, "reported", limit=1)
            events = self._fleet.records(ident, "events", limit=20)
            events += self._fleet.records(ident, "rollout", limit=20)
            events.sort(key=lambda e: e.get("received_at") or 0, reverse=True)
            metrics = self._fleet.records(ident, "metrics", limit=120)
            rep = (
                reported[0]["value"] if reported and isinstance(reported[0]["value"], dict) else {}
            )
            return found[0], desired, rep, events[:30], metrics

        try:
            got = await asyncio.to_thread(load)
        except UnknownDevice:
            got = None
        if got is None:
            raise web.HTTPNotFound(text="no such device")
        return pages.device_body(*got)

    async def functions(self, request: web.Request, session: Session) -> Html:
        def load() -> tuple[dict[str, list[VersionRecord]], dict[str, dict[str, int]]]:
            fns = {
                f.name: self._registry.list_versions(f.name)
                for f in self._registry.list_functions()
            }
            return fns, self._view.version_distribution()

        fns, dist = await asyncio.to_thread(load)
        return pages.functions_body(fns, dist)

    async def rollout_list(self, request: web.Request, session: Session) -> Html:
        src = self._rollouts
        views = None if src is None else await asyncio.to_thread(src.list)
        return rollouts.list_body(views)

    async def rollout_detail(self, request: web.Request, session: Session) -> Html:
        src = self._rollouts
        if src is None:
            return rollouts.NOT_AVAILABLE
        view = await asyncio.to_thread(src.get, request.match_info["id"])
        if view is None:
            raise web.HTTPNotFound(text="no such rollout")
        return rollouts.detail_body(view, session.csrf, request.query.get("state", ""))

    async def rollout_new(self, request: web.Request, session: Session) -> Html:
        if self._rollouts is None:
            return rollouts.NOT_AVAILABLE
        return rollouts.new_form(session.csrf, None, {})

    async def rollout_submit(
        self, request: web.Request, session: Session
    ) -> Html | web.StreamResponse:
        src = self._rollouts
        if src is None:
            return rollouts.NOT_AVAILABLE
        form = {k: str(v) for k, v in (await request.post()).items() if k != "csrf"}
        spec = rollouts.spec_from_form(form)
        try:
            if form.get("mode") == "start":
                started = await asyncio.to_thread(src.start, spec)
                raise web.HTTPSeeOther(f"/ui/rollouts/{started.get('id')}")
            preview = await asyncio.to_thread(src.preview, spec)
        except EdgefnError as exc:  # a bad spec or an empty target: say so on the form
            return rollouts.new_form(session.csrf, None, form, error=exc.one_line())
        return rollouts.new_form(session.csrf, preview, form)

    async def rollout_act(
        self, request: web.Request, session: Session
    ) -> Html | web.StreamResponse:
        src = self._rollouts
        action = request.match_info["action"]
        if src is None:
            return rollouts.NOT_AVAILABLE
        if action not in rollouts.ACTIONS:
            raise web.HTTPNotFound(text="no such action")
        ident = request.match_info["id"]
        try:
            await asyncio.to_thread(src.act, ident, action)  # type: ignore[arg-type]
        except EdgefnError as exc:  # e.g. resume of a finished rollout
            return h('<p class="error">$e</p>', e=exc.one_line())
        raise web.HTTPSeeOther(f"/ui/rollouts/{ident}")


def _same_origin(request: web.Request) -> bool:
    origin = request.headers.get("Origin")
    if origin is None:
        return True  # no Origin (older clients, curl): the CSRF token alone decides
    return origin == f"{request.scheme}://{request.host}"


def _html(body: str, extra: dict[str, str] | None = None, status: int = 200) -> web.Response:
    return web.Response(text=body, status=status, content_type="text/html", charset="utf-8",
                        headers={**SECURITY_HEADERS, **(extra or {})})  # fmt: skip
