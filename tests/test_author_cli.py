"""`edge-cloud` author tools with the real toolchains: keys, fn new/test/build/sign, deps."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from runtimes.bundle import BundleManifest, host_arch, read_bundle
from runtimes.errors import BundleError
from runtimes.verify import Ed25519Verifier
from tests.harness import start_agent
from tests.registry_helpers import agent_cli, build, cli, ok
from tests.test_install import wait_serving


def keypair(tmp_path: Path, name: str = "k.key") -> Path:
    ok(cli("keys", "create", "--out", tmp_path / name))
    return tmp_path / name


def verifier(*keys: Path) -> Ed25519Verifier:
    return Ed25519Verifier.from_files([Path(f"{k}.pub") for k in keys])


def test_keys_create(tmp_path: Path) -> None:
    out = ok(cli("keys", "create", "--out", tmp_path / "k.key"))
    assert stat.S_IMODE((tmp_path / "k.key").stat().st_mode) == 0o600
    assert (tmp_path / "k.key.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert "key id:" in out
    again = cli("keys", "create", "--out", tmp_path / "k.key")
    assert again.returncode == 2 and "already exists" in again.stderr


@pytest.mark.parametrize(
    ("runtime", "files"),
    [
        ("node", {"edgefn.toml", "handler.js", "handler.test.js", "package.json"}),
        ("go", {"edgefn.toml", "go.mod", "main.go", "main_test.go", ".gitignore"}),
        ("cpp", {"edgefn.toml", "hello.cpp", "test/echo_test.cpp", ".gitignore"}),
    ],
)
def test_fn_new_scaffolds_into_name_by_default(
    tmp_path: Path, runtime: str, files: set[str]
) -> None:
    ok(cli("fn", "new", "hello", "--runtime", runtime, cwd=tmp_path))
    made = {
        str(p.relative_to(tmp_path / "hello"))
        for p in (tmp_path / "hello").rglob("*")
        if p.is_file()
    }
    assert made == files
    again = cli("fn", "new", "hello", "--runtime", runtime, cwd=tmp_path)
    assert again.returncode == 2 and "not empty" in again.stderr
    bad = cli("fn", "new", "Bad Name", "--runtime", runtime, cwd=tmp_path)
    assert bad.returncode == 2 and "must match" in bad.stderr


def test_node_scaffold_tests_run_and_catch_a_broken_handler(tmp_path: Path) -> None:
    fn = tmp_path / "echo"
    ok(cli("fn", "new", "echo", "--runtime", "node", "--dir", fn))
    assert "tests of echo passed" in ok(cli("fn", "test", fn))
    (fn / "handler.js").write_text("exports.handler = async (e) => Buffer.from('nope');\n")
    broken = cli("fn", "test", fn)
    assert broken.returncode == 1 and "tests of echo failed" in broken.stderr


def test_build_prints_progress_and_the_bundle_path_last(tmp_path: Path) -> None:
    key = keypair(tmp_path)
    fn = tmp_path / "echo"
    ok(cli("fn", "new", "echo", "--runtime", "node", "--dir", fn))
    out = ok(cli("fn", "build", fn, "--key", key, cwd=tmp_path)).strip().splitlines()
    assert out[-1] == str(tmp_path / "echo-0.1.0.efb")
    assert any(line.startswith("packing and signing") for line in out)
    bundle = verifier(key).verify(Path(out[-1]))
    assert bundle.name == "echo" and bundle.arches == () and bundle.manifest.common is not None
    # A signing key others can read is refused before anything is built.
    key.chmod(0o644)
    loose = cli("fn", "build", fn, "--key", key, "--out", tmp_path / "x.efb")
    assert loose.returncode == 2 and "readable by others" in loose.stderr
    assert not (tmp_path / "x.efb").exists()


def test_sign_replaces_or_adds_signatures(tmp_path: Path) -> None:
    old, new = keypair(tmp_path, "old.key"), keypair(tmp_path, "new.key")
    fn = tmp_path / "echo"
    ok(cli("fn", "new", "echo", "--runtime", "node", "--dir", fn))
    bundle = build(fn, old, tmp_path / "echo.efb")
    both = tmp_path / "both.efb"
    ok(cli("fn", "sign", bundle, "--key", new, "--add", "--out", both))
    verifier(old).verify(both)
    verifier(new).verify(both)  # rotation: devices trusting either key accept it
    assert read_bundle(both).manifest_bytes == read_bundle(bundle).manifest_bytes
    out = ok(cli("fn", "sign", bundle, "--key", new)).strip().splitlines()
    assert out[-1] == str(bundle)
    assert verifier(new).verify(bundle).manifest.publisher == verifier(new).key_ids[0]
    with pytest.raises(BundleError) as exc:
        verifier(old).verify(bundle)
    assert exc.value.code == "unknown_signer"


@pytest.mark.ci_may_skip("checks the cross compiler's absence; skips where it is installed")
def test_cpp_aarch64_is_skipped_with_a_clear_message_when_no_cross_compiler(tmp_path: Path) -> None:
    if shutil.which("aarch64-linux-gnu-g++"):
        pytest.skip("the aarch64 cross compiler is installed here")
    key = keypair(tmp_path)
    fn = tmp_path / "hello"
    ok(cli("fn", "new", "hello", "--runtime", "cpp", "--dir", fn))
    out = ok(
        cli(
            "fn", "build", fn, "--key", key, "--arch", "x86_64,aarch64", "--out", tmp_path / "h.efb"
        )
    )
    assert "skipped aarch64: install g++-aarch64-linux-gnu" in out
    assert out.strip().splitlines()[-1] == str(tmp_path / "h.efb")
    assert BundleManifest.from_bytes(read_bundle(tmp_path / "h.efb").manifest_bytes).arches == (
        host_arch(),
    )


# ---- dependencies ---------------------------------------------------------------------------


def install_and_invoke(tmp_path: Path, key: Path, bundle: Path, name: str, payload: bytes) -> bytes:
    data = tmp_path / "device"
    ok(agent_cli("trust", "add", f"{key}.pub", "--data-dir", data))
    ok(agent_cli("fn", "install", bundle, "--data-dir", data))
    agent = start_agent(data, "--require-signed")
    try:
        wait_serving(agent, name, "0.1.0")
        resp = agent.invoke(name, payload, {"Content-Type": "application/octet-stream"})
        assert resp.status == 200, resp.body
        return resp.body
    finally:
        agent.stop()


@pytest.mark.slow
def test_node_dependencies_are_installed_into_the_bundle(tmp_path: Path) -> None:
    key = keypair(tmp_path)
    fn = tmp_path / "dur"
    ok(cli("fn", "new", "dur", "--runtime", "node", "--dir", fn))
    (fn / "package.json").write_text(
        '{"name": "dur", "version": "0.1.0", "private": true,\n'
        ' "dependencies": {"ms": "2.1.3"}, "devDependencies": {"left-pad": "1.3.0"}}\n'
    )
    (fn / "handler.js").write_text(
        "const ms = require('ms');\n"
        "exports.handler = async (event) => String(ms(event.toString('utf8')));\n"
    )
    out = ok(cli("fn", "build", fn, "--key", key, "--out", tmp_path / "dur.efb"))
    assert "npm install --omit=dev" in out
    assert not (fn / "node_modules").exists()  # installed into the bundle, not the sources
    unpacked = tmp_path / "unpacked"
    verifier(key).verify(tmp_path / "dur.efb").unpack(host_arch(), unpacked)
    assert (unpacked / "node_modules" / "ms" / "index.js").is_file()
    assert not (unpacked / "node_modules" / "left-pad").exists()  # dev dependencies stay out
    assert install_and_invoke(tmp_path, key, tmp_path / "dur.efb", "dur", b"2h") == b"7200000"
    # With a lock file the build uses `npm ci`.
    subprocess.run(
        ["npm", "install", "--package-lock-only", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=fn,
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert "npm ci --omit=dev" in ok(
        cli("fn", "build", fn, "--key", key, "--out", tmp_path / "d2.efb")
    )


@pytest.mark.slow
def test_go_builds_from_vendored_modules(tmp_path: Path) -> None:
    key = keypair(tmp_path)
    fn = tmp_path / "greet"
    ok(cli("fn", "new", "greet", "--runtime", "go", "--dir", fn))
    (fn / "go.mod").write_text(
        "module example.com/greet-fn\n\ngo 1.21\n\n"
        "require (\n\tedgefn.dev/sdk v0.0.0\n\texample.com/greeting v1.0.0\n)\n"
    )
    lib = fn / "vendor" / "example.com" / "greeting"
    lib.mkdir(parents=True)
    (lib / "greeting.go").write_text(
        "package greeting\n\n"
        'func Hello(b []byte) []byte { return append([]byte("hello, "), b...) }\n'
    )
    (fn / "vendor" / "modules.txt").write_text(
        "# example.com/greeting v1.0.0\n## explicit\nexample.com/greeting\n"
    )
    main = (fn / "main.go").read_text()
    main = main.replace('"context"\n', '"context"\n\n\t"example.com/greeting"\n')
    main = main.replace("return req.Payload, nil", "return greeting.Hello(req.Payload), nil")
    (fn / "main.go").write_text(main)
    (fn / "main_test.go").unlink()
    bundle = build(fn, key, tmp_path / "greet.efb")
    assert install_and_invoke(tmp_path, key, bundle, "greet", b"edge") == b"hello, edge"


@pytest.mark.slow
def test_cpp_links_the_libraries_the_manifest_names(tmp_path: Path) -> None:
    if not Path("/usr/include/zlib.h").exists():
        pytest.skip("zlib1g-dev is not installed")
    key = keypair(tmp_path)
    fn = tmp_path / "crc"
    ok(cli("fn", "new", "crc", "--runtime", "cpp", "--dir", fn))
    (fn / "crc.cpp").write_text(
        "#include <edgefn.hpp>\n#include <zlib.h>\n#include <string>\n#include <string_view>\n"
        "std::string handle(std::string_view in) {\n"
        "  auto c = crc32(0L, reinterpret_cast<const Bytef*>(in.data()), in.size());\n"
        "  return std::to_string(c);\n}\nEDGEFN_FUNCTION(handle)\n"
    )
    shutil.rmtree(fn / "test")
    without = cli("fn", "build", fn, "--key", key, "--out", tmp_path / "crc.efb")
    assert without.returncode == 1 and "crc32" in without.stderr
    manifest = fn / "edgefn.toml"
    manifest.write_text(manifest.read_text().replace("libs = []", 'libs = ["z"]'))
    bundle = build(fn, key, tmp_path / "crc.efb")
    assert install_and_invoke(tmp_path, key, bundle, "crc", b"hello") == b"907060870"
