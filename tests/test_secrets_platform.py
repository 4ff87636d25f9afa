"""The platform's secrets API and `edge-cloud secret` against a real platform process.

Bad input gets a stable code and the right status or exit code, and nothing stored changes;
a device reaches only its own secrets; what a device fetches opens only with its own key.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloud_sync.credentials import from_dict
from cloud_sync.sealbox import device_aad, open_box, private_key_from_pem
from tests.harness import http
from tests.registry_helpers import Platform, cli, ok, refused, start_platform

pytestmark = pytest.mark.slow

VALUE = b"platform-test-VALUE-91c2"


@pytest.fixture(scope="module")
def plat(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    p = start_platform(tmp_path_factory.mktemp("secrets-plat"))
    yield p
    p.stop()


def edge(plat: Platform, *args: str | Path) -> Any:
    return cli(*args, "--data-dir", plat.data_dir)


def enrol(plat: Platform, device: str, tmp: Path, labels: str = "") -> dict[str, Any]:
    out = tmp / f"{device}.json"
    ok(
        edge(
            plat,
            "device",
            "enroll",
            device,
            "--out",
            out,
            *(["--labels", labels] if labels else []),
        )
    )
    return dict(json.loads(out.read_text()))


def call(plat: Platform, method: str, path: str, token: str, body: Any = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return http(method, plat.url + path, data, headers)


def test_secret_cli_and_api_refuse_bad_input_and_devices_see_only_their_own(
    plat: Platform, tmp_path: Path
) -> None:
    a = enrol(plat, "dev-a", tmp_path, "group=blue")
    b = enrol(plat, "dev-b", tmp_path)
    value = tmp_path / "v"
    value.write_bytes(VALUE)
    # ---- CLI bad input: stable codes, usage exit status, nothing stored
    assert edge(plat, "secret", "set", "Bad Name", "--device", "dev-a",
                "--from-file", value).returncode == 2  # fmt: skip
    refused(edge(plat, "secret", "set", "Bad_Name!", "--device", "dev-a", "--from-file", value),
            "bad_secret_name")  # fmt: skip
    refused(edge(plat, "secret", "set", "k", "--device", "dev-a", "--from-file", tmp_path / "no"),
            "unreadable_file")  # fmt: skip
    big = tmp_path / "big"
    big.write_bytes(b"x" * (64 * 1024 + 1))
    refused(edge(plat, "secret", "set", "k", "--device", "dev-a", "--from-file", big), "too_large")
    assert edge(plat, "secret", "set", "k", "--from-file", value).returncode == 2  # no target
    assert "no secrets" in ok(edge(plat, "secret", "list"))
    # ---- the API refuses a clear or foreign value and a bad target
    op = plat.token
    clear = {"scope": "device", "target": "dev-a", "box": {"v": "clear"}, "size": 5}
    resp = call(plat, "PUT", "/v1/secrets/k", op, clear)
    assert resp.status == 400 and resp.json()["error"]["code"] == "sealed_box_invalid"
    resp = call(plat, "PUT", "/v1/secrets/k", op,
                {"scope": "device", "target": "a/b", "box": {}, "size": 1})  # fmt: skip
    assert resp.status == 400 and resp.json()["error"]["code"] == "bad_target"
    assert call(plat, "PUT", "/v1/secrets/k", "", {}).status == 401
    assert call(plat, "PUT", "/v1/secrets/k", a["token"], {}).status == 403  # a device
    # ---- set for dev-a and for its group; dev-b gets nothing of it
    assert "version 1" in ok(edge(plat, "secret", "set", "api-key", "--device", "dev-a",
                                  "--from-file", value))  # fmt: skip
    assert "version 1" in ok(edge(plat, "secret", "set", "fleet", "--group", "blue",
                                  "--from-file", value))  # fmt: skip
    listed = ok(edge(plat, "secret", "list", "--device", "dev-a"))
    assert "api-key" in listed and "fleet" in listed and VALUE.decode() not in listed
    # ---- devices: key registration, fetch, ack
    path_a = "/v1/devices/dev-a/secrets"
    resp = call(plat, "GET", path_a, a["token"])
    assert resp.status == 409 and resp.json()["error"]["code"] == "no_device_key"
    resp = call(plat, "PUT", path_a + "/key", a["token"], {"cert_pem": b["cert_pem"]})
    assert resp.status == 400 and resp.json()["error"]["code"] == "bad_device_certificate"
    resp = call(plat, "PUT", path_a + "/key", a["token"], {"cert_pem": "junk"})
    assert resp.status == 400
    assert call(plat, "PUT", path_a + "/key", a["token"], {"cert_pem": a["cert_pem"]}).status == 200
    assert call(plat, "GET", path_a, b["token"]).status == 403  # dev-b may not read dev-a's
    resp = call(plat, "GET", path_a, a["token"])
    assert resp.status == 200 and VALUE not in resp.body
    got = resp.json()["secrets"]
    assert set(got) == {"api-key", "fleet"}
    creds = from_dict({k: a[k] for k in ("device_id", "platform_url", "broker_url", "ca_pem",
                                         "cert_pem", "key_pem")})  # fmt: skip
    key = private_key_from_pem(creds.key_pem)
    for name, entry in got.items():
        assert open_box(key, entry["box"], device_aad("dev-a", name, entry["version"])) == VALUE
    bad_ack = call(plat, "POST", path_a + "/ack", a["token"], {"versions": {"api-key": "1"}})
    assert bad_ack.status == 400
    assert (
        call(plat, "POST", path_a + "/ack", a["token"], {"versions": {"api-key": 1}}).status == 200
    )
    rows = json.loads(ok(edge(plat, "secret", "list", "--json")))["secrets"]
    assert {r["name"]: r["acknowledged"] for r in rows} == {
        "api-key": {"dev-a": 1},
        "fleet": {},
    }
    assert all("box" not in r and "value" not in r for r in rows)
    assert VALUE.decode() not in plat.log_text()
