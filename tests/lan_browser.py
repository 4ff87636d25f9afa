"""A long-running `_edgefn._tcp` browser for the LAN tests: one JSON line per event on stdout.

Run only inside a network namespace a test created (`ip netns exec NS python -m
tests.lan_browser`): zeroconf multicasts on every interface it has. It exits when stdin closes.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from zeroconf import IPVersion, ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from edge_agent.discovery import SERVICE_TYPE


def emit(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


async def main() -> None:
    azc = AsyncZeroconf(ip_version=IPVersion.V4Only)
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = set()  # strong references until each task is done

    async def resolve(name: str, event: str) -> None:
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if await info.async_request(azc.zeroconf, 3000):
            emit(event=event, name=name, txt=info.decoded_properties, port=info.port)

    def on_change(
        zeroconf: Any, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change is ServiceStateChange.Removed:
            emit(event="removed", name=name)
        else:
            task = loop.create_task(resolve(name, state_change.name.lower()))
            pending.add(task)
            task.add_done_callback(pending.discard)

    browser = AsyncServiceBrowser(azc.zeroconf, SERVICE_TYPE, handlers=[on_change])
    emit(event="browsing")
    await loop.run_in_executor(None, sys.stdin.read)  # until the test closes our stdin
    await browser.async_cancel()
    await azc.async_close()


if __name__ == "__main__":
    asyncio.run(main())
