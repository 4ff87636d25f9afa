"""`edge-cloud` command line: the platform server and the function author's tools.

    edge-cloud serve [--data-dir D] [--host H] [--port N] [--mqtt-port M | --broker URL] [--tls]
                                                                run the platform
    edge-cloud broker config --data-dir D --out DIR [--port N]  Mosquitto config, ACL, certs
    edge-cloud device enroll ID --out FILE [--labels k=v,...]   device credentials file
    edge-cloud device config ID --set KEY=VALUE ...             change desired config (live)
    edge-cloud device revoke ID                                 revoke certificate and token
    edge-cloud group config NAME --set KEY=VALUE ...            a group's desired config
    edge-cloud devices [--json]                                 the fleet: online, versions
    edge-cloud metrics ID [--function F] [--json]               stored metrics of a device
    edge-cloud keys create --out FILE                           Ed25519 signing key + FILE.pub
    edge-cloud fn new NAME --runtime cpp|go|node [--dir PATH]   scaffold a function
    edge-cloud fn test DIR                                      run its tests (real toolchain)
    edge-cloud fn build DIR --key FILE [--out B] [--arch LIST]  compile, pack, sign
    edge-cloud fn sign BUNDLE --key FILE [--add]                re-sign (or add a signature)
    edge-cloud fn publish BUNDLE --platform URL [--token T]     upload to the registry
    edge-cloud simulate --devices N --platform URL [--fault F]  simulated fleet (loopback)

`fn build` flow: read edgefn.toml -> load the key (fail before a long build) -> per target arch
(host first, then `--arch`), compile into a private payload dir (Go cross-compiles with GOARCH;
C++ uses the g++ cross compiler when installed, else prints "skipped <arch>" and goes on; Node is
arch-independent: one common payload with its production npm dependencies installed at build
time) -> `runtimes.bundle.build_bundle` packs, checks what a device will check, and signs. Progress
goes to stdout; the bundle path is always the last line, so scripts can take `| tail -1`.

Each subcommand imports what it needs when it runs. Exit status: 0 success; 1 refused or failed
(one line on stderr says why); 2 bad usage or bad local input; 3 the platform was unreachable.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cloud_sync.errors import describe_http_error
from cloud_sync.platform import simulator_cli

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

# npm talks to the registry; a wedged network must end in an error, not a hung build.
NPM_TIMEOUT_S = 600.0
TEST_TIMEOUT_S = 600.0
PUBLISH_TIMEOUT_S = 300.0
# What never goes into a Node payload from the author's directory.
_NODE_IGNORE = (".git", "node_modules", "*.efb", ".edgefn-*")
# Machine names `--arch` accepts, to the names devices report (hardware.profile.ARCHES).
_ARCH_NAMES = {
    "x86_64": "x86_64",
    "amd64": "x86_64",
    "aarch64": "aarch64",
    "arm64": "aarch64",
    "armv7": "armv7",
    "armv7l": "armv7",
    "armhf": "armv7",
}
_CROSS_PACKAGES = {
    "aarch64": "g++-aarch64-linux-gnu",
    "armv7": "g++-arm-linux-gnueabihf",
    "x86_64": "g++-x86-64-linux-gnu",
}


def _fail(message: str, code: int) -> int:
    print(f"edge-cloud: {' '.join(message.split())}", file=sys.stderr)
    return code


def _say(line: str) -> None:
    print(line, flush=True)


def build_parser() -> argparse.ArgumentParser:
    from cloud_sync.platform.settings import DEFAULT_PORT, default_data_dir

    parser = argparse.ArgumentParser(prog="edge-cloud", description="edgefn cloud platform")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the platform: function registry")
    serve.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("EDGEFN_CLOUD_DATA_DIR", default_data_dir())),
        help="platform data directory (default: $EDGEFN_CLOUD_DATA_DIR or "
        "~/.local/share/edgefn-cloud)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (0 picks a free one)")
    serve.add_argument("--max-bundle-bytes", type=int, default=None)
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    mq = serve.add_mutually_exclusive_group()
    mq.add_argument(
        "--mqtt-port",
        type=int,
        default=int(os.environ.get("EDGEFN_MQTT_PORT", "0")),
        help="port of the embedded MQTT broker on 127.0.0.1 (default: a free one)",
    )
    mq.add_argument("--broker", help="external broker, mqtts://host:port (Mosquitto, EMQX, ...)")
    serve.add_argument("--no-mqtt", action="store_true", help="no broker at all (HTTP only)")
    serve.add_argument("--tls", action="store_true", help="serve HTTPS (certificate from the CA)")
    serve.add_argument("--public-url", default="", help="platform URL written into credentials")
    serve.add_argument(
        "--device-broker-url", default="", help="broker URL written into credentials"
    )

    broker = sub.add_parser("broker", help="external broker setup")
    broker_sub = broker.add_subparsers(dest="broker_command", required=True)
    bc = broker_sub.add_parser("config", help="write mosquitto.conf, ACL, CA, server cert, CRL")
    bc.add_argument("--data-dir", type=Path, required=True, help="platform data dir (its CA)")
    bc.add_argument("--out", type=Path, required=True)
    bc.add_argument("--port", type=int, default=8883)
    bc.add_argument("--listen", default="127.0.0.1", help="address to listen on ('' = all)")
    bc.add_argument("--hostname", action="append", default=[], help="name in the server cert")
    bc.add_argument("--no-persistence", action="store_true")

    def operator_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--platform", help="platform URL (default: from --data-dir)")
        p.add_argument("--token", help="operator token (default: $EDGEFN_TOKEN)")
        p.add_argument("--data-dir", type=Path, help="platform data dir on this host")

    device = sub.add_parser("device", help="one device: enroll, config, revoke")
    device_sub = device.add_subparsers(dest="device_command", required=True)
    de = device_sub.add_parser("enroll", help="issue a device's credentials file")
    de.add_argument("id")
    de.add_argument("--out", type=Path, required=True, help="credentials file to write (0600)")
    de.add_argument("--labels", default="", help="k=v,k=v (group=NAME joins a group)")
    operator_args(de)
    dc = device_sub.add_parser("config", help="set desired config keys (dotted paths)")
    dc.add_argument("id")
    dc.add_argument("--set", action="append", required=True, metavar="KEY=VALUE")
    operator_args(dc)
    dr = device_sub.add_parser("revoke", help="revoke the device's certificate and token")
    dr.add_argument("id")
    operator_args(dr)
    group = sub.add_parser("group", help="group desired config")
    group_sub = group.add_subparsers(dest="group_command", required=True)
    gc = group_sub.add_parser("config", help="set desired config keys of a group")
    gc.add_argument("name")
    gc.add_argument("--set", action="append", required=True, metavar="KEY=VALUE")
    operator_args(gc)
    devs = sub.add_parser("devices", help="list devices")
    devs.add_argument("--json", action="store_true")
    operator_args(devs)
    met = sub.add_parser("metrics", help="a device's stored metrics")
    met.add_argument("id")
    met.add_argument("--function")
    met.add_argument("--json", action="store_true")
    operator_args(met)

    keys = sub.add_parser("keys", help="signing keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    kc = keys_sub.add_parser("create", help="create an Ed25519 signing key (FILE, FILE.pub)")
    kc.add_argument("--out", type=Path, required=True)

    fn = sub.add_parser("fn", help="author functions: new, test, build, sign, publish")
    fn_sub = fn.add_subparsers(dest="fn_command", required=True)
    new = fn_sub.add_parser("new", help="scaffold a function whose handler echoes its input")
    new.add_argument("name")
    new.add_argument("--runtime", required=True, choices=("cpp", "go", "node"))
    new.add_argument("--dir", type=Path, help="where (default: ./NAME)")
    test = fn_sub.add_parser("test", help="run a function's own tests")
    test.add_argument("dir", type=Path)
    build = fn_sub.add_parser("build", help="compile, pack and sign a bundle")
    build.add_argument("dir", type=Path)
    build.add_argument("--key", type=Path, required=True, help="private signing key")
    build.add_argument("--out", type=Path, help="bundle path (default: ./NAME-VERSION.efb)")
    build.add_argument(
        "--arch", default="", help="extra target arches, comma separated: x86_64,aarch64"
    )
    sign = fn_sub.add_parser("sign", help="re-sign a bundle with another key")
    sign.add_argument("bundle", type=Path)
    sign.add_argument("--key", type=Path, required=True)
    sign.add_argument("--out", type=Path, help="default: replace BUNDLE")
    sign.add_argument(
        "--add", action="store_true", help="add a signature, keep the existing ones (rotation)"
    )
    pub = fn_sub.add_parser("publish", help="upload a bundle to the registry")
    pub.add_argument("bundle", type=Path)
    pub.add_argument("--platform", required=True, help="platform URL")
    pub.add_argument("--token", help="operator token (default: $EDGEFN_TOKEN)")
    pub.add_argument(
        "--data-dir", type=Path, help="platform data dir on this host: reads its token"
    )
    simulator_cli.add_parser(sub)
    return parser


# ---- serve ------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from cloud_sync.errors import CloudSyncError
    from cloud_sync.platform.server import serve
    from cloud_sync.platform.settings import DEFAULT_MAX_BUNDLE_BYTES, PlatformSettings

    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    settings = PlatformSettings(
        data_dir=args.data_dir.resolve(),
        host=args.host,
        port=args.port,
        max_bundle_bytes=args.max_bundle_bytes or DEFAULT_MAX_BUNDLE_BYTES,
        broker="" if args.no_mqtt else (args.broker or "embedded"),
        mqtt_port=args.mqtt_port,
        tls=args.tls,
        public_url=args.public_url,
        device_broker_url=args.device_broker_url,
    )
    try:
        asyncio.run(serve(settings))
    except CloudSyncError as exc:
        return _fail(exc.message, EXIT_USAGE)
    except OSError as exc:
        return _fail(str(exc), EXIT_ERROR)
    return 0


# ---- keys -------------------------------------------------------------------------------------


def cmd_keys(args: argparse.Namespace) -> int:
    from runtimes.errors import BundleError
    from runtimes.signing import create_keypair

    try:
        files = create_keypair(args.out)
    except (BundleError, OSError) as exc:
        return _fail(getattr(exc, "message", str(exc)), EXIT_USAGE)
    _say(f"private key: {files.private} (mode 0600; keep it secret)")
    _say(f"public key:  {files.public} (give it to devices: edge-agent trust add)")
    _say(f"key id:      {files.key_id}")
    return 0


# ---- fn new / test ----------------------------------------------------------------------------


def cmd_fn_new(args: argparse.Namespace) -> int:
    from cloud_sync.platform.scaffold import scaffold
    from runtimes.errors import ManifestError

    directory = args.dir or Path(args.name)
    try:
        files = scaffold(args.name, args.runtime, directory)
    except (ManifestError, OSError) as exc:
        return _fail(getattr(exc, "message", str(exc)), EXIT_USAGE)
    for f in files:
        _say(f"created {f}")
    _say(f"next: edge-cloud fn test {directory} && edge-cloud fn build {directory} --key KEY")
    return 0


def _run(argv: list[str], cwd: Path, env: dict[str, str] | None, timeout: float) -> int:
    try:
        return subprocess.run(
            argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, timeout=timeout, check=False
        ).returncode
    except FileNotFoundError:
        print(f"edge-cloud: {argv[0]} is not installed", file=sys.stderr)
        return 127
    except subprocess.TimeoutExpired:
        print(f"edge-cloud: {argv[0]} ran longer than {timeout:g} s", file=sys.stderr)
        return 124


def cmd_fn_test(args: argparse.Namespace) -> int:
    from runtimes.errors import RuntimeErrorBase
    from runtimes.manifest import MANIFEST_NAME, load_manifest

    directory: Path = args.dir.resolve()
    try:
        manifest = load_manifest(directory / MANIFEST_NAME)
    except RuntimeErrorBase as exc:
        return _fail(exc.message, EXIT_USAGE)
    try:
        if manifest.runtime == "node":
            from runtimes.launchers import node_executable

            code = _run([node_executable(), "--test"], directory, None, TEST_TIMEOUT_S)
        elif manifest.runtime == "go":
            code = _go_test(directory)
        else:
            libs = manifest.extra.get("build", {}).get("libs", [])
            code = _cpp_test(directory, libs)
    except RuntimeErrorBase as exc:
        return _fail(exc.message, EXIT_ERROR)
    if code != 0:
        return _fail(f"tests of {manifest.name} failed (exit {code})", EXIT_ERROR)
    _say(f"tests of {manifest.name} passed")
    return 0


def _go_test(directory: Path) -> int:
    from runtimes.gobuild import SDK_DIR, SDK_MODULE, default_cache_dir, find_go

    go = str(find_go())
    env = dict(os.environ)
    env.pop("GOARCH", None)
    env.update(
        GOTOOLCHAIN="local",
        GOPROXY="off",
        GOWORK="off",
        GOFLAGS="-mod=vendor" if (directory / "vendor").is_dir() else "-mod=mod",
        GOCACHE=str(default_cache_dir()),
    )
    with tempfile.TemporaryDirectory(prefix="edgefn-gotest-") as tmp:
        work = Path(tmp) / "src"
        shutil.copytree(directory, work, ignore=shutil.ignore_patterns(".git", "*.efb"))
        if (work / "go.mod").exists() and not (work / "vendor").is_dir():
            rc = _run(
                [go, "mod", "edit", f"-replace={SDK_MODULE}={SDK_DIR.resolve()}"], work, env, 60
            )
            if rc != 0:
                return rc
        return _run([go, "test", "./..."], work, env, TEST_TIMEOUT_S)


def _cpp_test(directory: Path, libs: list[str]) -> int:
    from runtimes.cppbuild import SDK_INCLUDE, SOURCE_SUFFIXES, compiler_for

    sources = [str(p) for p in sorted(directory.iterdir()) if p.suffix in SOURCE_SUFFIXES]
    tests = [str(p) for p in sorted((directory / "test").glob("*")) if p.suffix in SOURCE_SUFFIXES]
    if not tests:
        print(f"edge-cloud: no tests in {directory / 'test'}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="edgefn-cpptest-") as tmp:
        exe = Path(tmp) / "test"
        link = [lib if lib.startswith("-l") else f"-l{lib}" for lib in libs]
        argv = [compiler_for(None), "-std=c++17", "-O1", "-pthread", "-I", str(directory)]
        argv += ["-I", str(SDK_INCLUDE), *sources, *tests, "-o", str(exe), *link]
        code = _run(argv, directory, None, TEST_TIMEOUT_S)
        if code != 0:
            return code
        return _run([str(exe)], directory, None, TEST_TIMEOUT_S)


# ---- fn build ---------------------------------------------------------------------------------


def _target_arches(extra: str) -> list[str]:
    """Host arch first, then the `--arch` list, as machine names (x86_64, aarch64, armv7)."""
    from runtimes.bundle import host_arch

    host = _ARCH_NAMES.get(host_arch().split("-", 1)[1], host_arch().split("-", 1)[1])
    out = [host]
    for item in (a.strip().lower() for a in extra.split(",")):
        if not item:
            continue
        machine = _ARCH_NAMES.get(item.removeprefix("linux-"))
        if machine is None:
            raise ValueError(f"unknown arch {item!r}: use x86_64, aarch64 or armv7")
        if machine not in out:
            out.append(machine)
    return out


def _timed(say: Callable[[str], None], what: str, fn: Callable[[], Any]) -> Any:
    say(f"{what} ...")
    started = time.monotonic()
    result = fn()
    say(f"  done in {time.monotonic() - started:.1f} s")
    return result


def _stage_node(src: Path, stage: Path, say: Callable[[str], None]) -> None:
    """Copy the sources and install production dependencies into the copy (never on devices)."""
    from runtimes.errors import BuildError

    shutil.copytree(src, stage, ignore=shutil.ignore_patterns(*_NODE_IGNORE), symlinks=True)
    package = stage / "package.json"
    if not package.exists():
        say("node: no package.json, no dependencies to install")
        return
    try:
        deps = json.loads(package.read_text(encoding="utf-8")).get("dependencies") or {}
    except (OSError, ValueError) as exc:
        raise BuildError(f"{src / 'package.json'}: not valid JSON: {exc}") from exc
    if not deps:
        say("node: package.json has no dependencies")
        return
    npm = shutil.which("npm")
    if npm is None:
        raise BuildError("npm is not installed; it installs the function's dependencies")
    verb = "ci" if (stage / "package-lock.json").exists() else "install"
    # --no-bin-links: bundles hold no symlinks; --ignore-scripts: no dependency code runs on the
    # build machine (native addons, which need install scripts, would be arch-specific anyway).
    argv = [npm, verb, "--omit=dev", "--no-bin-links", "--ignore-scripts", "--no-audit"]
    argv += ["--no-fund", "--loglevel=error"]
    started = time.monotonic()
    say(f"node: npm {verb} --omit=dev ({len(deps)} dependencies) ...")
    try:
        proc = subprocess.run(
            argv,
            cwd=stage,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=NPM_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise BuildError(f"npm {verb} did not finish within {NPM_TIMEOUT_S:g} s") from exc
    if proc.returncode != 0:
        tail = (proc.stderr + proc.stdout).strip()[-2000:]
        raise BuildError(f"npm {verb} failed (exit {proc.returncode}): {tail}")
    say(f"  done in {time.monotonic() - started:.1f} s")
    native = sorted(p.relative_to(stage) for p in (stage / "node_modules").rglob("*.node"))
    if native:
        say(f"warning: native addons ({', '.join(map(str, native[:3]))}) only run on this arch")


def _build_payloads(
    src: Path, manifest: Any, arches: list[str], tmp: Path, say: Callable[[str], None]
) -> dict[str, Path]:
    from runtimes.errors import ToolchainError

    payloads: dict[str, Path] = {}
    if manifest.runtime == "go":
        from runtimes.gobuild import build_go, goarch_name

        for machine in arches:
            out = tmp / machine
            target = "armv7l" if machine == "armv7" else machine
            what = (
                f"go: building {manifest.name} for linux-{machine} (GOARCH={goarch_name(target)})"
            )
            _timed(say, what, functools.partial(build_go, src, out / manifest.entry, goarch=target))
            payloads[f"linux-{machine}"] = out
    elif manifest.runtime == "cpp":
        from runtimes.cppbuild import build_cpp

        libs = manifest.extra.get("build", {}).get("libs", [])
        for i, machine in enumerate(arches):
            out = tmp / machine
            out.mkdir()
            try:
                _timed(
                    say,
                    f"c++: building {manifest.name} for linux-{machine}",
                    functools.partial(
                        build_cpp,
                        src,
                        out,
                        manifest.entry,
                        arch=None if i == 0 else machine,
                        libs=libs,
                    ),
                )
            except ToolchainError as exc:
                if i == 0:
                    raise
                package = _CROSS_PACKAGES.get(machine, "a cross compiler")
                say(f"skipped {machine}: install {package} ({exc.message})")
                continue
            payloads[f"linux-{machine}"] = out
    return payloads


def _include_common(src: Path, manifest: Any, tmp: Path) -> Path | None:
    """Go/C++: files named by [build] include (globs) go into the common payload."""
    from runtimes.errors import BuildError

    patterns = manifest.extra.get("build", {}).get("include", [])
    if not patterns:
        return None
    common = tmp / "common"
    for pattern in patterns:
        matches = sorted(src.glob(pattern))
        if not matches:
            raise BuildError(f"[build] include: {pattern!r} matches nothing in {src}")
        for path in matches:
            rel = path.relative_to(src)
            dest = common / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            if path.is_dir():
                shutil.copytree(path, dest, symlinks=True, dirs_exist_ok=True)
            else:
                shutil.copy2(path, dest, follow_symlinks=False)
    return common


def cmd_fn_build(args: argparse.Namespace) -> int:
    from runtimes.bundle import build_bundle
    from runtimes.errors import RuntimeErrorBase
    from runtimes.manifest import MANIFEST_NAME, load_manifest
    from runtimes.signing import key_id, load_private_key

    src: Path = args.dir.resolve()
    try:
        manifest = load_manifest(src / MANIFEST_NAME)
        key = load_private_key(args.key)
        arches = _target_arches(args.arch)
    except RuntimeErrorBase as exc:
        return _fail(exc.message, EXIT_USAGE)
    except ValueError as exc:
        return _fail(str(exc), EXIT_USAGE)
    out: Path = (args.out or Path(f"{manifest.name}-{manifest.version}.efb")).absolute()
    _say(f"building {manifest.name} {manifest.version} ({manifest.runtime}) from {src}")
    try:
        with tempfile.TemporaryDirectory(prefix="edgefn-build-") as tmp_s:
            tmp = Path(tmp_s)
            if manifest.runtime == "node":
                if args.arch:
                    _say("node: arch-independent, one bundle runs on every arch")
                common: Path | None = tmp / "common"
                assert common is not None
                _stage_node(src, common, _say)
                payloads: dict[str, Path] = {}
            else:
                payloads = _build_payloads(src, manifest, arches, tmp, _say)
                common = _include_common(src, manifest, tmp)
            arch_list = ", ".join(payloads) or "any arch"
            _timed(
                _say,
                f"packing and signing ({arch_list}) with key {key_id(key)}",
                lambda: build_bundle(manifest, payloads, common, key, out),
            )
    except RuntimeErrorBase as exc:
        return _fail(f"build of {manifest.name} failed: {exc.message}", EXIT_ERROR)
    except OSError as exc:
        return _fail(f"build of {manifest.name} failed: {exc}", EXIT_ERROR)
    _say(str(out))
    return 0


# ---- fn sign ----------------------------------------------------------------------------------


def _write_bundle(out: Path, manifest_bytes: bytes, sig_bytes: bytes, raw: Any) -> None:
    """The outer archive exactly as runtimes.bundle writes it, payload copied from `raw`.

    (runtimes.bundle has no public "replace the signatures" call yet; this mirrors its private
    writer: ustar, manifest.json, manifest.sig, payload members sorted, normalised headers.)
    """
    import io
    import tarfile

    def info(name: str, size: int) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.size, ti.mtime, ti.mode, ti.uid, ti.gid = size, 0, 0o644, 0, 0
        ti.uname = ti.gname = ""
        return ti

    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                tar.addfile(info("manifest.json", len(manifest_bytes)), io.BytesIO(manifest_bytes))
                tar.addfile(info("manifest.sig", len(sig_bytes)), io.BytesIO(sig_bytes))
                with raw.open() as src:
                    for name in sorted(raw.members):
                        m = raw.members[name]
                        src.seek(m.offset)
                        tar.addfile(info(name, m.size), io.BytesIO(src.read(m.size)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def cmd_fn_sign(args: argparse.Namespace) -> int:
    import base64
    import dataclasses

    from runtimes.bundle import (
        BundleManifest,
        canonical_json,
        check_payload,
        parse_signatures,
        read_bundle,
        sign_manifest,
    )
    from runtimes.errors import RuntimeErrorBase
    from runtimes.signing import key_id, load_private_key
    from runtimes.verify import Ed25519Verifier

    out: Path = args.out or args.bundle
    try:
        key = load_private_key(args.key)
        raw = read_bundle(args.bundle)
        manifest = BundleManifest.from_bytes(raw.manifest_bytes)
        check_payload(raw, manifest)  # never sign bytes that do not match their manifest
        if args.add:
            manifest_bytes = raw.manifest_bytes
            sigs = {
                kid: base64.b64encode(s).decode()
                for kid, s in parse_signatures(raw.signature_bytes)
            }
            new = json.loads(sign_manifest(manifest_bytes, [key]))["signatures"][0]
            sigs[new["keyid"]] = new["sig"]
            sig_bytes = canonical_json(
                {"signatures": [{"keyid": k, "sig": v} for k, v in sorted(sigs.items())]}
            )
        else:
            manifest_bytes = dataclasses.replace(manifest, publisher=key_id(key)).to_bytes()
            sig_bytes = sign_manifest(manifest_bytes, [key])
        _write_bundle(out.absolute(), manifest_bytes, sig_bytes, raw)
        Ed25519Verifier([key.public_key()]).verify(out)  # what a device trusting the key does
    except RuntimeErrorBase as exc:
        return _fail(f"cannot sign {args.bundle}: {exc.message}", EXIT_ERROR)
    except OSError as exc:
        return _fail(f"cannot sign {args.bundle}: {exc}", EXIT_ERROR)
    _say(f"signed {manifest.name} {manifest.version} with key {key_id(key)}")
    _say(str(out.absolute()))
    return 0


# ---- fn publish -------------------------------------------------------------------------------


def _operator_token(args: argparse.Namespace) -> str | None:
    if args.token:
        return str(args.token)
    if os.environ.get("EDGEFN_TOKEN"):
        return os.environ["EDGEFN_TOKEN"]
    if args.data_dir is not None:
        from cloud_sync.platform.auth import read_token
        from cloud_sync.platform.settings import PlatformSettings

        return read_token(PlatformSettings(data_dir=args.data_dir).token_file)
    return None


def cmd_fn_publish(args: argparse.Namespace) -> int:
    from cloud_sync.errors import CloudSyncError
    from cloud_sync.platform.registry import BUNDLE_MEDIA_TYPE

    try:
        token = _operator_token(args)
    except CloudSyncError as exc:
        return _fail(exc.message, EXIT_USAGE)
    if token is None:
        return _fail(
            "no operator token: pass --token, set EDGEFN_TOKEN, or --data-dir of the platform",
            EXIT_USAGE,
        )
    url = f"{args.platform.rstrip('/')}/v1/registry/bundles"
    try:
        size = args.bundle.stat().st_size
        f = open(args.bundle, "rb")  # noqa: SIM115 - closed below, after the request
    except OSError as exc:
        return _fail(f"cannot read {args.bundle}: {exc.strerror}", EXIT_USAGE)
    headers = {
        "Authorization": f"Bearer {token}",
        "Content-Type": BUNDLE_MEDIA_TYPE,
        "Content-Length": str(size),
    }
    req = urllib.request.Request(url, data=f, headers=headers, method="POST")
    _say(f"publishing {args.bundle} ({size} bytes) to {args.platform}")
    try:
        with f, urllib.request.urlopen(req, timeout=PUBLISH_TIMEOUT_S) as resp:
            doc = json.loads(resp.read())
            status = resp.status
    except urllib.error.HTTPError as exc:
        return _fail(f"publish refused: {_http_error(exc)}", EXIT_ERROR)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return _fail(f"cannot reach the platform at {url}: {reason}", EXIT_UNREACHABLE)
    except ValueError:
        return _fail(f"the platform at {url} answered garbage", EXIT_ERROR)
    what = "published" if status == 201 else "already published (same digest)"
    _say(f"{what}: {doc['name']}@{doc['version']} {doc['digest']} ({doc['size']} bytes)")
    return 0


def _http_error(exc: urllib.error.HTTPError) -> str:
    return describe_http_error(exc.code, exc.read())


# ---- dispatch ---------------------------------------------------------------------------------


def cmd_fn(args: argparse.Namespace) -> int:
    handlers = {
        "new": cmd_fn_new,
        "test": cmd_fn_test,
        "build": cmd_fn_build,
        "sign": cmd_fn_sign,
        "publish": cmd_fn_publish,
    }
    return handlers[args.fn_command](args)


# ---- fleet: broker config, device, group, devices, metrics -------------------------------------

FLEET_TIMEOUT_S = 30.0


def cmd_broker(args: argparse.Namespace) -> int:
    from cloud_sync.errors import CloudSyncError
    from cloud_sync.platform.broker_config import write_broker_files
    from cloud_sync.platform.pki import PlatformCA

    try:
        ca = PlatformCA.load_or_create(args.data_dir)
        files = write_broker_files(
            ca,
            args.out,
            port=args.port,
            host=args.listen or None,
            hostnames=args.hostname or ["localhost"],
            persistence=not args.no_persistence,
        )
    except (CloudSyncError, OSError, ValueError) as exc:
        return _fail(getattr(exc, "message", str(exc)), EXIT_USAGE)
    _say(f"wrote {files.config}, {files.acl}, {files.cafile}, {files.certfile}, {files.crlfile}")
    _say(f"run: mosquitto -c {files.config}")
    _say(
        f"then: edge-cloud serve --data-dir {args.data_dir} --broker mqtts://localhost:{args.port}"
    )
    return 0


def _platform_url(args: argparse.Namespace) -> str | None:
    if args.platform:
        return str(args.platform).rstrip("/")
    if args.data_dir is not None:
        from cloud_sync.platform.settings import PlatformSettings

        try:
            state = json.loads(PlatformSettings(data_dir=args.data_dir).state_file.read_text())
            return str(state["url"]).rstrip("/")
        except (OSError, ValueError, KeyError):
            return None
    return None


def _api(
    args: argparse.Namespace, method: str, path: str, body: Any = None
) -> tuple[int, Any] | int:
    """Call the platform as the operator: (status, JSON) or an exit code after printing why."""
    from cloud_sync.errors import CloudSyncError

    try:
        token = _operator_token(args)
    except CloudSyncError as exc:
        return _fail(exc.message, EXIT_USAGE)
    if token is None:
        return _fail(
            "no operator token: pass --token, set EDGEFN_TOKEN, or --data-dir of the platform",
            EXIT_USAGE,
        )
    base = _platform_url(args)
    if base is None:
        return _fail(
            "no platform: pass --platform URL (or --data-dir of a running one)", EXIT_USAGE
        )
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Authorization": f"Bearer {token}"}
    if data is not None:
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(base + path, data=data, headers=headers, method=method)
    ctx = None
    if base.startswith("https:") and args.data_dir is not None:
        import ssl

        ctx = ssl.create_default_context(cafile=str(args.data_dir / "pki" / "ca.crt"))
    try:
        with urllib.request.urlopen(req, timeout=FLEET_TIMEOUT_S, context=ctx) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return _fail(f"refused: {_http_error(exc)}", EXIT_ERROR)
    except (urllib.error.URLError, OSError) as exc:
        return _fail(
            f"cannot reach the platform at {base}: {getattr(exc, 'reason', exc)}",
            EXIT_UNREACHABLE,
        )
    except ValueError:
        return _fail(f"the platform at {base} answered garbage", EXIT_ERROR)


def _parse_labels(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--labels: {item!r} is not k=v")
        out[key] = value
    return out


def cmd_device(args: argparse.Namespace) -> int:
    from urllib.parse import quote

    from cloud_sync.credentials import from_dict
    from cloud_sync.errors import CloudSyncError
    from runtimes.fsio import atomic_write

    if args.device_command == "enroll":
        try:
            labels = _parse_labels(args.labels)
        except ValueError as exc:
            return _fail(str(exc), EXIT_USAGE)
        got = _api(args, "POST", "/v1/devices", {"id": args.id, "labels": labels})
        if isinstance(got, int):
            return got
        doc = got[1]
        try:
            from_dict(doc, "credentials from the platform")
            atomic_write(args.out, json.dumps(doc, indent=2).encode() + b"\n", mode=0o600)
        except (CloudSyncError, OSError) as exc:
            return _fail(getattr(exc, "message", str(exc)), EXIT_ERROR)
        _say(f"enrolled {args.id}: credentials in {args.out} (mode 0600; it holds the key)")
        _say(f"run: edge-agent run --cloud {doc['platform_url']} --credentials {args.out}")
        return 0
    path = f"/v1/devices/{quote(args.id, safe='')}"
    if args.device_command == "revoke":
        got = _api(args, "POST", path + "/revoke", {})
        if isinstance(got, int):
            return got
        _say(f"revoked {args.id} (serial {got[1]['revoked_serial']}); CRL: {got[1]['crl']}")
        _say("an external broker needs the new CRL: copy it and reload (SIGHUP) the broker")
        return 0
    return _set_config(args, path + "/config")


def cmd_group(args: argparse.Namespace) -> int:
    from urllib.parse import quote

    return _set_config(args, f"/v1/groups/{quote(args.name, safe='')}/config")


def _set_config(args: argparse.Namespace, path: str) -> int:
    from cloud_sync.platform.fleet_store import parse_assignments

    try:
        sets = parse_assignments(args.set)
    except ValueError as exc:
        return _fail(str(exc), EXIT_USAGE)
    got = _api(args, "POST", path, {"set": sets})
    if isinstance(got, int):
        return got
    doc = got[1]
    how = "published" if doc.get("published") else "stored (published when the broker is back)"
    _say(f"desired version {doc['version']} {how}: {json.dumps(doc['config'], sort_keys=True)}")
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    got = _api(args, "GET", "/v1/devices")
    if isinstance(got, int):
        return got
    items = got[1]["devices"]
    if args.json:
        print(json.dumps(items, indent=2))
        return 0
    for d in items:
        cv = d["config_version"]
        fns = ",".join(f"{k}@{v}" for k, v in sorted(d["functions"].items())) or "-"
        seen = time.strftime("%H:%M:%S", time.localtime(d["last_seen"])) if d["last_seen"] else "-"
        state = "revoked" if d.get("revoked") else ("online" if d["online"] else "offline")
        print(
            f"{d['id']:<20} {state:<8} seen {seen:<9}"
            f" config {cv['reported']}/{cv['desired']}  {fns}"
        )
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    from urllib.parse import quote, urlencode

    query = f"?{urlencode({'function': args.function})}" if args.function else ""
    got = _api(args, "GET", f"/v1/devices/{quote(args.id, safe='')}/metrics{query}")
    if isinstance(got, int):
        return got
    doc = got[1]
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"{doc['device']}: {doc['records']} metrics records")
    for name, f in sorted(doc["functions"].items()):
        ratio = f["cache_hit_ratio"]
        print(
            f"  {name:<24} invocations={f['invocations']} errors={f['errors']}"
            f" avg={f['latency_ms_avg']} ms cache_hit_ratio={ratio}"
        )
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    return simulator_cli.run(args, _operator_token(args))


COMMANDS = {
    "serve": cmd_serve,
    "keys": cmd_keys,
    "fn": cmd_fn,
    "broker": cmd_broker,
    "device": cmd_device,
    "group": cmd_group,
    "devices": cmd_devices,
    "metrics": cmd_metrics,
    "simulate": cmd_simulate,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
