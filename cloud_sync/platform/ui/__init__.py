"""The fleet console: server-rendered pages under /ui/ on the platform's own port.

`mount(app, ...)` adds the routes (console.py). Pages: Fleet (fleet_view.py: SQL paging over
the fleet store), Device, Functions (pages.py), Rollouts (rollouts.py, behind `RolloutSource`).
Everything a device reports passes through `html.h`/`html.render`, which escape it. Sessions and
CSRF: session.py. Assets (templates/, static/) ship as package data; nothing is fetched from
the internet. docs/dashboard.md describes the pages and their security.
"""

from __future__ import annotations

from aiohttp import web

from cloud_sync.platform.fleet_store import FleetStore
from cloud_sync.platform.operators import OperatorAccounts
from cloud_sync.platform.store import RegistryStore
from cloud_sync.platform.ui.console import Console
from cloud_sync.platform.ui.rollouts import RolloutSource

__all__ = ["Console", "RolloutSource", "mount"]


def mount(
    app: web.Application,
    *,
    token: str,
    fleet: FleetStore,
    registry: RegistryStore,
    accounts: OperatorAccounts | None,
    rollout_source: RolloutSource | None = None,
) -> Console:
    """Register the console's routes on `app`; its read connections close with the app."""
    console = Console(token=token, fleet=fleet, registry=registry, accounts=accounts,
                      rollout_source=rollout_source)  # fmt: skip
    app.add_routes(console.routes())

    async def close(app: web.Application) -> None:
        console.close()
        if accounts is not None:
            accounts.close()

    app.on_cleanup.append(close)
    return console
