"""Real HTTP servers for tests: an aiohttp app on 127.0.0.1 in a background thread."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from collections.abc import Iterator

from aiohttp import web


@contextlib.contextmanager
def serve(app: web.Application, tls: ssl.SSLContext | None = None) -> Iterator[str]:
    """Run `app` on 127.0.0.1 in a thread; yields its base URL."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    ready = threading.Event()
    urls: list[str] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
        loop.run_until_complete(site.start())
        scheme = "https" if tls else "http"
        urls.append(f"{scheme}://127.0.0.1:{runner.addresses[0][1]}")
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(10), "test server did not start"

    async def stop() -> None:
        await runner.cleanup()
        # Handlers still asleep (the slow route) are cancelled and awaited, not left pending.
        rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in rest:
            task.cancel()
        await asyncio.gather(*rest, return_exceptions=True)

    try:
        yield urls[0]
    finally:
        asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
