"""Manifest validation: every error names the file and the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from runtimes.errors import ManifestError
from runtimes.manifest import load_manifest, parse_manifest, semver_key
from runtimes.permissions import Permissions, topic_matches, valid_topic

BASE: dict[str, Any] = {"name": "eta", "version": "1.2.3", "runtime": "node", "entry": "index.js"}


def test_minimal_manifest_gets_defaults() -> None:
    m = parse_manifest(BASE)
    assert (m.timeout_ms, m.isolation, m.pool.min_instances, m.pool.concurrency) == (
        30000,
        "process",
        1,
        16,
    )


def test_pool_table_and_unknown_tables_are_kept() -> None:
    m = parse_manifest(
        {
            **BASE,
            "timeout_ms": 500,
            "pool": {"min_instances": 2, "max_instances": 3, "concurrency": 4, "idle_timeout_s": 9},
            "cache": {"enabled": True},
        }
    )
    assert (m.pool.min_instances, m.pool.max_instances, m.pool.concurrency) == (2, 3, 4)
    assert m.pool.idle_timeout_s == 9.0
    assert m.extra["cache"] == {"enabled": True}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"name": None}, "'name' is missing"),
        ({"name": "Bad Name"}, "field 'name'"),
        ({"version": "1.2"}, "field 'version'"),
        ({"runtime": "python"}, "field 'runtime' must be one of node, go, cpp"),
        ({"entry": "../x"}, "field 'entry'"),
        ({"entry": None}, "'entry' is missing"),
        ({"timeout_ms": "fast"}, "field 'timeout_ms' must be an integer"),
        ({"timeout_ms": 0}, "field 'timeout_ms' must be between"),
        ({"isolation": "vm"}, "field 'isolation'"),
        ({"pool": {"min_instances": 3, "max_instances": 2}}, "below 'min_instances'"),
        ({"pool": {"concurrency": True}}, "[pool]: field 'concurrency'"),
        ({"pool": "big"}, "'pool' must be a table"),
        ({"env": {"A": 1}}, "[env]"),
    ],
)
def test_bad_fields_are_named(change: dict[str, Any], field: str) -> None:
    data = {**BASE, **change}
    data = {k: v for k, v in data.items() if v is not None}
    with pytest.raises(ManifestError) as info:
        parse_manifest(data, "fn/edgefn.toml")
    assert "fn/edgefn.toml" in str(info.value)
    assert field in str(info.value)


def test_load_manifest_reports_file_problems(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="file not found"):
        load_manifest(tmp_path / "edgefn.toml")
    bad = tmp_path / "edgefn.toml"
    bad.write_text('name = "x"\nversion = ')
    with pytest.raises(ManifestError, match="not valid TOML"):
        load_manifest(bad)


def test_semver_ordering() -> None:
    order = ["1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-beta", "1.0.0-rc.1", "1.0.0", "1.0.1", "1.10.0"]
    assert sorted(order, key=semver_key) == order
    with pytest.raises(ValueError):
        semver_key("01.0.0")


# ---- [permissions] (building blocks, runtimes/permissions.py) ---------------------------------


def test_permissions_default_to_nothing_and_parse_when_granted() -> None:
    assert parse_manifest(BASE).permissions == Permissions()
    m = parse_manifest(
        {
            **BASE,
            "permissions": {
                "invoke": ["eta-node"],
                "publish": ["traffic/#", "alerts/+/high"],
                "state": {"max_bytes": 1048576},
                "secrets": ["maps-api-key"],
            },
        }
    )
    p = m.permissions
    assert p.may_invoke("eta-node") and not p.may_invoke("other")
    assert p.may_publish("traffic/jam") and p.may_publish("traffic/a/b")
    assert p.may_publish("alerts/x/high") and not p.may_publish("alerts/x/y/high")
    assert not p.may_publish("weather/rain")
    assert p.state_max_bytes == 1048576 and p.state_keep_on_switch
    assert "permissions" not in m.extra


@pytest.mark.parametrize(
    "perms",
    [
        {"invoke": "eta-node"},  # not a list
        {"invoke": ["Bad Name"]},
        {"publish": ["a/#/b"]},  # '#' only last
        {"state": {"max_bytes": -1}},
        {"state": {"max_bytes": 1 << 40}},
        {"state": {"size": 10}},
        {"network": ["*"]},  # unknown field
    ],
)
def test_bad_permissions_are_refused(perms: dict[str, Any]) -> None:
    with pytest.raises(ManifestError, match=r"permissions"):
        parse_manifest({**BASE, "permissions": perms})


def test_topic_rules() -> None:
    assert topic_matches("#", "a/b")
    assert topic_matches("a/+", "a/b") and not topic_matches("a/+", "a/b/c")
    assert valid_topic("traffic/jam") and not valid_topic("traffic/#")
    assert not valid_topic("a//b") and not valid_topic("")
