"""The production outbox sender (`SyncClient.run_sender`) on its own, for MQTT tests.

A `SyncClient` needs the agent's hooks and a platform URL; these tests only exercise MQTT, so
the hooks are empty and the HTTP fallback is switched off (`fallback_after_s` of a year: a
broker outage leaves the sender "waiting", records stay in the outbox).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from cloud_sync.credentials import DeviceCredentials
from cloud_sync.state import AgentConfig
from cloud_sync.sync import AgentHooks, SyncClient, SyncSettings

NO_FALLBACK_S = 365 * 24 * 3600.0
# Nothing listens on port 9 (discard) on loopback; never used while the fallback is off.
UNUSED_PLATFORM = "http://127.0.0.1:9"


async def _apply(config: AgentConfig) -> None:
    return None


HOOKS = AgentHooks(metrics_snapshot=dict, pool_sizes=dict, apply_config=_apply, describe=dict)


@contextlib.asynccontextmanager
async def device_sender(creds: DeviceCredentials, data_dir: Path) -> AsyncIterator[SyncClient]:
    """A SyncClient whose MQTT session is running; start `client.run_sender(outbox)` as a task."""
    client = SyncClient(
        creds,
        SyncSettings(data_dir=data_dir, fallback_after_s=NO_FALLBACK_S),
        HOOKS,
        platform_url=UNUSED_PLATFORM,
    )
    try:
        async with client.session:
            yield client
    finally:
        await client.http.close()
