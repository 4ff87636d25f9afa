"""Desired/reported state: parsing, merging, validation, the version tracker -- and the same
rules applied to documents that really arrive over MQTT."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pytest

from cloud_sync import topics
from cloud_sync.errors import ConfigError
from cloud_sync.mqtt import MqttSession
from cloud_sync.state import (
    ConfigTracker,
    ConfigVersions,
    DesiredDoc,
    merge_config,
    parse_desired,
    reported_document,
    validate_config,
)

if TYPE_CHECKING:
    from tests.mosquitto import Broker


GOOD: dict[str, Any] = {
    "functions": {
        "resize": {
            "pool": {"min_instances": 1, "max_instances": 4, "concurrency": 8},
            "routing": "local-then-cloud",
        }
    },
    "cache": {"max_bytes": 1_000_000},
    "log_level": "INFO",
    "metrics": {"interval_s": 10},
}


def test_valid_config_becomes_typed_values() -> None:
    cfg = validate_config(GOOD)
    fn = cfg.functions["resize"]
    assert (fn.min_instances, fn.max_instances, fn.concurrency) == (1, 4, 8)
    assert fn.routing == "local-then-cloud"
    assert cfg.cache_max_bytes == 1_000_000
    assert cfg.log_level == "info"
    assert cfg.metrics_interval_s == 10.0


def test_every_bad_field_is_listed_with_its_path() -> None:
    bad = {
        "functions": {
            "resize": {
                "pool": {"min_instances": -1, "max_instances": "4", "concurency": 2},
                "routing": "edge",
            },
            "Bad Name": {},
        },
        "cache": {"max_bytes": 1.5},
        "log_level": "loud",
        "metrics": {"interval_s": 0},
        "colour": "blue",
    }
    with pytest.raises(ConfigError) as info:
        validate_config(bad)
    err = info.value
    assert err.code == "bad_desired_config"
    paths = {f.path for f in err.fields}
    assert paths == {
        "functions.resize.pool.min_instances",
        "functions.resize.pool.max_instances",
        "functions.resize.pool.concurency",
        "functions.resize.routing",
        "functions.Bad Name",
        "cache.max_bytes",
        "log_level",
        "metrics.interval_s",
        "colour",
    }
    assert "functions.resize.routing" in str(err)  # the message names the fields too
    assert err.to_dict()["fields"]


def test_min_above_max_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        validate_config({"functions": {"f": {"pool": {"min_instances": 5, "max_instances": 2}}}})
    assert [f.path for f in info.value.fields] == ["functions.f.pool.max_instances"]


def test_merge_device_wins_key_by_key_recursively_and_null_deletes() -> None:
    group = {
        "functions": {"f": {"pool": {"min_instances": 1, "max_instances": 8}, "routing": "cloud"}},
        "log_level": "info",
        "cache": {"max_bytes": 10},
    }
    device = {
        "functions": {"f": {"pool": {"max_instances": 2}}, "g": {"routing": "local"}},
        "log_level": "debug",
        "cache": None,
    }
    assert merge_config(group, device) == {
        "functions": {
            "f": {"pool": {"min_instances": 1, "max_instances": 2}, "routing": "cloud"},
            "g": {"routing": "local"},
        },
        "log_level": "debug",
    }
    assert group["cache"] == {"max_bytes": 10}  # inputs untouched


def test_parse_desired_envelope() -> None:
    doc = parse_desired(json.dumps({"version": 3, "config": GOOD}).encode())
    assert doc == DesiredDoc(3, GOOD)
    assert parse_desired(b"") is None  # a cleared retained message
    for payload in (b"{", b"[]", b'{"version": -1}', b'{"version": 1, "config": 2}'):
        with pytest.raises(ConfigError):
            parse_desired(payload)
    with pytest.raises(ConfigError) as info:
        parse_desired(b'{"version": true, "extra": 1}')
    assert {f.path for f in info.value.fields} == {"version", "extra"}


def test_tracker_same_version_twice_does_nothing() -> None:
    t = ConfigTracker()
    out = t.offer(DesiredDoc(2, {"log_level": "info"}), DesiredDoc(5, GOOD), group="west")
    assert out.status == "applied" and out.changed
    assert t.applied_versions == ConfigVersions("west", 2, 5)
    again = t.offer(DesiredDoc(2, {"log_level": "info"}), DesiredDoc(5, GOOD), group="west")
    assert again.status == "unchanged" and not again.changed
    assert t.decide(ConfigVersions("west", 2, 5)) == "same"
    assert t.decide(ConfigVersions("west", 2, 6)) == "new"
    assert t.decide(ConfigVersions("west", 3, 5)) == "new"


def test_tracker_ignores_older_versions() -> None:
    t = ConfigTracker()
    t.offer(DesiredDoc(4, {}), DesiredDoc(9, GOOD), group="west")
    stale = t.offer(DesiredDoc(4, {}), DesiredDoc(8, {"log_level": "debug"}), group="west")
    assert stale.status == "stale"
    assert t.effective.log_level == "info"
    assert t.decide(ConfigVersions("west", 3, 9)) == "stale"
    # Moving to another group: its versions are a different sequence.
    assert t.decide(ConfigVersions("east", 1, 9)) == "new"


def test_malformed_document_is_rejected_and_the_previous_config_kept() -> None:
    t = ConfigTracker()
    t.offer(None, DesiredDoc(1, GOOD))
    bad = {"functions": {"resize": {"pool": {"max_instances": 0}, "routing": "sideways"}}}
    out = t.offer(None, DesiredDoc(2, bad))
    assert out.status == "rejected"
    assert out.error is not None
    assert {f.path for f in out.error.fields} == {
        "device:functions.resize.pool.max_instances",
        "device:functions.resize.routing",
    }
    assert out.config is t.effective
    assert t.effective.functions["resize"].max_instances == 4  # still version 1
    assert t.applied_versions.device_version == 1
    # Reported once, not on every redelivery; the next good version clears the error.
    assert t.offer(None, DesiredDoc(2, bad)).status == "unchanged"
    report = reported_document("dev-1", 7, t, now=1.0)
    assert report["status"] == "rejected"
    assert report["applied"]["device_version"] == 1
    assert report["desired_seen"]["device_version"] == 2
    assert report["error"]["code"] == "bad_desired_config"
    ok = t.offer(None, DesiredDoc(3, {"log_level": "warning"}))
    assert ok.status == "applied" and t.last_error is None
    assert reported_document("dev-1", 8, t)["status"] == "applied"


def test_merged_result_is_validated_too() -> None:
    t = ConfigTracker()
    group = DesiredDoc(1, {"functions": {"f": {"pool": {"min_instances": 6}}}})
    device = DesiredDoc(1, {"functions": {"f": {"pool": {"max_instances": 2}}}})
    out = t.offer(group, device, group="g")
    assert out.status == "rejected"
    assert out.error is not None
    assert [f.path for f in out.error.fields] == ["merged:functions.f.pool.max_instances"]


def test_snapshot_round_trip_prevents_reapplying_after_restart() -> None:
    t = ConfigTracker()
    t.offer(DesiredDoc(1, {}), DesiredDoc(2, GOOD), group="g")
    snap = json.loads(json.dumps(t.snapshot()))
    t2 = ConfigTracker(snap)
    assert t2.effective.functions["resize"].concurrency == 8
    assert t2.offer(DesiredDoc(1, {}), DesiredDoc(2, GOOD), group="g").status == "unchanged"
    broken = ConfigTracker({"seen": {"bogus": 1}})
    assert broken.effective.functions == {}
    assert broken.last_error is not None and broken.last_error.code == "bad_snapshot"


async def test_desired_over_mqtt_malformed_rejected_previous_kept(mosquitto: Broker) -> None:
    """Retained desired documents from the platform go through the tracker on the device."""
    dev = mosquitto.device_credentials("dev-s")
    plat = mosquitto.platform_credentials()
    desired = topics.device_topic("dev-s", "desired")
    async with (
        MqttSession(
            plat.device_id, mosquitto.host, mosquitto.port, ssl_context=plat.ssl_context()
        ) as platform,
        MqttSession.for_device(dev) as device,
    ):
        await platform.wait_ready(10)
        await device.wait_ready(10)
        tracker = ConfigTracker()
        outcomes = []
        docs = [
            {"version": 1, "config": GOOD},
            {"version": 2, "config": {"functions": {"resize": {"routing": "nowhere"}}}},
        ]
        for doc in docs:
            await platform.publish(desired, json.dumps(doc).encode(), retain=True)
            msg = await device.messages.get()
            assert msg.kind == "desired" and msg.target == "dev-s"
            parsed = parse_desired(msg.payload)
            outcomes.append(tracker.offer(None, parsed))
            await msg.ack()
    assert [o.status for o in outcomes] == ["applied", "rejected"]
    assert tracker.effective.functions["resize"].routing == "local-then-cloud"
    assert outcomes[1].error is not None
    assert [f.path for f in outcomes[1].error.fields] == ["device:functions.resize.routing"]
