#!/usr/bin/env bash
# Build the edge agent into a self-contained program with Nuitka: no Python needed on the device.
#
#   packaging/build_binary.sh [--mode onefile|standalone] [--out DIR] [--if-stale] [--jobs N]
#
# onefile (default), one compile, two results:
#   OUT/edge-agent         the single executable; at each start it unpacks OUT/edge-agent.dist's
#                          content into a fresh directory under $TMPDIR and runs it from there
#   OUT/edge-agent.dist/   that same compiled program unpacked (OUT/edge-agent.dist/edge-agent):
#                          what the .deb installs (packaging/build_deb.sh says why)
# standalone: OUT/edge-agent.dist/ only, compiled in Nuitka's standalone mode.
# Both write OUT/edge-agent.report.xml (Nuitka's report: every module, data file and extension
# that went in, with per-module compile times; tests/test_packaging.py reads it) and print the
# size and the build time.
#
# --if-stale skips the build when the last build of that mode started after the last change of
# every source file that goes into it (the .py and data files of edge_agent/ runtimes/
# hardware/ cloud_sync/, and this folder's build inputs). Builds run under a lock, so two test
# sessions never build into the same folder at once.
#
# Needs: the project's venv with the `binary` extra (pip install -e '.[binary]': nuitka, and
# zstandard to compress the onefile), gcc, and Debian's patchelf; ccache makes a rebuild of an
# unchanged tree (same mode, same module set) mostly cache hits. PYTHON overrides the venv.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
PY="${PYTHON:-$REPO/.venv/bin/python}"
MODE=onefile
OUT="$HERE/out"
IF_STALE=0
# Two C compiler jobs: the target machines (and CI) have two cores; LTO is off because on this
# code it adds minutes of link time for a few percent of speed the agent does not need.
JOBS="${NUITKA_JOBS:-2}"

usage() { sed -n '2,23p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --mode) MODE="$2"; shift 2 ;;
    --mode=*) MODE="${1#*=}"; shift ;;
    --out) OUT="$2"; shift 2 ;;
    --out=*) OUT="${1#*=}"; shift ;;
    --jobs) JOBS="$2"; shift 2 ;;
    --jobs=*) JOBS="${1#*=}"; shift ;;
    --if-stale) IF_STALE=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "build_binary.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done

case "$MODE" in
  onefile|standalone) ;;
  *) echo "build_binary.sh: --mode must be onefile or standalone, not $MODE" >&2; exit 2 ;;
esac

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
BUILD="$OUT/build-$MODE"
STAMP="$OUT/.built-$MODE"  # its mtime: when the last successful build of this mode started
REPORT="$OUT/edge-agent.report.xml"
outputs=("$OUT/edge-agent.dist/edge-agent" "$REPORT")
[ "$MODE" = standalone ] || outputs+=("$OUT/edge-agent")

# Everything whose change must trigger a rebuild.
sources() {
  find "$REPO/edge_agent" "$REPO/runtimes" "$REPO/hardware" "$REPO/cloud_sync" \
    -type f \( -name '*.py' -o -name '*.mjs' -o -name '*.json' -o -name '*.so' \) \
    -not -path '*/__pycache__/*'
  printf '%s\n' "$HERE/agent_main.py" "$HERE/build_binary.sh"
}

is_fresh() {
  local f
  for f in "$STAMP" "${outputs[@]}"; do [ -e "$f" ] || return 1; done
  while read -r f; do
    [ "$f" -nt "$STAMP" ] && { echo "rebuilding: $f changed" >&2; return 1; }
  done < <(sources)
  return 0
}

exec 9>"$OUT/.build.lock"
flock 9

if [ "$IF_STALE" = 1 ] && is_fresh; then
  echo "edge-agent ($MODE) is up to date in $OUT"
  exit 0
fi

for tool in patchelf gcc; do
  command -v "$tool" >/dev/null || {
    echo "build_binary.sh: $tool is missing (apt-get install -y patchelf ccache gcc)" >&2; exit 1; }
done
"$PY" -c 'import nuitka, zstandard' 2>/dev/null || {
  echo "build_binary.sh: nuitka is not installed in $PY (pip install -e '.[binary]')" >&2; exit 1; }

VERSION="$("$PY" -c 'import tomllib,sys; print(tomllib.load(open(sys.argv[1],"rb"))["project"]["version"])' "$REPO/pyproject.toml")"

args=(
  --mode="$MODE"
  --output-dir="$BUILD"
  --output-filename=edge-agent
  --jobs="$JOBS"
  --lto=no
  --report="$BUILD/report.xml"
  --product-name=edgefn-agent
  --product-version="$VERSION"
  # Data the agent reads at run time: the Node host and the OpenAPI document it serves.
  # (Go/C++ SDK sources and headers are for building functions, never needed on a device.)
  --include-package-data='runtimes:*.mjs'
  --include-package-data='edge_agent:*.json'
  # Imported inside a function (edge_agent.cli._run_loop); named so a build without it fails.
  --include-module=uvloop
  # Anti-bloat: tests, tooling and platform-only code never go into the device binary.
  # cloud_sync.platform is the cloud side; import-linter forbids the agent to import it, and this
  # makes the binary fail loudly (ImportError) instead of silently carrying it if one appears.
  --nofollow-import-to=cloud_sync.platform
  # The author's toolchain (edge-cloud fn/keys) is forbidden to the agent the same way.
  --nofollow-import-to=cloud_sync.author
  # The platform's own libraries: sqlite-utils (and what it brings: click, dateutil, pluggy,
  # tabulate, sqlite-fts4) and the embedded amqtt broker (transitions, websockets, typer, ...).
  # The agent uses plain sqlite3 and paho; none of its dependencies import these.
  --nofollow-import-to=sqlite_utils
  --nofollow-import-to=sqlite_fts4
  --nofollow-import-to=click
  --nofollow-import-to=click_default_group
  --nofollow-import-to=dateutil
  --nofollow-import-to=pluggy
  --nofollow-import-to=tabulate
  --nofollow-import-to=amqtt
  --nofollow-import-to=transitions
  --nofollow-import-to=websockets
  --nofollow-import-to=typer
  --nofollow-import-to=dacite
  --nofollow-import-to=pwdlib
  --nofollow-import-to=yaml
  # The platform's scale-out libraries (S3 blob store, PostgreSQL) and the test S3 server:
  # securesystemslib (under tuf, which the agent's TUF client uses) tries `import boto3` for
  # its optional cloud signers and falls back when it is missing, so the agent never needs them.
  --nofollow-import-to=boto3
  --nofollow-import-to=botocore
  --nofollow-import-to=s3transfer
  --nofollow-import-to=moto
  --nofollow-import-to=psycopg
  --nofollow-import-to=psycopg_pool
  --nofollow-import-to='*.tests'
  --nofollow-import-to='*.test'
  --nofollow-import-to=test
  --nofollow-import-to=tests
  --nofollow-import-to=tkinter
  --nofollow-import-to=turtle
  --nofollow-import-to=idlelib
  --nofollow-import-to=lib2to3
  --nofollow-import-to=pydoc_data
  --nofollow-import-to=ensurepip
  --nofollow-import-to=venv
  --nofollow-import-to=distutils
  --nofollow-import-to=setuptools
  --nofollow-import-to=pkg_resources
  --nofollow-import-to=pip
  --nofollow-import-to=mypy
  --nofollow-import-to=nuitka
  --nofollow-import-to=pybind11
  --nofollow-import-to=pytest
  --nofollow-import-to=_pytest
  --noinclude-setuptools-mode=nofollow
  --noinclude-pytest-mode=nofollow
  --noinclude-unittest-mode=nofollow
  --noinclude-pydoc-mode=nofollow
  --noinclude-IPython-mode=nofollow
  # Optional integrations and other platforms' code: found by import scanning, never used here
  # (yarl probes for pydantic_core with find_spec and does without it).
  --nofollow-import-to=pydantic
  --nofollow-import-to=pydantic_core
  # ... and a module left out must look absent (find_spec() -> None, ModuleNotFoundError), not
  # raise Nuitka's "actively excluded" ImportError, which breaks such probes.
  --no-deployment-flag=excluded-module-usage
  --nofollow-import-to=aiohttp.worker
  --nofollow-import-to=psutil._psaix
  --nofollow-import-to=psutil._psbsd
  --nofollow-import-to=psutil._psosx
  --nofollow-import-to=psutil._pssunos
  --nofollow-import-to=psutil._pswindows
  # C accelerators the anti-bloat plugin leaves out by default ("may slow down"): json is on
  # every request path.
  --include-module=_json
  --include-module=_bisect
)
# Build time: C-compiling a module costs seconds of CPU, so only the code on the invocation path
# (edge_agent, runtimes, hardware, aiohttp's server side, the stdlib's C parts) is compiled.
# Packages used at start-up, by the CLI or not at all (pure-Python fallbacks of C extensions,
# aiohttp's client side) go in as bytecode and run exactly as under CPython. This halves the C
# compile (report.xml has the per-module CPU times). aiohttp's client stays: the agent's HTTP
# client (cloud sync, cloud invoke) uses it.
for mod in attr attrs typing_extensions \
  idna psutil tzdata multidict._multidict_py yarl._quoting_py propcache._helpers_py \
  aiohttp._websocket.reader_py aiohappyeyeballs aiohttp.client aiohttp.client_exceptions \
  aiohttp.client_middleware_digest_auth aiohttp.client_middlewares aiohttp.client_proto \
  aiohttp.client_reqrep aiohttp.client_ws aiohttp.connector aiohttp.cookiejar \
  aiohttp.formdata aiohttp.multipart aiohttp.resolver aiohttp.tracing aiohttp.web_ws \
  aiohttp.web_fileresponse aiohttp._cookie_helpers; do
  args+=(--noinclude-custom-mode="$mod:bytecode")
done
if [ "$MODE" = onefile ]; then
  # On SIGTERM/SIGINT the onefile launcher sends SIGINT to the agent and kills it after this
  # grace time: it must outlast the agent's drain (10 s) plus stopping the pools. The systemd
  # unit's TimeoutStopSec (45 s) is longer still.
  args+=(--onefile-child-grace-time=30000)
fi
# The pybind11 in-process C++ host is imported by name (importlib) only when a function asks for
# it, so Nuitka cannot see the import: name it when it is built.
if compgen -G "$REPO/runtimes/cpp/_host*.so" >/dev/null; then
  args+=(--include-module=runtimes.cpp._host)
fi

echo "building edge-agent ($MODE, Nuitka $("$PY" -m nuitka --version 2>/dev/null | head -1), jobs=$JOBS)"
start=$(date +%s)
rm -rf "$BUILD"
# PYTHONPATH: compile this checkout's packages, whatever (if anything) is installed in the venv.
(cd "$REPO" && PYTHONPATH="$REPO" "$PY" -m nuitka "${args[@]}" "$HERE/agent_main.py") \
  >"$OUT/build-$MODE.log" 2>&1 || {
  tail -n 40 "$OUT/build-$MODE.log" >&2
  echo "build_binary.sh: Nuitka failed; full log in $OUT/build-$MODE.log" >&2
  exit 1
}
elapsed=$(( $(date +%s) - start ))

# Swap the results in only now, so a failed build never leaves a fresh-looking output behind.
rm -rf "$OUT/edge-agent.dist" "$STAMP"
mv "$BUILD/agent_main.dist" "$OUT/edge-agent.dist"
if [ "$MODE" = onefile ]; then
  # In the onefile build the program inside is called edge-agent.bin; the launcher is edge-agent.
  mv "$OUT/edge-agent.dist/edge-agent.bin" "$OUT/edge-agent.dist/edge-agent"
  mv "$BUILD/edge-agent" "$OUT/edge-agent"
fi
mv "$BUILD/report.xml" "$REPORT"
[ -n "${KEEP_BUILD:-}" ] || rm -rf "$BUILD"
touch -d "@$start" "$STAMP"

mib() { awk -v s="$1" 'BEGIN { printf "%.1f MiB", s / 1048576 }'; }
echo "built in $OUT:"
if [ "$MODE" = onefile ]; then
  echo "  edge-agent       $(mib "$(stat -c %s "$OUT/edge-agent")") (onefile)"
fi
echo "  edge-agent.dist/ $(mib "$(du -sb "$OUT/edge-agent.dist" | cut -f1)") (unpacked)"
printf 'build time: %d s (%dm%02ds)\n' "$elapsed" $((elapsed / 60)) $((elapsed % 60))
