"""`edge-cloud` operator commands against a real platform process: TLS, refusals, quiet logs."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud_sync.errors import PkiError
from cloud_sync.platform import cli as platform_cli
from tests.mosquitto import free_port
from tests.registry_helpers import Platform, build, cli, ok, start_platform


@pytest.fixture(scope="module")
def tls_platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    plat = start_platform(tmp_path_factory.mktemp("plat-tls") / "data", "--tls")
    yield plat
    plat.stop()


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.mark.slow
def test_serve_logs_no_broker_state_machine_lines(tmp_path: Path) -> None:
    plat = start_platform(tmp_path / "data")
    try:
        # The platform's own MQTT session connecting is where amqtt's state machine ran.
        plat.wait_log("connected", timeout=30)
        enrolled = cli("device", "enroll", "dev-q", "--out", tmp_path / "q.json", "--data-dir",
                       plat.data_dir)  # fmt: skip
        assert enrolled.returncode == 0, enrolled.stderr
    finally:
        plat.stop()
    assert "amqtt" in plat.log_text()  # the embedded broker did run and log
    assert [line for line in plat.lines if "transitions" in line] == []


@pytest.mark.slow
def test_operator_commands_check_https_against_the_platform_ca(
    tls_platform: Platform, tmp_path: Path
) -> None:
    assert tls_platform.url.startswith("https://")
    out = tmp_path / "d1.json"
    enrolled = cli("device", "enroll", "d1", "--out", out, "--data-dir", tls_platform.data_dir)
    assert enrolled.returncode == 0, enrolled.stderr
    assert json.loads(out.read_text())["device_id"] == "d1"
    listed = cli("devices", "--json", "--data-dir", tls_platform.data_dir)
    assert listed.returncode == 0, listed.stderr
    assert [d["id"] for d in json.loads(listed.stdout)] == ["d1"]
    # Without the platform's data dir there is no CA to trust: refused, not downgraded.
    blind = cli("devices", "--platform", tls_platform.url, "--token", tls_platform.token)
    assert blind.returncode == platform_cli.EXIT_UNREACHABLE
    assert "CERTIFICATE_VERIFY_FAILED" in one_line(blind.stderr)


@pytest.mark.slow
def test_operator_refusals_and_setup_problems_are_one_line_with_a_code(
    tls_platform: Platform,
) -> None:
    data = ["--data-dir", str(tls_platform.data_dir)]
    denied = cli("devices", "--token", "wrong", *data)
    assert denied.returncode == platform_cli.EXIT_ERROR
    line = one_line(denied.stderr)
    assert line == "edge-cloud: refused: credentials not accepted (forbidden, HTTP 403)"
    missing = cli("metrics", "nobody", *data)
    assert missing.returncode == platform_cli.EXIT_ERROR
    assert "(unknown_device, HTTP 404)" in one_line(missing.stderr)
    no_platform = cli("devices", "--token", "t")
    assert no_platform.returncode == platform_cli.EXIT_USAGE
    assert one_line(no_platform.stderr).endswith("(no_platform)")
    dead = cli("devices", "--platform", f"http://127.0.0.1:{free_port()}", "--token", "t")
    assert dead.returncode == platform_cli.EXIT_UNREACHABLE
    line = one_line(dead.stderr)
    assert "cannot reach the platform" in line and line.endswith("(http_unreachable)")


def test_an_unexpected_edgefn_error_is_one_line_with_its_code(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def explode(args: argparse.Namespace) -> int:
        raise PkiError("the CA key is unreadable")

    monkeypatch.setitem(platform_cli.COMMANDS, "devices", explode)
    assert platform_cli.main(["devices"]) == platform_cli.EXIT_ERROR
    assert capsys.readouterr().err == "edge-cloud: the CA key is unreadable (pki_error)\n"


@pytest.mark.slow
def test_fn_publish_checks_https_against_the_platform_ca(
    tls_platform: Platform, tmp_path: Path
) -> None:
    ok(cli("keys", "create", "--out", tmp_path / "k.key"))
    ok(cli("fn", "new", "pubtls", "--runtime", "node", "--dir", tmp_path / "pubtls"))
    bundle = build(tmp_path / "pubtls", tmp_path / "k.key", tmp_path / "pubtls.efb")
    base = ["fn", "publish", bundle, "--platform", tls_platform.url]
    # Without the data dir there is no platform CA to trust: unreachable, never downgraded.
    blind = cli(*base, "--token", tls_platform.token)
    assert blind.returncode == platform_cli.EXIT_UNREACHABLE
    line = one_line(blind.stderr)
    assert "CERTIFICATE_VERIFY_FAILED" in line and line.endswith("(http_unreachable)")
    data = ["--data-dir", tls_platform.data_dir]
    denied = cli(*base, "--token", "wrong", *data)
    assert denied.returncode == platform_cli.EXIT_ERROR
    assert one_line(denied.stderr) == (
        "edge-cloud: publish refused: the operator token is wrong (forbidden, HTTP 403)"
    )
    assert "published: pubtls@" in ok(cli(*base, *data))
    assert "already published (same digest)" in ok(cli(*base, *data))
