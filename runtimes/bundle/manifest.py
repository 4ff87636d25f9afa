"""The decoded, validated `manifest.json` of a bundle (`BundleManifest`) and its parts.

Pure code: bytes in, values out. Call `BundleManifest.from_bytes` only on signature-checked bytes.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from runtimes.bundle.layout import (
    ARCH_RE,
    BUILD_ONLY_TABLES,
    COMMON_MEMBER,
    CREATED_RE,
    FORMAT,
    KEY_ID_RE,
    MANIFEST_MEMBER,
    MAX_ARCHES,
    SHA256_RE,
    artifact_member,
    fail,
)
from runtimes.bundle.strict_json import canonical_json, loads_strict
from runtimes.bundle.toml_writer import toml_dumps
from runtimes.errors import ManifestError
from runtimes.manifest import MANIFEST_NAME, Manifest, parse_manifest
from runtimes.permissions import Permissions


def manifest_to_table(m: Manifest) -> dict[str, Any]:
    """The function's manifest as a table, every default spelled out (the signed form).

    Explicit defaults make the signed manifest mean the same on an agent whose defaults changed.
    """
    table: dict[str, Any] = {
        "name": m.name,
        "version": m.version,
        "runtime": m.runtime,
        "entry": m.entry,
        "timeout_ms": m.timeout_ms,
        "handler": m.handler,
        "isolation": m.isolation,
        "inline": m.inline,
        "pool": {
            "min_instances": m.pool.min_instances,
            "max_instances": m.pool.max_instances,
            "concurrency": m.pool.concurrency,
            "idle_timeout_s": m.pool.idle_timeout_s,
            "max_queue": m.pool.max_queue,
        },
        "limits": {
            "memory_mb": m.limits.memory_mb,
            "cpu_seconds": m.limits.cpu_seconds,
            "open_files": m.limits.open_files,
            "processes": m.limits.processes,
        },
        "env": dict(m.env),
    }
    if m.permissions != Permissions():
        # Signed with the function: a registry cannot widen what a function may do. Absent
        # when empty, so bundles of functions without building blocks keep their bytes.
        p = m.permissions
        table["permissions"] = {
            "invoke": list(p.invoke),
            "publish": list(p.publish),
            "state": {"max_bytes": p.state_max_bytes, "keep_on_switch": p.state_keep_on_switch},
            "secrets": list(p.secrets),
        }
    for k, v in m.extra.items():
        if k not in BUILD_ONLY_TABLES:
            table[k] = v
    return table


@dataclass(frozen=True, slots=True)
class Artifact:
    file: str  # member name in the bundle
    sha256: str  # of the member's bytes (the .tar.gz as stored)
    size: int  # of the member's bytes
    unpacked_size: int  # sum of file sizes inside: lets the installer check free space first

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "sha256": self.sha256,
            "size": self.size,
            "unpacked_size": self.unpacked_size,
        }


def _int_field(obj: Mapping[str, Any], key: str, where: str) -> int:
    v = obj.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise fail("malformed_bundle", f"{where}: '{key}' must be a non-negative integer")
    return v


def _artifact(obj: Any, expected_file: str, where: str) -> Artifact:
    if not isinstance(obj, dict) or set(obj) != {"file", "sha256", "size", "unpacked_size"}:
        raise fail(
            "malformed_bundle", f"{where}: must have exactly file, sha256, size, unpacked_size"
        )
    if obj["file"] != expected_file:
        raise fail("malformed_bundle", f"{where}: file must be {expected_file!r}")
    sha = obj["sha256"]
    if not isinstance(sha, str) or not SHA256_RE.match(sha):
        raise fail("malformed_bundle", f"{where}: sha256 must be 64 lowercase hex digits")
    return Artifact(
        file=expected_file,
        sha256=sha,
        size=_int_field(obj, "size", where),
        unpacked_size=_int_field(obj, "unpacked_size", where),
    )


_MANIFEST_KEYS = {"format", "function", "artifacts", "common", "created_at", "publisher"}


@dataclass(frozen=True)
class BundleManifest:
    """The decoded `manifest.json`. Build one with `build_bundle`, read one with `from_bytes`."""

    function: Manifest
    artifacts: Mapping[str, Artifact]  # arch -> artifact; empty for an arch-independent bundle
    common: Artifact | None
    created_at: str  # RFC 3339 UTC, seconds: 2026-11-27T12:00:00Z
    publisher: str  # key id of the publisher's signing key (it must have signed)
    format: int = FORMAT
    raw: bytes = field(default=b"", repr=False, compare=False)  # the exact signed bytes

    @property
    def name(self) -> str:
        return self.function.name

    @property
    def version(self) -> str:
        return self.function.version

    @property
    def arches(self) -> tuple[str, ...]:
        return tuple(sorted(self.artifacts))

    @property
    def payload(self) -> dict[str, Artifact]:
        """Every payload member by name."""
        out = {a.file: a for a in self.artifacts.values()}
        if self.common is not None:
            out[self.common.file] = self.common
        return out

    def supports(self, arch: str) -> bool:
        return arch in self.artifacts or (not self.artifacts and self.common is not None)

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "format": self.format,
            "function": manifest_to_table(self.function),
            "artifacts": {arch: a.to_json() for arch, a in self.artifacts.items()},
            "created_at": self.created_at,
            "publisher": self.publisher,
        }
        if self.common is not None:
            obj["common"] = self.common.to_json()
        return obj

    def to_bytes(self) -> bytes:
        return canonical_json(self.to_json())

    def edgefn_toml(self) -> str:
        """The `edgefn.toml` installed next to the payload, generated from the signed manifest.

        Checked to load back into exactly `self.function`, so the agent runs what was signed.
        """
        header = (
            f"# Generated from the signed manifest of {self.name} {self.version}\n"
            f"# (publisher key {self.publisher}). Do not edit: the bundle is the source of truth.\n"
        )
        table = manifest_to_table(self.function)
        text = header + toml_dumps(table)
        try:
            again = parse_manifest(tomllib.loads(text), MANIFEST_NAME)
            signed = parse_manifest(table, MANIFEST_MEMBER)
        except (tomllib.TOMLDecodeError, ManifestError) as exc:
            raise fail(
                "malformed_bundle", f"generated {MANIFEST_NAME} does not load: {exc}"
            ) from exc
        if again != signed:
            raise fail("malformed_bundle", f"generated {MANIFEST_NAME} differs from the manifest")
        return text

    @classmethod
    def from_bytes(cls, data: bytes) -> BundleManifest:
        """Decode and validate `manifest.json`. Call only on bytes whose signature was checked."""
        where = MANIFEST_MEMBER
        obj = loads_strict(data, where)
        if not isinstance(obj, dict):
            raise fail("malformed_bundle", f"{where}: must be a JSON object")
        unknown = set(obj) - _MANIFEST_KEYS
        if unknown:
            raise fail("malformed_bundle", f"{where}: unknown fields {sorted(unknown)}")
        fmt = obj.get("format")
        if fmt != FORMAT or isinstance(fmt, bool):
            raise fail(
                "malformed_bundle", f"{where}: bundle format {fmt!r}; this code reads {FORMAT}"
            )
        fn = obj.get("function")
        if not isinstance(fn, dict):
            raise fail("malformed_bundle", f"{where}: 'function' must be an object")
        try:
            function = parse_manifest(fn, f"{where} [function]")
        except ManifestError as exc:
            raise fail("malformed_bundle", exc.message) from exc
        arts = obj.get("artifacts")
        if not isinstance(arts, dict) or len(arts) > MAX_ARCHES:
            raise fail("malformed_bundle", f"{where}: 'artifacts' must be an object (<= 16)")
        artifacts: dict[str, Artifact] = {}
        for arch, a in sorted(arts.items()):
            if not ARCH_RE.match(arch):
                raise fail("malformed_bundle", f"{where}: bad arch key {arch!r}")
            artifacts[arch] = _artifact(a, artifact_member(arch), f"{where} artifacts.{arch}")
        common = None
        if "common" in obj:
            common = _artifact(obj["common"], COMMON_MEMBER, f"{where} common")
        if not artifacts and common is None:
            raise fail("malformed_bundle", f"{where}: no payload (neither artifacts nor common)")
        created = obj.get("created_at")
        if not isinstance(created, str) or not CREATED_RE.match(created):
            raise fail(
                "malformed_bundle", f"{where}: created_at must look like 2026-01-31T12:00:00Z"
            )
        publisher = obj.get("publisher")
        if not isinstance(publisher, str) or not KEY_ID_RE.match(publisher):
            raise fail("malformed_bundle", f"{where}: publisher must be a 16-hex-digit key id")
        bm = cls(
            function=function,
            artifacts=artifacts,
            common=common,
            created_at=created,
            publisher=publisher,
            raw=bytes(data),
        )
        bm.edgefn_toml()  # refuse now what could not be installed later
        return bm
