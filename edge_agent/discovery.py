"""Zeroconf (mDNS/DNS-SD) advertising of the local API, and discovery of agents on the LAN.

An agent run with `advertise = ["eth1"]` (or `--advertise eth1`) registers one service of
type `_edgefn._tcp.local.` named after its device id, answering only on the IPv4 addresses of
the named interfaces, with TXT records:

    id    device id                api   local API major version ("1": /v1)
    auth  token | mtls | none      tls   1 when the listener speaks TLS, else 0
    fns   8 hex digits that change whenever the installed functions or their versions change

`fns` is the record that changes at runtime: a client that caches what a device offers re-reads
`/v1/functions` when it moves, without polling every device. The TXT never carries function
names: listing them needs a token. The advertiser polls its `txt` callable (cheap, in memory)
every `TXT_POLL_S` and re-announces when a value changed; it unregisters on shutdown, so
browsers see the agent leave at once instead of after the record's TTL (75 min for PTR).

Advertising is off unless configured: mDNS is multicast, and the loopback default reaches no one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from edge_agent.errors import StartupError
from runtimes import tasks

log = logging.getLogger("edgefn.discovery")

SERVICE_TYPE = "_edgefn._tcp.local."
API_VERSION = "1"
# How often the TXT source is compared with what was announced. Changes are rare (an install);
# 2 s matches the function scanner's default interval.
TXT_POLL_S = 2.0


def interface_addresses(names: Iterable[str]) -> list[str]:
    """The IPv4 addresses of interfaces `names`; StartupError names one that has none."""
    import psutil

    table = psutil.net_if_addrs()
    out: list[str] = []
    for name in names:
        addrs = [a.address for a in table.get(name, []) if a.family == socket.AF_INET]
        if not addrs:
            known = ", ".join(sorted(table)) or "none"
            raise StartupError(
                f"advertise: interface {name!r} does not exist or has no IPv4 address "
                f"(interfaces here: {known})"
            )
        out.extend(addrs)
    return out


def functions_digest(versions: dict[str, str]) -> str:
    """The `fns` TXT value for {function name: version}."""
    text = "\n".join(f"{n}={v}" for n, v in sorted(versions.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def service_name(device_id: str) -> str:
    # DNS-SD instance names may hold any UTF-8 up to 63 bytes; dots would split the label.
    return f"{device_id.replace('.', '-')[:63]}.{SERVICE_TYPE}"


def agent_txt(device_id: str, auth: str, *, tls: bool, functions: dict[str, str]) -> dict[str, str]:
    """The TXT records an agent advertises (see the module docstring)."""
    return {
        "id": device_id,
        "api": API_VERSION,
        "auth": auth,
        "tls": "1" if tls else "0",
        "fns": functions_digest(functions),
    }


class Advertiser:
    """One `_edgefn._tcp` registration, kept current and removed on close."""

    def __init__(
        self,
        interfaces: tuple[str, ...],
        txt: Callable[[], dict[str, str]],
        *,
        device_id: str,
        poll_s: float = TXT_POLL_S,
    ) -> None:
        self._interfaces = interfaces
        self._txt = txt
        self._device_id = device_id
        self._poll_s = poll_s
        self._azc: Any = None
        self._port = 0
        self._info: Any = None
        self._task: asyncio.Task[None] | None = None
        self.addresses: list[str] = []

    async def prepare(self) -> None:
        """Resolve the interfaces before the API listens: a wrong name stops the start."""
        self.addresses = await asyncio.to_thread(interface_addresses, self._interfaces)

    async def start(self, port: int) -> None:
        """Register in the background: probing takes a while and the API must not wait."""
        from zeroconf import IPVersion
        from zeroconf.asyncio import AsyncZeroconf

        if not self.addresses:
            await self.prepare()
        self._azc = AsyncZeroconf(interfaces=self.addresses, ip_version=IPVersion.V4Only)
        self._port = port
        self._info = self._make_info(self._txt())
        self._task = asyncio.create_task(self._run(), name="zeroconf advertiser")

    def _make_info(self, txt: dict[str, str]) -> Any:
        """A fresh ServiceInfo: its TXT is immutable, so an update registers a new one."""
        from zeroconf.asyncio import AsyncServiceInfo

        name = service_name(self._device_id)
        return AsyncServiceInfo(
            SERVICE_TYPE,
            name,
            port=self._port,
            properties=txt,
            addresses=[socket.inet_aton(a) for a in self.addresses],
            server=f"{name.split('.')[0]}-edgefn.local.",
        )

    async def _run(self) -> None:
        # cooperating_responders: skip the ~1.6 s of probing for a conflicting name. Device ids
        # are unique in a fleet and the service name is derived from the id.
        await (await self._azc.async_register_service(self._info, cooperating_responders=True))
        log.info(
            "advertising %s on %s (%s)",
            self._info.name,
            ", ".join(self._interfaces),
            ", ".join(self.addresses),
        )
        announced = dict(self._info.decoded_properties)
        while True:
            await asyncio.sleep(self._poll_s)
            try:
                want = self._txt()
                if want != announced:
                    self._info = self._make_info(want)
                    await (await self._azc.async_update_service(self._info))
                    log.info("advertised TXT updated: %s", want)
                    announced = dict(want)
            except Exception:
                log.exception("updating the zeroconf TXT records failed")

    async def close(self) -> None:
        await tasks.stop(self._task)
        if self._azc is not None:
            with contextlib.suppress(Exception):  # best effort: we are shutting down
                await (await self._azc.async_unregister_service(self._info))
            await self._azc.async_close()
            log.info("stopped advertising %s", self._info.name)


@dataclass(frozen=True, slots=True)
class Found:
    """An agent seen on the LAN."""

    device_id: str
    name: str
    addresses: tuple[str, ...]
    port: int
    txt: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        scheme = "https" if self.txt.get("tls") == "1" else "http"
        return f"{scheme}://{self.addresses[0]}:{self.port}" if self.addresses else ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "name": self.name,
            "url": self.url,
            "addresses": list(self.addresses),
            "port": self.port,
            "auth": self.txt.get("auth", ""),
            "tls": self.txt.get("tls") == "1",
            "txt": dict(self.txt),
        }


async def discover(
    wait_s: float = 3.0, *, interfaces: list[str] | None = None, device_id: str | None = None
) -> list[Found]:
    """Browse for `wait_s` seconds; with `device_id`, return as soon as that one resolves."""
    from zeroconf import IPVersion, ServiceStateChange
    from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

    azc = AsyncZeroconf(
        interfaces=interfaces if interfaces is not None else _all_interfaces(),
        ip_version=IPVersion.V4Only,
    )
    found: dict[str, Found] = {}
    names: asyncio.Queue[str] = asyncio.Queue()
    wanted = asyncio.Event()

    def on_change(
        zeroconf: Any, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change is ServiceStateChange.Removed:
            found.pop(name, None)
        else:
            names.put_nowait(name)

    async def resolve() -> None:
        while True:
            name = await names.get()
            info = AsyncServiceInfo(SERVICE_TYPE, name)
            if not await info.async_request(azc.zeroconf, 1500):
                continue
            txt = {k: v or "" for k, v in info.decoded_properties.items()}
            item = Found(
                device_id=txt.get("id", name.split(".")[0]),
                name=name,
                addresses=tuple(info.parsed_addresses(IPVersion.V4Only)),
                port=int(info.port or 0),
                txt=txt,
            )
            found[name] = item
            if device_id is not None and item.device_id == device_id:
                wanted.set()

    browser = AsyncServiceBrowser(azc.zeroconf, SERVICE_TYPE, handlers=[on_change])
    resolver = asyncio.create_task(resolve())
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait_s):
                await wanted.wait()
    finally:
        await tasks.stop(resolver)
        await browser.async_cancel()
        await azc.async_close()
    return sorted(found.values(), key=lambda f: (f.device_id, f.name))


def _all_interfaces() -> Any:
    from zeroconf import InterfaceChoice

    return InterfaceChoice.All
