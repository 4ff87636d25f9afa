#!/usr/bin/env bash
# Build the edgefn-agent .deb from a built agent (packaging/build_binary.sh).
#
#   packaging/build_deb.sh [--layout standalone|onefile] [--from PATH] [--out DIR]
#
# standalone (default): PATH is the unpacked program that `build_binary.sh` writes to
#   packaging/out/edge-agent.dist (default), installed as /usr/lib/edgefn-agent/ with
#   /usr/bin/edge-agent a symlink into it.
# onefile: PATH is the single executable (default packaging/out/edge-agent), installed as
#   /usr/bin/edge-agent.
# Why standalone is the default: the onefile program unpacks itself at every start into a fresh
# 0700 directory under $TMPDIR, so a root agent's workers, which run as edgefn-worker, cannot
# read the Node host (bootstrap.mjs) from there; it also writes ~85 MB at every start (RAM when /tmp
# is a tmpfs, flash wear otherwise) and fails where /tmp is mounted noexec.
#
# The package holds the agent, /lib/systemd/system/edge-agent.service,
# /etc/edgefn/agent.toml (a conffile) and /usr/share/doc/edgefn-agent/; its maintainer scripts
# create the users edge-agent and edgefn-worker and /var/lib/edgefn, and talk to systemd only
# when systemd is running (never failing in a chroot or container). Prints the .deb's path last.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
LAYOUT=standalone
FROM=""
OUT="$HERE/out"

usage() { sed -n '2,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --layout) LAYOUT="$2"; shift 2 ;;
    --layout=*) LAYOUT="${1#*=}"; shift ;;
    --from) FROM="$2"; shift 2 ;;
    --from=*) FROM="${1#*=}"; shift ;;
    --out) OUT="$2"; shift 2 ;;
    --out=*) OUT="${1#*=}"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "build_deb.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done

case "$LAYOUT" in
  standalone) FROM="${FROM:-$HERE/out/edge-agent.dist}"; test -x "$FROM/edge-agent" ;;
  onefile) FROM="${FROM:-$HERE/out/edge-agent}"; test -f "$FROM" && test -x "$FROM" ;;
  *) echo "build_deb.sh: --layout must be standalone or onefile" >&2; exit 2 ;;
esac || {
  echo "build_deb.sh: no built agent at $FROM (run packaging/build_binary.sh)" >&2
  exit 1
}

VERSION="$(sed -n 's/^version = "\(.*\)"$/\1/p' "$REPO/pyproject.toml" | head -n 1)"
ARCH="$(dpkg --print-architecture)"
# The agent links the C library of the machine that built it (everything else it needs is
# inside): it runs on that glibc version or newer.
GLIBC="$(getconf GNU_LIBC_VERSION | awk '{print $2}')"
PKG=edgefn-agent
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
DEB="$OUT/${PKG}_${VERSION}_${ARCH}.deb"

umask 022
ROOT="$(mktemp -d "$OUT/.deb-root.XXXXXX")"
trap 'rm -rf "$ROOT"' EXIT
chmod 0755 "$ROOT"  # it becomes the package's "./"; mktemp made it 0700

install -d "$ROOT/DEBIAN" "$ROOT/usr/bin" "$ROOT/lib/systemd/system" "$ROOT/etc/edgefn" \
  "$ROOT/usr/share/doc/$PKG"
if [ "$LAYOUT" = standalone ]; then
  install -d "$ROOT/usr/lib"
  cp -a "$FROM" "$ROOT/usr/lib/$PKG"
  chmod -R u+rwX,go+rX,go-w "$ROOT/usr/lib/$PKG"
  ln -s "../lib/$PKG/edge-agent" "$ROOT/usr/bin/edge-agent"
else
  install -m 0755 "$FROM" "$ROOT/usr/bin/edge-agent"
fi
install -m 0644 "$HERE/edge-agent.service" "$ROOT/lib/systemd/system/edge-agent.service"
install -m 0644 "$HERE/agent.toml.example" "$ROOT/etc/edgefn/agent.toml"
install -m 0644 "$HERE/README.md" "$ROOT/usr/share/doc/$PKG/README.md"
cat >"$ROOT/usr/share/doc/$PKG/copyright" <<'EOF'
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: edgefn
License: Apache-2.0
Comment: The agent binary also contains CPython (PSF-2.0) and the Python packages it uses
 (aiohttp, uvloop, psutil, cryptography, sqlite-utils and their dependencies) under their
 own licenses. On Debian systems the Apache License 2.0 is in
 /usr/share/common-licenses/Apache-2.0.
EOF

echo /etc/edgefn/agent.toml >"$ROOT/DEBIAN/conffiles"

cat >"$ROOT/DEBIAN/control" <<EOF
Package: $PKG
Version: $VERSION
Architecture: $ARCH
Maintainer: edgefn maintainers <maintainers@edgefn.invalid>
Installed-Size: $(du -sk --exclude=DEBIAN "$ROOT" | cut -f1)
Depends: libc6 (>= $GLIBC), util-linux, passwd
Recommends: nodejs
Section: admin
Priority: optional
Description: edgefn edge agent: warm C++/Go/Node function workers on a gateway
 Runs edgefn functions in warm worker pools and serves local HTTP invocations on
 127.0.0.1:8680. A self-contained build: no Python is needed on the device.
 util-linux provides setpriv and prlimit, which start each worker as the
 unprivileged user edgefn-worker with its limits; nodejs is needed only for
 Node functions.
EOF

cat >"$ROOT/DEBIAN/postinst" <<'EOF'
#!/bin/sh
# edgefn-agent postinst: users, state dir, systemd reload. Safe in a chroot (no systemd there).
set -e

add_system_user() {
    # $1 user, $2 comment. useradd (package passwd) is in every Debian, minbase included.
    if ! getent passwd "$1" >/dev/null; then
        useradd --system --user-group --home-dir /nonexistent --no-create-home \
            --shell /usr/sbin/nologin --comment "$2" "$1"
    fi
}

case "$1" in
    configure)
        # Workers run as edgefn-worker when the agent runs as root (the packaged default).
        add_system_user edgefn-worker "edgefn function workers"
        # For running the whole agent unprivileged instead (systemctl edit: User=edge-agent).
        add_system_user edge-agent "edgefn edge agent"
        install -d -m 0755 /var/lib/edgefn
        if [ -d /run/systemd/system ]; then
            systemctl daemon-reload >/dev/null 2>&1 || true
            # An upgrade restarts a running agent on the new binary; a first install starts
            # nothing (see /usr/share/doc/edgefn-agent/README.md: systemctl enable --now).
            if [ -n "$2" ]; then
                systemctl try-restart edge-agent.service >/dev/null 2>&1 || true
            fi
        fi
        ;;
esac
exit 0
EOF

cat >"$ROOT/DEBIAN/prerm" <<'EOF'
#!/bin/sh
# edgefn-agent prerm: stop and disable the agent when the package is removed (not on upgrade).
set -e
case "$1" in
    remove|deconfigure)
        if [ -d /run/systemd/system ]; then
            systemctl disable --now edge-agent.service >/dev/null 2>&1 || true
        fi
        ;;
esac
exit 0
EOF

cat >"$ROOT/DEBIAN/postrm" <<'EOF'
#!/bin/sh
# edgefn-agent postrm: purge deletes the agent's data (installed functions, caches). The users
# stay: files they own may remain elsewhere, and Debian never reuses a removed system uid safely.
set -e
case "$1" in
    remove)
        if [ -d /run/systemd/system ]; then
            systemctl daemon-reload >/dev/null 2>&1 || true
        fi
        ;;
    purge)
        rm -rf /var/lib/edgefn
        rmdir /etc/edgefn 2>/dev/null || true
        if [ -d /run/systemd/system ]; then
            systemctl daemon-reload >/dev/null 2>&1 || true
        fi
        ;;
esac
exit 0
EOF
chmod 0755 "$ROOT/DEBIAN/postinst" "$ROOT/DEBIAN/prerm" "$ROOT/DEBIAN/postrm"

# --root-owner-group: every file root:root whoever builds. xz at level 6 (dpkg's default) keeps
# the standalone tree small; -Zxz stays readable by every dpkg still in use.
dpkg-deb --build --root-owner-group -Zxz "$ROOT" "$DEB" >/dev/null
echo "$DEB"
