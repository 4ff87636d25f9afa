"""A small blocking client for an agent's local API on the LAN: discover, then invoke.

    client = LanClient.discover(device_id="edge-01", token=TOKEN, cafile="fleet-ca.pem")
    reply = client.invoke("eta-node", b'{"stop": 4}', content_type="application/json")

Standard library only (urllib, ssl), so a head unit or a depot script can copy its use. A
`cafile` pins the fleet CA: an https agent whose certificate another CA issued is refused,
even if the system trust store would accept it.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from edge_agent.discovery import Found, discover
from edge_agent.errors import AgentError


class ClientError(AgentError):
    """The agent could not be found or reached (not: the agent answered with an error)."""

    code = "client_error"
    status = 503


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def error_code(self) -> str:
        """The stable code of an error reply ("" for a success or a foreign body)."""
        try:
            return str(json.loads(self.body)["error"]["code"])
        except (ValueError, KeyError, TypeError):
            return ""


class LanClient:
    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        cafile: Path | str | None = None,
        timeout: float = 30.0,
        client_cert: Path | str | None = None,
        client_key: Path | str | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self._token = token
        self._timeout = timeout
        self._ssl: ssl.SSLContext | None = None
        if self.url.startswith("https:"):
            # create_default_context(cafile=...) trusts that file only: the pin.
            self._ssl = ssl.create_default_context(cafile=str(cafile) if cafile else None)
            if client_cert is not None:  # mTLS: an agent run with auth = "mtls"
                key = str(client_key) if client_key is not None else None
                try:
                    self._ssl.load_cert_chain(str(client_cert), key)
                except (ssl.SSLError, OSError) as exc:
                    raise ClientError(
                        f"cannot use client certificate {client_cert}: {exc}"
                    ) from exc

    @classmethod
    def discover(
        cls,
        *,
        device_id: str | None = None,
        wait_s: float = 3.0,
        token: str | None = None,
        cafile: Path | str | None = None,
        timeout: float = 30.0,
        client_cert: Path | str | None = None,
        client_key: Path | str | None = None,
    ) -> LanClient:
        """Find an agent with zeroconf: `device_id`, or the only one on the LAN."""
        return cls(
            pick(asyncio.run(discover(wait_s, device_id=device_id)), device_id).url,
            token=token,
            cafile=cafile,
            timeout=timeout,
            client_cert=client_cert,
            client_key=client_key,
        )

    def invoke(
        self, name: str, data: bytes = b"", content_type: str = "application/octet-stream"
    ) -> Reply:
        headers = {"Content-Type": content_type}
        return self.request("POST", f"/v1/functions/{name}/invoke", data, headers)

    def request(
        self,
        method: str,
        path: str,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        """One call; an HTTP error status is a Reply, an unreachable agent a ClientError."""
        all_headers = dict(headers or {})
        if self._token:
            all_headers["Authorization"] = f"Bearer {self._token}"
        req = urllib.request.Request(self.url + path, data=data, headers=all_headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=self._timeout, context=self._ssl) as resp:
                return Reply(resp.status, resp.read(), dict(resp.headers.items()))
        except urllib.error.HTTPError as exc:
            return Reply(exc.code, exc.read(), dict(exc.headers.items()))
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ClientError(f"cannot reach the agent at {self.url}: {reason}") from exc


def pick(found: list[Found], device_id: str | None) -> Found:
    """The agent to talk to; refuses to guess between several."""
    if device_id is not None:
        for item in found:
            if item.device_id == device_id:
                return item
        raise ClientError(f"no agent with device id {device_id!r} answered on the LAN")
    if not found:
        raise ClientError("no edgefn agent answered on the LAN (is it run with --advertise?)")
    if len(found) > 1:
        ids = ", ".join(f.device_id for f in found)
        raise ClientError(f"{len(found)} agents found ({ids}): pass --device ID")
    return found[0]
