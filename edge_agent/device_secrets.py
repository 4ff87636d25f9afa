"""Wiring of the device's secrets: the store at rest and the sync that keeps it fresh.

Only for an agent joined to a platform (`--credentials`): the device key from enrolment opens
what the platform sealed to it (edge_agent.secret_store), and cloud_sync.secrets_sync fetches
and acknowledges. Kept out of agent.py so the agent's lifecycle stays one page.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cloud_sync.sealbox import private_key_from_pem
from cloud_sync.secrets_sync import SecretsSync
from edge_agent.secret_store import FILE_NAME, SecretStore, parse_entry

if TYPE_CHECKING:
    from cloud_sync.credentials import DeviceCredentials


async def open_device_secrets(
    data_dir: Path, creds: DeviceCredentials, platform_url: str, token: str
) -> tuple[SecretStore, SecretsSync]:
    """Load the store (a damaged file is set aside, not fatal) and start its sync."""
    store = SecretStore(data_dir / FILE_NAME, creds.device_id, private_key_from_pem(creds.key_pem))
    await asyncio.to_thread(store.load)

    async def apply(offered: dict[str, Any]) -> None:
        sealed = [parse_entry(name, entry) for name, entry in offered.items()]
        await asyncio.to_thread(store.replace, sealed)

    sync = SecretsSync(
        platform_url,
        creds.device_id,
        creds.cert_pem,
        token=token,
        ssl_ctx=creds.ssl_context() if platform_url.startswith("https:") else None,
        apply=apply,
        held=store.versions,
    )
    await sync.start()
    return store, sync
