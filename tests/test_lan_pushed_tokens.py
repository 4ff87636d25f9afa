"""Tokens pushed from a real platform through desired state (`lan.tokens`, hashes only) and
validated there; the agent keeps them beside its local tokens and drops them when removed."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cloud_sync.errors import ConfigError
from cloud_sync.state import validate_config
from edge_agent.tokens import TokenStore, hash_token
from tests.harness import FUNCTIONS, AgentProcess, http, install_dev_function, start_agent
from tests.registry_helpers import Platform, cli, start_platform

PUSHED = "eft_pushed-by-the-platform-0000000000000000000000000"


def _set_desired(platform: Platform, device: str, tokens: list[dict[str, object]]) -> None:
    resp = http(
        "POST",
        f"{platform.url}/v1/devices/{device}/config",
        json.dumps({"set": {"lan.tokens": tokens}}).encode(),
        {"Authorization": f"Bearer {platform.token}", "Content-Type": "application/json"},
    )
    assert resp.status == 200, resp.body


def _status_with(agent: AgentProcess, token: str, want: int, within_s: float = 30) -> int:
    """Invoke with `token` until the answer is `want` (bounded); returns the last status."""
    deadline = time.monotonic() + within_s
    status = 0
    while time.monotonic() < deadline:
        status = agent.invoke("conformance-node", b"x", {"Authorization": f"Bearer {token}"}).status
        if status == want:
            break
        time.sleep(0.3)
    return status


@pytest.mark.slow
def test_platform_pushed_tokens_work_beside_local_ones_and_go_when_removed(
    tmp_path: Path,
) -> None:
    platform = start_platform(tmp_path / "platform")
    try:
        creds = tmp_path / "van-9.json"
        made = cli(
            "device", "enroll", "van-9", "--out", creds,
            "--platform", platform.url, "--token", platform.token,
        )  # fmt: skip
        assert made.returncode == 0, made.stderr
        data = tmp_path / "data"
        install_dev_function(FUNCTIONS / "conformance" / "node", data, "conformance-node")
        local = subprocess.run(
            [sys.executable, "-m", "edge_agent", "token", "create", "--data-dir", str(data),
             "--scope", "invoke:conformance-node"],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout.strip().splitlines()[-1]  # fmt: skip
        agent = start_agent(
            data, "--auth", "token", "--credentials", str(creds), "--fallback-after", "1"
        )
        try:
            assert (
                agent.invoke("conformance-node", b"x", {"Authorization": f"Bearer {PUSHED}"}).status
                == 401
            )
            entry = {
                "id": "depot-ctl",
                "sha256": hash_token(PUSHED),
                "scopes": ["invoke:conformance-node"],
            }
            _set_desired(platform, "van-9", [entry])
            assert _status_with(agent, PUSHED, 200) == 200, agent.log_text()[-3000:]
            records = {r.id: r for r in TokenStore(data / "tokens.json").read()}
            assert records["depot-ctl"].source == "platform"
            assert PUSHED not in (data / "tokens.json").read_text()  # the hash only
            listed = subprocess.run(
                [sys.executable, "-m", "edge_agent", "token", "list", "--data-dir", str(data)],
                capture_output=True, text=True, timeout=60, check=True,
            ).stdout  # fmt: skip
            assert "depot-ctl" in listed and "(from the platform)" in listed

            _set_desired(platform, "van-9", [])
            assert _status_with(agent, PUSHED, 401) == 401
            assert "depot-ctl" not in {r.id for r in TokenStore(data / "tokens.json").read()}
            # The local token was never touched.
            assert (
                agent.invoke("conformance-node", b"x", {"Authorization": f"Bearer {local}"}).status
                == 200
            )
        finally:
            agent.stop()
    finally:
        platform.stop()


def test_platform_refuses_bad_lan_tokens() -> None:
    good = {"id": "a", "sha256": "0" * 64, "scopes": ["invoke:*"], "expires": 2_000_000_000}
    assert validate_config({"lan": {"tokens": [good]}}).raw["lan"]["tokens"] == [good]
    bad = [
        {**good, "sha256": "eft_the-token-itself"},  # never the token
        {**good, "scopes": ["root"]},
        {**good, "id": "has space"},
        {**good, "expires": "tomorrow"},
        {**good, "extra": 1},
    ]
    for item in bad:
        with pytest.raises(ConfigError):
            validate_config({"lan": {"tokens": [item]}})
    with pytest.raises(ConfigError):
        validate_config({"lan": {"tokens": [good, good]}})  # duplicate id
    with pytest.raises(ConfigError):
        validate_config({"lan": {"secrets": []}})
