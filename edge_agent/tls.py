"""TLS for the local API listener: a server certificate and key, issued by the fleet CA.

LAN clients pin that CA (`edge_agent.client.LanClient(cafile=...)`, `edge-agent invoke
--cafile`): an impostor found through spoofed mDNS cannot present a certificate for the device,
and tokens no longer cross the LAN in the clear. The certificate must name what clients dial
(an IP SAN for the LAN address, or the device's host name).
"""

from __future__ import annotations

import ssl
from pathlib import Path

from edge_agent.errors import StartupError


def server_context(
    cert_file: Path, key_file: Path, client_ca_file: Path | None = None
) -> ssl.SSLContext:
    """A TLS 1.2+ server context; unusable files are a StartupError that names them.

    With `client_ca_file`, clients must present a certificate issued by that CA (mTLS).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # TLS 1.0/1.1 are deprecated (RFC 8996); every client this API serves speaks 1.2.
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(cert_file), str(key_file))
    except FileNotFoundError as exc:
        raise StartupError(f"tls: cannot read {exc.filename}: {exc.strerror}") from exc
    except (ssl.SSLError, OSError) as exc:
        raise StartupError(
            f"tls: cannot use certificate {cert_file} with key {key_file}: {exc}"
        ) from exc
    if client_ca_file is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        try:
            ctx.load_verify_locations(cafile=str(client_ca_file))
        except (ssl.SSLError, OSError) as exc:
            raise StartupError(f"tls: cannot use client CA file {client_ca_file}: {exc}") from exc
    return ctx
