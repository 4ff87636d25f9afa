"""The platform as a service: its config file (platform/config_file.py), `edge-cloud serve
--config FILE` as a real process, and the hardened systemd unit (packaging/systemd/)."""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from cloud_sync.platform import config_file
from cloud_sync.platform.config_file import ConfigFileError, load, settings_from
from cloud_sync.platform.settings import DEFAULT_PORT
from tests.registry_helpers import REPO, _env

SYSTEMD = REPO / "packaging" / "systemd"
EXAMPLE = SYSTEMD / "platform.toml.example"
UNIT = SYSTEMD / "edgefn-platform.service"
START_TIMEOUT_S = 90.0  # generous: two busy cores


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "platform.toml"
    path.write_text(text)
    return path


def test_the_packaged_example_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGEFN_CLOUD_DATA_DIR", raising=False)
    monkeypatch.delenv("EDGEFN_MQTT_PORT", raising=False)
    values = load(EXAMPLE)
    settings, extra = settings_from(values, {})
    assert settings.data_dir == Path("/var/lib/edgefn-platform")
    assert (settings.host, settings.port) == ("127.0.0.1", DEFAULT_PORT)
    assert settings.broker == "embedded" and settings.tls is False
    assert extra == {"log_level": "info"}


def test_a_full_file_and_flags_over_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGEFN_CLOUD_DATA_DIR", raising=False)
    monkeypatch.delenv("EDGEFN_MQTT_PORT", raising=False)
    (tmp_path / "tls").mkdir()
    path = _write(
        tmp_path,
        """
data_dir = "state"
max_bundle_bytes = 1048576
[listen]
host = "0.0.0.0"
port = 9000
[blobs]
url = "s3://bundles?endpoint=http://127.0.0.1:9999"
credentials_file = "aws-credentials"
[broker]
url = "mqtts://broker.example:8883"
device_url = "mqtts://mqtt.example:8883"
[tls]
enabled = true
cert_file = "tls/platform.crt"
key_file = "tls/platform.key"
""",
    )
    settings, extra = settings_from(load(path), {"port": 0, "host": None})
    assert settings.data_dir == tmp_path / "state"  # relative to the file
    assert (settings.host, settings.port) == ("0.0.0.0", 0)  # the flag won; None = not given
    assert settings.blobs_url == "s3://bundles?endpoint=http://127.0.0.1:9999"
    assert settings.broker == "mqtts://broker.example:8883"
    assert settings.device_broker_url == "mqtts://mqtt.example:8883"
    assert settings.tls_cert_file == tmp_path / "tls" / "platform.crt"
    assert settings.max_bundle_bytes == 1 << 20
    assert extra["blobs_credentials_file"] == tmp_path / "aws-credentials"
    monkeypatch.setenv("EDGEFN_CLOUD_DATA_DIR", str(tmp_path / "from-env"))
    assert settings_from(load(path), {})[0].data_dir == tmp_path / "from-env"  # env over file
    none, _ = settings_from(load(_write(tmp_path, '[broker]\nurl = "none"\n')), {})
    assert none.broker == ""


def test_database_password_comes_from_its_file(tmp_path: Path) -> None:
    (tmp_path / "db.password").write_text("s3cret\n")
    path = _write(
        tmp_path,
        '[database]\nurl = "postgresql://edgefn@127.0.0.1:5432/edgefn"\n'
        'password_file = "db.password"\n',
    )
    values = load(path)
    assert values["database_password"] == "s3cret"
    assert values["database_url"] == "postgresql://edgefn@127.0.0.1:5432/edgefn"
    settings, extra = settings_from(values, {})
    assert settings.database_url == values["database_url"]
    # The password is handed back to the caller (serve puts it in its own environment for the
    # engine), never kept in the settings object, which is logged and passed around.
    assert extra["database_password"] == "s3cret"
    assert "s3cret" not in repr(settings)


BAD = [
    ("colour = 1\n", "key 'colour': unknown key"),
    ("[listen]\nhots = 'x'\n", "key 'listen.hots': unknown key"),
    ("listen = 5\n", "key 'listen': unknown key"),
    ("[listen]\nport = '80'\n", "key 'listen.port': expected an integer, got a string"),
    ("[listen]\nport = true\n", "key 'listen.port': expected an integer, got a boolean"),
    ("[listen]\nport = 70000\n", "key 'listen.port': 70000 is not a port"),
    ("max_bundle_bytes = 0\n", "key 'max_bundle_bytes': expected a positive integer"),
    ("drain_s = -1\n", "key 'drain_s': expected a number >= 0"),
    ("access_log = 'yes'\n", "key 'access_log': expected true or false"),
    ("log_level = 'loud'\n", "key 'log_level': 'loud' is not one of"),
    ("public_url = 'edgefn.example'\n", "key 'public_url': 'edgefn.example' is not an http(s)"),
    ("[database]\npassword = 'x'\n", "key 'database.password': secrets do not belong"),
    ("[database]\nurl = 'postgresql://u:pw@h/db'\n", "key 'database.url': secrets do not belong"),
    ("[database]\nurl = 'mysql://h/db'\n", "key 'database.url': expected postgresql://"),
    ("[database]\npassword_file = 'missing'\n", "key 'database.password_file': cannot read"),
    ("[blobs]\nsecret_access_key = 'x'\n", "key 'blobs.secret_access_key': secrets do not"),
    ("[blobs]\nurl = 'gs://b'\n", "key 'blobs.url': 'gs://b': expected file:///PATH"),
    ("[blobs]\nurl = 's3://b?endpont=http://h'\n", "key 'blobs.url': --blobs s3://b?endpont"),
    ("[broker]\nurl = 'amqp://h'\n", "key 'broker.url': 'amqp://h': expected embedded"),
    ("[broker]\nshared_subscriptions = 1\n", "key 'broker.shared_subscriptions': expected true"),
    ("[tls]\ncert_file = 'a.crt'\n", "key 'tls': cert_file and key_file go together"),
    ("port = = 1\n", "not valid TOML"),
]


@pytest.mark.parametrize(("text", "needle"), BAD, ids=[b[1].split(":")[0] for b in BAD])
def test_bad_files_are_refused_naming_the_key(tmp_path: Path, text: str, needle: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigFileError) as caught:
        load(path)
    assert caught.value.code == "bad_platform_config"
    assert needle in caught.value.message
    assert str(path) in caught.value.message
    assert "pw@" not in caught.value.message and "'x'" not in caught.value.message


def test_unreadable_and_binary_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigFileError, match="cannot read config file"):
        load(tmp_path / "absent.toml")
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigFileError, match="not UTF-8"):
        load(binary)


def test_every_key_is_in_the_example() -> None:
    text = EXAMPLE.read_text()
    for dotted in config_file.KEYS:
        table, _, name = dotted.rpartition(".")
        assert re.search(rf"^#? ?{name} = ", text, re.M), f"{dotted} missing from the example"
        if table:
            assert f"[{table}]" in text


def _serve(config: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "cloud_sync.platform.cli", "serve", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=_env(),
    )


def _wait_started(proc: subprocess.Popen[bytes], data_dir: Path) -> str:
    """The URL from the platform's state file, once this process wrote it."""
    state = data_dir / "platform.json"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            info = json.loads(state.read_text())
        except (OSError, ValueError):
            info = {}
        if info.get("pid") == proc.pid:
            return str(info["url"])
        time.sleep(0.05)
    raise AssertionError(f"platform not started (exit {proc.poll()})")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()


@pytest.mark.slow
def test_edge_cloud_serve_with_a_config_file(tmp_path: Path) -> None:
    shared = tmp_path / "shared-blobs"
    config = _write(
        tmp_path,
        f"""
data_dir = "cloud"
log_level = "warning"
[listen]
host = "127.0.0.1"
port = 0
[blobs]
url = "file://{shared}"
[broker]
url = "none"
""",
    )
    proc = _serve(config)
    try:
        url = _wait_started(proc, tmp_path / "cloud")
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(f"{url}/v1/health", timeout=10) as resp:
            assert json.load(resp)["status"] == "ok"
        assert (shared / "sha256").is_dir()  # the blob store the file named
        assert not (tmp_path / "cloud" / "blobs" / "sha256").exists()
    finally:
        _stop(proc)


@pytest.mark.slow
def test_edge_cloud_serve_with_the_operators_tls_certificate(tmp_path: Path) -> None:
    """[tls] cert_file/key_file: the platform serves that certificate, not one from its CA."""
    from cloud_sync.platform.pki import PlatformCA

    operator_ca = PlatformCA.load_or_create(tmp_path / "operator-ca", common_name="operator CA")
    issued = operator_ca.issue_server_cert(hostnames=("localhost",), ips=("127.0.0.1",))
    (tmp_path / "platform.crt").write_text(issued.cert_pem)
    (tmp_path / "platform.key").write_text(issued.key_pem)
    (tmp_path / "platform.key").chmod(0o600)
    config = _write(
        tmp_path,
        """
data_dir = "cloud"
[listen]
port = 0
[broker]
url = "none"
[tls]
enabled = true
cert_file = "platform.crt"
key_file = "platform.key"
""",
    )
    proc = _serve(config)
    try:
        url = _wait_started(proc, tmp_path / "cloud")
        assert url.startswith("https://127.0.0.1:")
        ctx = ssl.create_default_context(cafile=str(operator_ca.cert_path))
        with urllib.request.urlopen(f"{url}/v1/health", timeout=10, context=ctx) as resp:
            assert json.load(resp)["status"] == "ok"
    finally:
        _stop(proc)


def test_edge_cloud_serve_refuses_a_bad_config_file(tmp_path: Path) -> None:
    config = _write(tmp_path, "[listen]\nport = 'eighty'\n")
    proc = _serve(config)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    lines = [line for line in err.decode().splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "key 'listen.port'" in lines[0] and lines[0].endswith("(bad_platform_config)")


# ---- the systemd unit -------------------------------------------------------------------------

HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectControlGroups": "yes",
    "RestrictSUIDSGID": "yes",
    "RestrictNamespaces": "yes",
    "LockPersonality": "yes",
    "CapabilityBoundingSet": "",
    "StateDirectory": "edgefn-platform",
    "StateDirectoryMode": "0700",
    "UMask": "0077",
}


def _unit() -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False)  # SystemCallFilter= appears twice
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return parser


def test_the_unit_is_hardened_and_runs_serve_with_the_config() -> None:
    unit = _unit()
    service = unit["Service"]
    assert service["ExecStart"] == "/usr/bin/edge-cloud serve --config /etc/edgefn/platform.toml"
    user = service["User"]
    assert user and user != "root"
    for key, value in HARDENING.items():
        assert service.get(key) == value, f"{key}={service.get(key)!r}"
    assert "AF_PACKET" not in service["RestrictAddressFamilies"]
    # No secret on a command line or in the unit's own environment.
    text = UNIT.read_text()
    assert not re.search(r"(?i)(password|secret|token)\s*=", text)
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_systemd_analyze_verify_and_security(tmp_path: Path) -> None:
    """Where systemd-analyze exists (Debian has it): no warnings, a low exposure score. The
    unit is copied with ExecStart on a binary that exists here; nothing else changes."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        assert not os.environ.get("CI"), "CI images have systemd-analyze (systemd package)"
        return  # the parse check above still ran; nothing more can be checked here
    copy = tmp_path / UNIT.name
    copy.write_text(UNIT.read_text().replace("/usr/bin/edge-cloud", shutil.which("true") or ""))
    verify = subprocess.run(
        [tool, "verify", str(copy)], capture_output=True, text=True, timeout=60, check=False
    )
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    security = subprocess.run(
        [tool, "security", "--offline=yes", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", security.stdout)
    assert match, security.stdout[-2000:] + security.stderr
    assert float(match.group(1)) <= 2.0, security.stdout  # systemd calls <= 2.0 "OK"


def test_edge_cloud_serve_refuses_a_bad_blobs_flag(tmp_path: Path) -> None:
    flags = ["--port", "0", "--no-mqtt", "--blobs", "s3://key:secret@bucket"]  # a dummy secret
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cloud_sync.platform.cli",
            "serve",
            "--data-dir",
            str(tmp_path),
            *flags,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
        check=False,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].endswith("(bad_blobs_url)") and "secret" not in lines[0]
