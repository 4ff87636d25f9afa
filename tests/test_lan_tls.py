"""TLS on the local API listener (edge_agent.tls) and CA pinning by LAN clients."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud_sync.platform.pki import PlatformCA
from edge_agent.client import ClientError, LanClient
from tests.harness import FUNCTIONS, AgentProcess, install_dev_function, start_agent

CONFORMANCE_NODE = FUNCTIONS / "conformance" / "node"


def edge_agent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge_agent", *args], capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    fleet = PlatformCA.load_or_create(tmp_path / "fleet", common_name="fleet CA")
    other = PlatformCA.load_or_create(tmp_path / "other", common_name="someone else's CA")
    issued = fleet.issue_server_cert(hostnames=("localhost",), ips=("127.0.0.1",))
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    cert.write_text(issued.cert_pem)
    key.write_text(issued.key_pem)
    key.chmod(0o600)
    return {"ca": fleet.cert_path, "wrong_ca": other.cert_path, "cert": cert, "key": key}


@pytest.fixture
def tls_agent(tmp_path: Path, pki: dict[str, Path]) -> Iterator[tuple[AgentProcess, str]]:
    data = tmp_path / "data"
    install_dev_function(CONFORMANCE_NODE, data, "conformance-node")
    made = edge_agent("token", "create", "--data-dir", str(data), "--scope", "invoke:*")
    token = made.stdout.strip().splitlines()[-1]
    agent = start_agent(
        data,
        "--auth",
        "token",
        "--tls-cert",
        str(pki["cert"]),
        "--tls-key",
        str(pki["key"]),
        "--worker-user",
        "root",  # the test's tmp dir is root-only
    )
    try:
        yield agent, token
    finally:
        agent.stop()


@pytest.mark.slow
def test_tls_with_the_pinned_ca_and_with_a_wrong_one(
    tls_agent: tuple[AgentProcess, str], pki: dict[str, Path]
) -> None:
    agent, token = tls_agent
    assert agent.url.startswith("https://127.0.0.1:")
    pinned = LanClient(agent.url, token=token, cafile=pki["ca"])
    reply = pinned.invoke("conformance-node", b"over tls")
    assert reply.status == 200 and reply.body == b"over tls"
    # TLS does not replace the token check.
    assert LanClient(agent.url, cafile=pki["ca"]).invoke("conformance-node").status == 401

    wrong = LanClient(agent.url, token=token, cafile=pki["wrong_ca"])
    with pytest.raises(ClientError, match="CERTIFICATE_VERIFY_FAILED"):
        wrong.invoke("conformance-node", b"x")
    # No plain-HTTP fallback on the TLS port.
    with pytest.raises(ClientError):
        LanClient(agent.url.replace("https:", "http:"), token=token).invoke("conformance-node")

    url = ["--url", agent.url, "--token", token, "--data", "cli"]
    ok = edge_agent("invoke", "conformance-node", *url, "--cafile", str(pki["ca"]))
    assert ok.returncode == 0 and ok.stdout == "cli", ok.stderr
    bad = edge_agent("invoke", "conformance-node", *url, "--cafile", str(pki["wrong_ca"]))
    assert bad.returncode == 3 and "CERTIFICATE_VERIFY_FAILED" in bad.stderr
    pin = ["--url", agent.url, "--token", token, "--cafile"]
    listed = edge_agent("functions", *pin, str(pki["ca"]))
    assert listed.returncode == 0 and "conformance-node" in listed.stdout, listed.stderr
    refused = edge_agent("functions", *pin, str(pki["wrong_ca"]))
    assert refused.returncode != 0 and "CERTIFICATE_VERIFY_FAILED" in refused.stderr


@pytest.mark.slow
def test_mtls_client_certificates_instead_of_tokens(tmp_path: Path, pki: dict[str, Path]) -> None:
    fleet = PlatformCA.load_or_create(tmp_path / "fleet")
    other = PlatformCA.load_or_create(tmp_path / "other")

    def client_files(ca: PlatformCA, cn: str) -> tuple[Path, Path]:
        issued = ca.issue_client_cert(cn)
        cert, key = tmp_path / f"{cn}-{id(ca)}.crt", tmp_path / f"{cn}-{id(ca)}.key"
        cert.write_text(issued.cert_pem)
        key.write_text(issued.key_pem)
        return cert, key

    head_unit = client_files(fleet, "head-unit")
    depot = client_files(fleet, "depot-ctl")
    stranger = client_files(fleet, "stranger")
    forged = client_files(other, "head-unit")  # right CN, wrong CA
    data = tmp_path / "data"
    install_dev_function(CONFORMANCE_NODE, data, "conformance-node")
    for cn, scope in (("head-unit", "invoke:conformance-node"), ("depot-ctl", "invoke:other")):
        grant = edge_agent(
            "token", "create", "--data-dir", str(data), "--client-cn", cn, "--scope", scope
        )
        assert grant.returncode == 0 and f"CN={cn}" in grant.stdout, grant.stderr
    agent = start_agent(
        data,
        "--auth",
        "mtls",
        "--tls-cert",
        str(pki["cert"]),
        "--tls-key",
        str(pki["key"]),
        "--tls-client-ca",
        str(fleet.cert_path),
        "--worker-user",
        "root",
    )
    try:

        def call(files: tuple[Path, Path] | None) -> int:
            cert, key = files if files else (None, None)
            client = LanClient(agent.url, cafile=pki["ca"], client_cert=cert, client_key=key)
            return client.invoke("conformance-node", b"m").status

        assert call(head_unit) == 200
        assert call(depot) == 403  # a grant, for another function
        assert call(stranger) == 401  # the CA issued it, but no grant names it
        for files in (None, forged):  # no certificate, or one from another CA: no handshake
            with pytest.raises(ClientError):
                call(files)
        cli = edge_agent(
            "invoke", "conformance-node", "--url", agent.url, "--cafile", str(pki["ca"]),
            "--client-cert", str(head_unit[0]), "--client-key", str(head_unit[1]), "--data", "c",
        )  # fmt: skip
        assert cli.returncode == 0 and cli.stdout == "c", cli.stderr
    finally:
        agent.stop()


@pytest.mark.parametrize("which", ["missing", "half", "mismatch"])
def test_unusable_tls_files_stop_the_start(
    tmp_path: Path, pki: dict[str, Path], which: str
) -> None:
    data = ["--data-dir", str(tmp_path / "data"), "--port", "0"]
    if which == "missing":
        tls = ["--tls-cert", str(tmp_path / "nope.crt"), "--tls-key", str(pki["key"])]
        needle = "tls: cannot read"
    elif which == "half":
        tls = ["--tls-cert", str(pki["cert"])]
        needle = "give both the certificate and the key"
    else:
        tls = ["--tls-cert", str(pki["ca"]), "--tls-key", str(pki["key"])]  # not its key
        needle = "cannot use certificate"
    proc = edge_agent("run", *data, *tls)
    assert proc.returncode == 4 and needle in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "data" / "agent.json").exists()


@pytest.mark.slow
def test_enrolment_issues_the_lan_certificate_and_tls_auto_serves_it(tmp_path: Path) -> None:
    from cryptography import x509

    from tests.registry_helpers import cli, start_platform

    platform = start_platform(tmp_path / "platform")
    try:
        creds = tmp_path / "enrol" / "credentials.json"
        creds.parent.mkdir()
        made = cli(
            "device", "enroll", "van-7", "--out", creds, "--san", "127.0.0.1", "--san",
            "van-7.depot.lan", "--platform", platform.url, "--token", platform.token,
        )  # fmt: skip
        assert made.returncode == 0, made.stderr
        cert_file, key_file = (
            creds.with_name("credentials.server.crt"),
            creds.with_name("credentials.server.key"),
        )
        assert key_file.stat().st_mode & 0o777 == 0o600
        fleet_ca = creds.with_name("fleet-ca.pem")
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert {"van-7", "van-7.depot.lan"} <= set(san.get_values_for_type(x509.DNSName))
        assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
        assert "server_key_pem" not in creds.read_text()  # the credentials file stays as it was

        data = tmp_path / "data"
        install_dev_function(CONFORMANCE_NODE, data, "conformance-node")
        token = edge_agent("token", "create", "--data-dir", str(data), "--scope", "invoke:*")
        secret = token.stdout.strip().splitlines()[-1]
        agent = start_agent(
            data, "--auth", "token", "--credentials", str(creds), "--tls", "auto",
            "--worker-user", "root",
        )  # fmt: skip
        try:
            assert agent.url.startswith("https://127.0.0.1:")
            reply = LanClient(agent.url, token=secret, cafile=fleet_ca).invoke(
                "conformance-node", b"pinned"
            )
            assert reply.status == 200 and reply.body == b"pinned"
            other = PlatformCA.load_or_create(tmp_path / "other", common_name="not the fleet")
            with pytest.raises(ClientError, match="CERTIFICATE_VERIFY_FAILED"):
                LanClient(agent.url, token=secret, cafile=other.cert_path).invoke("x")
        finally:
            agent.stop()
    finally:
        platform.stop()


def test_tls_auto_without_an_enrolment_certificate_is_refused(tmp_path: Path) -> None:
    no_creds = edge_agent("run", "--data-dir", str(tmp_path / "d"), "--tls", "auto")
    assert no_creds.returncode != 0 and "--credentials" in no_creds.stderr
    creds = tmp_path / "credentials.json"
    creds.write_text("{}")
    missing = edge_agent(
        "run", "--data-dir", str(tmp_path / "d"), "--tls", "auto", "--credentials", str(creds)
    )
    assert missing.returncode != 0 and "credentials.server.crt" in missing.stderr, missing.stderr
