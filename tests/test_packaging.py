"""The Nuitka-built agent and its .deb, tested as an operator would use them.

Builds happen once per session through packaging/build_binary.sh --if-stale: a build that started
after the last change to every source file under edge_agent/ runtimes/ hardware/ cloud_sync/ (and
the build inputs in packaging/) is reused, so only the first run on a machine or a run after a
source change pays for Nuitka (minutes; see docs/operations.md). CI starts from a fresh clone and
builds (with ccache warm when the machine built before).

The chroot test installs the .deb into a minimal Debian made by debootstrap (no Python in it),
cached as a tarball under ~/.cache/edgefn/ so it is made once per machine.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.harness import FUNCTIONS, REPO, http, pid_alive

# Nuitka takes minutes on two cores; pytest's default 300 s is per test, setup included.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

PACKAGING = REPO / "packaging"
OUT = PACKAGING / "out"
START_TIMEOUT_S = 60.0
# Above the onefile launcher's 30 s grace (after which it kills the agent), so an agent that does
# not drain shows up as a non-zero exit rather than as a test timeout.
STOP_TIMEOUT_S = 40.0


def _missing_build_tools() -> str:
    missing = [tool for tool in ("patchelf", "gcc") if shutil.which(tool) is None]
    if importlib.util.find_spec("nuitka") is None or importlib.util.find_spec("zstandard") is None:
        missing.append("nuitka[onefile] (pip install -e '.[binary]')")
    return ", ".join(missing)


@pytest.fixture(scope="session")
def onefile() -> Path:
    """packaging/out/edge-agent (and edge-agent.dist/ beside it), built when stale."""
    missing = _missing_build_tools()
    if missing:
        # In CI a missing tool is a broken setup, not a reason to skip.
        if os.environ.get("CI"):
            pytest.fail(f"cannot build the agent binary: missing {missing}")
        pytest.skip(f"cannot build the agent binary: missing {missing}")
    proc = subprocess.run(
        ["bash", str(PACKAGING / "build_binary.sh"), "--if-stale"],
        env=dict(os.environ, PYTHON=sys.executable),
        capture_output=True,
        text=True,
        timeout=3000,
    )
    print(proc.stdout, proc.stderr, sep="")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return OUT / "edge-agent"


@pytest.fixture(scope="session")
def dist(onefile: Path) -> Path:
    """packaging/out/edge-agent.dist/: the same compiled program, unpacked (what the .deb ships)."""
    return onefile.parent / "edge-agent.dist"


def _agent_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("EDGEFN_DATA_DIR", None)
    # Prove the binary needs no Python around it.
    for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
        env.pop(name, None)
    return env


def _spawn(argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    # The log goes to a file: a pipe nobody reads while the agent runs could fill and block it.
    with open(log, "wb") as out:
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=out, env=env)


def _log_tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:]


def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process and everything under it (the onefile launcher's child, workers)."""
    family = [proc.pid, *_descendants(proc.pid)]
    for pid in family:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(10)


def _stop(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM, as systemd or a user would, and the exit status (killed if it will not stop)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        return -signal.SIGKILL


def _wait_listening(
    data_dir: Path, proc: subprocess.Popen[bytes], log: Path, timeout: float
) -> dict[str, object]:
    """agent.json once the agent listens: its pid is ours, or our child's (onefile launcher)."""
    state = data_dir / "agent.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            info = json.loads(state.read_text())
        except (OSError, ValueError):
            info = {}
        pid = info.get("pid")
        if isinstance(pid, int) and (pid == proc.pid or _parent(pid) == proc.pid):
            return dict(info)
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    _kill_tree(proc)
    raise AssertionError(f"agent did not start (exit {proc.returncode}):\n{_log_tail(log)}")


def _parent(pid: int) -> int:
    try:
        return psutil.Process(pid).ppid()
    except psutil.Error:
        return -1


def _descendants(pid: int) -> list[int]:
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def _mapped_files(pid: int) -> set[str]:
    files: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].startswith("/"):
                files.add(parts[5])
    return files


def test_help(onefile: Path, dist: Path, tmp_path: Path) -> None:
    top = subprocess.run([onefile, "--help"], capture_output=True, text=True, timeout=60)
    assert top.returncode == 0, top.stderr
    assert "run" in top.stdout and "invoke" in top.stdout
    run = subprocess.run([onefile, "run", "--help"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "--data-dir" in run.stdout
    # The unpacked program, started through a symlink as the .deb's /usr/bin/edge-agent is.
    link = tmp_path / "edge-agent"
    link.symlink_to(dist / "edge-agent")
    unpacked = subprocess.run([link, "--help"], capture_output=True, text=True, timeout=60)
    assert unpacked.returncode == 0, unpacked.stderr
    assert unpacked.stdout == top.stdout


def test_binary_serves_node_and_in_process_cpp_and_stops_on_sigterm(
    onefile: Path, tmp_path: Path, built_conformance: dict[str, Path]
) -> None:
    if shutil.which("node") is None:
        pytest.skip("node is not installed")
    data = tmp_path / "data"
    shutil.copytree(FUNCTIONS / "conformance" / "node", data / "functions" / "conformance-node")
    # The C++ conformance function loaded in the agent's own process: the pybind11 host
    # (runtimes.cpp._host) must have made it into the binary.
    with_cpp = any((REPO / "runtimes" / "cpp").glob("_host*.so"))
    if with_cpp:
        cpp = data / "functions" / "conformance-cpp"
        shutil.copytree(built_conformance["cpp"], cpp)
        manifest = cpp / "edgefn.toml"
        text = manifest.read_text().replace('isolation = "process"', 'isolation = "in-process"')
        assert 'isolation = "in-process"' in text
        manifest.write_text(text)
    argv = [str(onefile), "run", "--data-dir", str(data), "--port", "0"]
    # As root the agent runs workers as edgefn-worker when that user exists; the onefile program
    # unpacks the Node host into a 0700 directory that user cannot read (why the .deb ships the
    # unpacked program). This test is about the binary, so keep workers as root then.
    if os.geteuid() == 0 and _user_exists("edgefn-worker"):
        argv += ["--worker-user", "root"]
    size = onefile.stat().st_size
    log = tmp_path / "agent.log"
    started = time.monotonic()
    proc = _spawn(argv, log, _agent_env())
    try:
        info = _wait_listening(data, proc, log, START_TIMEOUT_S)
        url = str(info["url"])
        assert url.startswith("http://127.0.0.1:")
        payload = bytes(range(256)) * 64 + b"\x00\xff\r\n"
        resp = http("POST", f"{url}/v1/functions/conformance-node/invoke", payload)
        first_served = time.monotonic() - started
        assert resp.status == 200, resp.body[:500]
        assert resp.body == payload
        agent_pid = int(str(info["pid"]))
        maps = _mapped_files(agent_pid)
        # The C extensions are loaded, and with uvloop importable the agent runs on it.
        assert any(re.search(r"/uvloop/loop[^/]*\.so$", f) for f in maps), sorted(maps)
        assert any(re.search(r"/aiohttp/_http_parser[^/]*\.so$", f) for f in maps), sorted(maps)
        if with_cpp:
            resp = http("POST", f"{url}/v1/functions/conformance-cpp/invoke", payload)
            assert resp.status == 200, resp.body[:500]
            assert resp.body == payload
            maps = _mapped_files(agent_pid)
            assert any(re.search(r"/runtimes/cpp/_host[^/]*\.so$", f) for f in maps)
        workers = _descendants(agent_pid)
        assert workers, "no worker process under the agent"
        unpacked = Path(os.readlink(f"/proc/{agent_pid}/exe")).parent
        pss = psutil.Process(agent_pid).memory_full_info().pss
        print(
            f"\nonefile binary: {size / 2**20:.1f} MiB; start to first served invocation: "
            f"{first_served:.2f} s; agent PSS (workers not counted): {pss / 2**20:.1f} MiB"
        )
    except BaseException:
        _stop(proc)
        raise
    assert _stop(proc) == 0, _log_tail(log)
    assert not pid_alive(agent_pid)
    assert not [pid for pid in workers if pid_alive(pid)], "workers outlived the agent"
    assert not (data / "agent.json").exists()
    # The launcher removes what it unpacked when the agent exits.
    assert unpacked != onefile.parent
    assert not unpacked.exists()


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _report_modules(report: Path) -> dict[str, str]:
    """module name -> kind, from Nuitka's --report XML."""
    root = ET.parse(report).getroot()
    return {m.attrib["name"]: m.attrib.get("kind", "") for m in root.iter("module")}


def test_binary_leaves_out_platform_code_and_keeps_extensions(onefile: Path) -> None:
    report = OUT / "edge-agent.report.xml"
    modules = _report_modules(report)
    assert "edge_agent.cli" in modules and "runtimes.pool" in modules
    assert not [
        m for m in modules if m == "cloud_sync.platform" or m.startswith("cloud_sync.platform.")
    ]
    for test_only in ("pytest", "_pytest", "unittest", "setuptools", "pip", "mypy", "tkinter"):
        assert test_only not in modules, test_only
    # The platform's libraries and the author toolchain stay out too (the agent uses sqlite3).
    for platform_only in ("sqlite_utils", "click", "dateutil", "pluggy", "amqtt", "transitions"):
        assert platform_only not in modules, platform_only
    assert not [m for m in modules if m.startswith("cloud_sync.author")]
    assert modules.get("uvloop.loop") == "PythonExtensionModule"
    assert modules.get("aiohttp._http_parser") == "PythonExtensionModule"
    text = report.read_text()
    # The exclusion is explicit, not luck: a platform import added to the agent fails the build
    # or the run instead of shipping the cloud side to devices.
    assert "--nofollow-import-to=cloud_sync.platform" in text
    assert "runtimes/node/bootstrap.mjs" in text


# --- systemd unit --------------------------------------------------------------------------


def _unit_settings() -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for line in (PACKAGING / "edge-agent.service").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, value = line.split("=", 1)
            values.setdefault(key, []).append(value)
    return values


def test_unit_is_hardened_and_valid(tmp_path: Path) -> None:
    unit = _unit_settings()
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "StateDirectory": "edgefn",
        "ReadWritePaths": "/var/lib/edgefn",
        "Restart": "on-failure",
        "Delegate": "yes",
        "KillMode": "mixed",
    }
    for key, value in expected.items():
        assert unit.get(key) == [value], key
    assert unit["ExecStart"] == ["/usr/bin/edge-agent run --config /etc/edgefn/agent.toml"]
    assert int(unit["WatchdogSec"][0]) > 0  # the agent pings from its event loop
    assert "ProtectControlGroups" not in unit  # would make the delegated cgroup read-only
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    exe = tmp_path / "edge-agent"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    copy = tmp_path / "edge-agent.service"
    copy.write_text(
        (PACKAGING / "edge-agent.service").read_text().replace("/usr/bin/edge-agent", str(exe))
    )
    proc = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60
    )
    # Unknown or misspelled directives are only warnings on stderr: there must be none.
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr


# --- .deb ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def deb(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is not installed")
    out = tmp_path_factory.mktemp("deb")
    proc = subprocess.run(
        ["bash", str(PACKAGING / "build_deb.sh"), "--from", str(dist), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    path = Path(proc.stdout.strip().splitlines()[-1])
    print(f"\n.deb: {path.name}, {path.stat().st_size / 2**20:.1f} MiB")
    return path


def _dpkg_deb(*args: str) -> str:
    return subprocess.run(
        ["dpkg-deb", *args], check=True, capture_output=True, text=True, timeout=120
    ).stdout


def test_deb_contents_and_control(deb: Path) -> None:
    listing = _dpkg_deb("-c", str(deb))
    entries = {line.split()[5]: line for line in listing.splitlines()}
    for path in (
        "./usr/lib/edgefn-agent/edge-agent",
        "./lib/systemd/system/edge-agent.service",
        "./etc/edgefn/agent.toml",
        "./usr/share/doc/edgefn-agent/README.md",
    ):
        assert path in entries, path
        assert "root/root" in entries[path]
    assert entries["./"].startswith("drwxr-xr-x")
    assert "./usr/bin/edge-agent" in entries
    assert "-> ../lib/edgefn-agent/edge-agent" in entries["./usr/bin/edge-agent"]
    assert entries["./usr/lib/edgefn-agent/edge-agent"].startswith("-rwxr-xr-x")
    assert "bootstrap.mjs" in listing
    assert "cloud_sync/platform" not in listing

    fields = {
        name: _dpkg_deb("-f", str(deb), name).strip()
        for name in ("Package", "Architecture", "Depends", "Recommends", "Version")
    }
    arch = subprocess.run(
        ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert fields["Package"] == "edgefn-agent"
    assert fields["Architecture"] == arch
    assert "util-linux" in fields["Depends"]
    assert "nodejs" in fields["Recommends"]
    assert _dpkg_deb("-I", str(deb), "conffiles").split() == ["/etc/edgefn/agent.toml"]
    for script in ("postinst", "prerm", "postrm"):
        text = _dpkg_deb("-I", str(deb), script)
        check = subprocess.run(["sh", "-n"], input=text, text=True, capture_output=True)
        assert check.returncode == 0, f"{script}: {check.stderr}"


# --- the .deb on a clean Debian with no Python -----------------------------------------------


def _os_codename() -> str:
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.split("=", 1)[1].strip('"')
    return "bookworm"


def debian_mirror(codename: str) -> str | None:
    """The Debian mirror apt uses for `codename` main (sources.list or deb822 .sources)."""
    apt = Path("/etc/apt")
    files = [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*.list"))]
    for path in files:
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines():
                words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
                if len(words) >= 4 and words[0] == "deb" and words[2] == codename:
                    return words[1]
    for path in sorted((apt / "sources.list.d").glob("*.sources")):
        with contextlib.suppress(OSError):
            for stanza in path.read_text().split("\n\n"):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if ":" in line and not line.startswith(("#", " ")):
                        key, value = line.split(":", 1)
                        fields[key.strip().lower()] = value.strip()
                if (
                    codename in fields.get("suites", "").split()
                    and "deb" in fields.get("types", "").split()
                ):
                    return fields["uris"].split()[0]
    return None


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgefn"


def minbase_tarball(codename: str) -> Path:
    """A debootstrap --variant=minbase root of `codename` as a tar, made once per machine."""
    arch = subprocess.run(
        ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
    ).stdout.strip()
    cache = _cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    tarball = cache / f"debootstrap-{codename}-minbase-{arch}.tar"
    with open(cache / ".debootstrap.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if tarball.exists():
            return tarball
        debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
        if not Path(debootstrap).exists():
            install = subprocess.run(
                ["apt-get", "install", "-y", "-qq", "debootstrap"],
                env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"),
                capture_output=True,
                text=True,
                timeout=600,
            )
            if install.returncode != 0:
                pytest.skip(f"debootstrap is not installable: {install.stderr[-500:]}")
        mirror = debian_mirror(codename)
        if mirror is None:
            pytest.skip(f"no Debian mirror for {codename} in apt's sources")
        root = Path(str(tarball) + ".root")
        shutil.rmtree(root, ignore_errors=True)
        started = time.monotonic()
        proc = subprocess.run(
            [debootstrap, "--variant=minbase", codename, str(root), mirror],
            capture_output=True,
            text=True,
            timeout=1800,
        )
        if proc.returncode != 0:
            shutil.rmtree(root, ignore_errors=True)
            pytest.skip(f"debootstrap failed (mirror {mirror}): {proc.stdout[-1500:]}")
        print(f"\ndebootstrap {codename} minbase: {time.monotonic() - started:.0f} s")
        # Downloaded packages and indexes are not needed to run anything.
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for entry in (root / junk).glob("*"):
                if entry.is_file():
                    entry.unlink()
        partial = Path(str(tarball) + ".partial")
        subprocess.run(["tar", "-C", str(root), "-cf", str(partial), "."], check=True, timeout=600)
        partial.rename(tarball)
        shutil.rmtree(root, ignore_errors=True)
        return tarball


@contextlib.contextmanager
def chroot_with_proc(tarball: Path, where: Path) -> Iterator[Path]:
    root = where / "root"
    root.mkdir()
    subprocess.run(["tar", "-xf", str(tarball), "-C", str(root)], check=True, timeout=600)
    subprocess.run(["mount", "-t", "proc", "proc", str(root / "proc")], check=True, timeout=60)
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", str(root / "proc")], check=False, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.ci_may_skip("debootstraps from a Debian mirror: skips when none is reachable")
def test_deb_installs_and_runs_in_a_clean_debian(deb: Path, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("chroot and mount need root")
    tarball = minbase_tarball(_os_codename())
    with chroot_with_proc(tarball, tmp_path) as root:
        assert not list((root / "usr" / "bin").glob("python*")), "the chroot must have no Python"
        shutil.copy(deb, root / "tmp" / deb.name)

        def inside(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                ["chroot", str(root), *argv],
                capture_output=True,
                text=True,
                timeout=timeout,
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"},
            )

        installed = inside("dpkg", "-i", f"/tmp/{deb.name}")
        assert installed.returncode == 0, installed.stdout + installed.stderr
        for user in ("edge-agent", "edgefn-worker"):
            assert inside("getent", "passwd", user).returncode == 0, user
        assert (root / "var/lib/edgefn").is_dir()

        log = tmp_path / "agent.log"
        argv = ["chroot", str(root), "/usr/bin/edge-agent", "run"]
        argv += ["--data-dir", "/var/lib/edgefn", "--port", "0"]
        proc = _spawn(argv, log, {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"})
        try:
            # chroot execs the agent, so agent.json names our child's pid.
            info = _wait_listening(root / "var/lib/edgefn", proc, log, START_TIMEOUT_S)
            # The chroot shares our network namespace: its loopback is ours.
            health = http("GET", f"{info['url']}/v1/health")
            assert health.status == 200, health.body[:500]
            assert health.json()["status"] == "ok"
        finally:
            code = _stop(proc)
        assert code == 0, _log_tail(log)

        purged = inside("dpkg", "--purge", "edgefn-agent")
        assert purged.returncode == 0, purged.stdout + purged.stderr
        assert not (root / "usr/bin/edge-agent").exists()
        assert not (root / "var/lib/edgefn").exists()
