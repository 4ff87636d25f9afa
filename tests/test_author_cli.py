"""`edge-cloud` author tools with the real toolchains: keys, fn new/test/build/sign, deps."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import time
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


def test_keys_create_makes_a_missing_directory_private(tmp_path: Path) -> None:
    ok(cli("keys", "create", "--out", tmp_path / "keys" / "new" / "k.key"))
    assert (tmp_path / "keys" / "new" / "k.key.pub").exists()
    assert stat.S_IMODE((tmp_path / "keys" / "new").stat().st_mode) == 0o700
    blocked = tmp_path / "a-file"
    blocked.write_text("x")
    refused = cli("keys", "create", "--out", blocked / "k.key")  # a file where a dir should be
    assert refused.returncode == 2 and "a file is in the way" in refused.stderr


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
    # As root the agent runs workers as `edgefn-worker` whenever that machine-wide user exists
    # (other tests create it for a while), and that user cannot read pytest's 0700 temp dirs.
    user = ("--worker-user", "root") if os.geteuid() == 0 else ()
    agent = start_agent(data, "--require-signed", *user)
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
    # The build kept npm's lock file next to package.json (dev dependencies locked too), so the
    # next build installs the same versions with `npm ci`, and builds the same bytes.
    lock = json.loads((fn / "package-lock.json").read_text())
    assert lock["packages"]["node_modules/ms"]["version"] == "2.1.3"
    assert "node_modules/left-pad" in lock["packages"]
    assert "npm ci --omit=dev" in ok(
        cli("fn", "build", fn, "--key", key, "--out", tmp_path / "d2.efb")
    )
    assert (tmp_path / "d2.efb").read_bytes() == (tmp_path / "dur.efb").read_bytes()


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


# ---- defects found trying it as a new user would --------------------------------------------


def _with_ms_dependency(fn: Path) -> None:
    (fn / "package.json").write_text(
        '{"name": "dur", "version": "0.1.0", "private": true, "dependencies": {"ms": "2.1.3"}}\n'
    )
    (fn / "handler.js").write_text(
        "const ms = require('ms');\n"
        "exports.handler = async (event) => String(ms(event.toString('utf8')));\n"
    )


@pytest.mark.slow
def test_node_fn_test_installs_the_functions_dependencies(tmp_path: Path) -> None:
    fn = tmp_path / "dur"
    ok(cli("fn", "new", "dur", "--runtime", "node", "--dir", fn))
    _with_ms_dependency(fn)
    (fn / "handler.test.js").write_text(
        "const test = require('node:test');\nconst assert = require('node:assert');\n"
        "const { handler } = require('./handler.js');\n"
        "test('2h', async () => assert.strictEqual(await handler(Buffer.from('2h')), '7200000'));\n"
    )
    out = ok(cli("fn", "test", fn))
    assert "npm install" in out and "tests of dur passed" in out
    assert not (fn / "node_modules").exists()  # installed into a private copy
    assert (fn / "package-lock.json").is_file()  # and locked, as fn build does


@pytest.mark.slow
def test_bundles_leave_out_tests_and_the_test_folders_of_npm_packages(tmp_path: Path) -> None:
    # A local package published as a tarball: npm installs it offline, with its test/ and
    # benchmark/ folders, like many packages on the registry.
    dep = tmp_path / "dep"
    for rel, text in {
        "package.json": '{"name": "dep", "version": "1.0.0", "main": "index.js"}\n',
        "index.js": "exports.twice = (s) => s + s;\n",
        "test/index.test.js": "throw new Error('never run on a device');\n",
        "benchmark/run.js": "// benchmarks\n",
        "lib/test.js": "// a file named test is code, not a test folder\n",
    }.items():
        (dep / rel).parent.mkdir(parents=True, exist_ok=True)
        (dep / rel).write_text(text)
    subprocess.run(
        ["npm", "pack", "--pack-destination", str(tmp_path), "--loglevel=error"],
        cwd=dep,
        check=True,
        capture_output=True,
        timeout=120,
    )
    key = keypair(tmp_path)
    fn = tmp_path / "twice"
    ok(cli("fn", "new", "twice", "--runtime", "node", "--dir", fn))
    tarball = tmp_path / "dep-1.0.0.tgz"
    (fn / "package.json").write_text(
        json.dumps({"name": "twice", "private": True, "dependencies": {"dep": f"file:{tarball}"}})
    )
    (fn / "handler.js").write_text(
        "const { twice } = require('dep');\n"
        "exports.handler = async (e) => twice(e.toString('utf8'));\n"
    )
    (fn / "test").mkdir()
    (fn / "test" / "more.test.js").write_text("// a test\n")
    (fn / "lib").mkdir()
    (fn / "lib" / "util.js").write_text("exports.x = 1;\n")
    (fn / "lib" / "util.spec.js").write_text("// a test\n")
    bundle = build(fn, key, tmp_path / "twice.efb")
    got = tmp_path / "unpacked"
    verifier(key).verify(bundle).unpack(host_arch(), got)
    files = {str(p.relative_to(got)) for p in got.rglob("*") if p.is_file()}
    assert {"handler.js", "lib/util.js", "node_modules/dep/index.js"} <= files
    assert "node_modules/dep/lib/test.js" in files
    for gone in ("handler.test.js", "test/more.test.js", "lib/util.spec.js"):
        assert gone not in files
    assert not any(
        f.startswith(("node_modules/dep/test/", "node_modules/dep/benchmark/")) for f in files
    )
    assert install_and_invoke(tmp_path, key, bundle, "twice", b"ab") == b"abab"


@pytest.mark.parametrize(
    "runtime",
    [
        "node",
        pytest.param("go", marks=pytest.mark.slow),
        pytest.param("cpp", marks=pytest.mark.slow),
    ],
)
def test_same_sources_and_key_build_the_same_bytes(tmp_path: Path, runtime: str) -> None:
    key = keypair(tmp_path)
    fn = tmp_path / "same"
    ok(cli("fn", "new", "same", "--runtime", runtime, "--dir", fn))
    first = build(fn, key, tmp_path / "one.efb").read_bytes()
    second = build(fn, key, tmp_path / "two.efb").read_bytes()
    assert first == second
    created = BundleManifest.from_bytes(read_bundle(first).manifest_bytes).created_at
    newest = max(p.stat().st_mtime for p in fn.rglob("*") if p.is_file())
    assert created == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(newest)))
    # SOURCE_DATE_EPOCH wins; an edited source dates (and changes) the next bundle.
    pinned = cli(
        "fn",
        "build",
        fn,
        "--key",
        key,
        "--out",
        tmp_path / "p.efb",
        env={"SOURCE_DATE_EPOCH": "1767225600"},
    )
    ok(pinned)
    pinned_manifest = BundleManifest.from_bytes(read_bundle(tmp_path / "p.efb").manifest_bytes)
    assert pinned_manifest.created_at == "2026-01-01T00:00:00Z"
    edited = fn / "edgefn.toml"
    os.utime(edited, (newest + 3600, newest + 3600))
    assert build(fn, key, tmp_path / "three.efb").read_bytes() != first


def test_node_bundles_say_any_arch_not_the_build_machines(tmp_path: Path) -> None:
    key = keypair(tmp_path)
    fn = tmp_path / "echo"
    ok(cli("fn", "new", "echo", "--runtime", "node", "--dir", fn))
    out = ok(cli("fn", "build", fn, "--key", key, "--out", tmp_path / "e.efb"))
    assert "built echo 0.1.0 for any (arch-independent)" in out
    assert "linux-" not in out
    assert BundleManifest.from_bytes(read_bundle(tmp_path / "e.efb").manifest_bytes).arches == ()


def _go_with_relative_replace(tmp_path: Path, target: str) -> Path:
    geo = tmp_path / "geo"
    geo.mkdir()
    (geo / "go.mod").write_text("module example.com/geo\n\ngo 1.21\n")
    (geo / "geo.go").write_text('package geo\n\nfunc Name() string { return "geo" }\n')
    fn = tmp_path / "fn"
    ok(cli("fn", "new", "where", "--runtime", "go", "--dir", fn))
    mod = (fn / "go.mod").read_text()
    mod = mod.replace(
        "require edgefn.dev/sdk v0.0.0\n",
        "require (\n\tedgefn.dev/sdk v0.0.0\n\texample.com/geo v0.0.0\n)\n",
    )
    (fn / "go.mod").write_text(mod + f"\nreplace example.com/geo => {target}\n")
    main = (fn / "main.go").read_text()
    main = main.replace('"context"\n', '"context"\n\n\t"example.com/geo"\n')
    main = main.replace(
        "return req.Payload, nil", 'return append([]byte(geo.Name()+":"), req.Payload...), nil'
    )
    (fn / "main.go").write_text(main)
    (fn / "main_test.go").write_text(
        'package main\n\nimport (\n\t"testing"\n\n\t"example.com/geo"\n)\n\n'
        "func TestGeo(t *testing.T) {\n"
        '\tif geo.Name() != "geo" {\n\t\tt.Fatal(geo.Name())\n\t}\n}\n'
    )
    return fn


@pytest.mark.slow
def test_go_relative_replace_without_vendor_builds_and_tests(tmp_path: Path) -> None:
    key = keypair(tmp_path)
    fn = _go_with_relative_replace(tmp_path, "../geo")
    before = (fn / "go.mod").read_text()
    assert "tests of where passed" in ok(cli("fn", "test", fn))
    bundle = build(fn, key, tmp_path / "where.efb")
    assert (fn / "go.mod").read_text() == before  # the author's go.mod is never edited
    assert install_and_invoke(tmp_path, key, bundle, "where", b"edge") == b"geo:edge"


def test_go_relative_replace_to_nowhere_says_where_it_looked(tmp_path: Path) -> None:
    key = keypair(tmp_path)
    fn = _go_with_relative_replace(tmp_path, "../nowhere")
    failed = cli("fn", "build", fn, "--key", key, "--out", tmp_path / "x.efb")
    assert failed.returncode == 1
    assert str(tmp_path / "nowhere") in failed.stderr
    assert "resolved against the function directory" in failed.stderr
