"""Two platform instances (`create_app`) on one PostgreSQL database, each its own data dir with
the same director key and secrets key deployed into it (they are files, like the CA): a secret
set through either is listed by both with versions that count on across them, and the director's
instructions are one sequence per device whichever replica signs them. Neither opens a SQLite
file."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from cloud_sync.platform.director import KEY_DIR
from cloud_sync.platform.secret_store import KEY_FILE
from cloud_sync.platform.server import create_app
from cloud_sync.platform.settings import PlatformSettings
from cloud_sync.sealbox import platform_aad, public_key_from_pem, seal
from tests.postgres import PostgresDatabase


async def _ok(resp: Any, status: int = 200) -> Any:
    assert resp.status == status, await resp.text()
    return await resp.json()


async def test_two_replicas_share_secrets_and_director_counters(
    postgres_db: PostgresDatabase, aiohttp_client: Any, tmp_path: Path
) -> None:
    # postgres_db first: torn down last, after the apps closed their pools.
    clients: list[TestClient[Any, Any]] = []
    for name in ("a", "b"):
        if name == "b":  # the keys A made at its first start, deployed to B
            (tmp_path / "b").mkdir()
            shutil.copytree(tmp_path / "a" / KEY_DIR, tmp_path / "b" / KEY_DIR)
            shutil.copy2(tmp_path / "a" / KEY_FILE, tmp_path / "b" / KEY_FILE)
        settings = PlatformSettings(data_dir=tmp_path / name, database_url=postgres_db.url)
        clients.append(await aiohttp_client(create_app(settings)))
    a, b = clients
    op = {"Authorization": f"Bearer {settings.token_file.read_text().strip()}"}
    enrolled = await _ok(await a.post("/v1/devices", json={"id": "dev-1"}, headers=op), 201)
    dev = {"Authorization": f"Bearer {enrolled['token']}"}

    # The director: one counter sequence for dev-1, whichever replica signs.
    async def config(client: TestClient[Any, Any], level: str) -> None:
        body = {"set": {"log_level": level}}
        await _ok(await client.post("/v1/devices/dev-1/config", json=body, headers=op))

    async def desired(client: TestClient[Any, Any]) -> dict[str, Any]:
        got = await _ok(await client.get("/v1/devices/dev-1/desired", headers=dev))
        return dict(got["device"])

    await config(a, "debug")
    first = await desired(a)
    assert first["signed"]["counter"] == 1
    assert await desired(b) == first  # B hands out the envelope A stored: a redelivery
    await config(b, "info")
    assert (await desired(b))["signed"]["counter"] == 2
    await config(a, "warning")
    assert (await desired(a))["signed"]["counter"] == 3

    # Secrets: sealed to the one platform key, set through either, versions count on.
    key = await _ok(await b.get("/v1/secrets/key", headers=op))
    public = public_key_from_pem(key["public_pem"].encode())
    for client, value in ((a, b"first-value"), (b, b"second-value")):
        box = seal(public, value, platform_aad("device", "dev-1", "api-key"))
        body = {"scope": "device", "target": "dev-1", "box": box, "size": len(value)}
        await _ok(await client.put("/v1/secrets/api-key", json=body, headers=op))
    for client in (a, b):
        listed = await _ok(await client.get("/v1/secrets", headers=op))
        assert [(r["name"], r["version"]) for r in listed["secrets"]] == [("api-key", 2)]

    for name in ("a", "b"):  # secrets.db, director.db: in PostgreSQL instead
        assert not list((tmp_path / name).glob("*.db"))
