"""The platform <-> device rollout contract: desired entries and seq-ordered status reports."""

from __future__ import annotations

import json
from typing import Any

import pytest

from cloud_sync.rollout.errors import MessageError
from cloud_sync.rollout.messages import (
    STATUS_SCHEMA,
    StatusReport,
    decode_status,
    desired_patch,
    order,
    parse_deployments,
    reported_extra,
    reports_from_reported,
)
from cloud_sync.rollout.states import DeviceState
from cloud_sync.state import DesiredDoc, merge_config, parse_desired, validate_config


def report(seq: int = 1, state: DeviceState = DeviceState.DOWNLOADING, **kw: Any) -> StatusReport:
    base: dict[str, Any] = {
        "device": "edge-01", "function": "resize", "rollout": "r-7f3a", "version": "1.4.0",
        "state": state, "seq": seq, "at": 1764250000.5, "started_at": 1764249990.0,
        "previous": "1.3.0",
    }  # fmt: skip
    base.update(kw)
    return StatusReport(**base)


def test_desired_patch_passes_the_desired_document_validation_and_reads_back() -> None:
    patch = desired_patch("resize", "1.4.0", "r-7f3a")
    doc = parse_desired(DesiredDoc(8, merge_config({}, patch)).to_json())
    assert doc is not None
    cfg = validate_config(doc.config)  # the agent's existing validation accepts it
    assert cfg.functions["resize"].version == "1.4.0"
    got = parse_deployments(cfg.raw)
    assert got["resize"].rollout == "r-7f3a"
    assert (got["resize"].version, got["resize"].rollback, got["resize"].remove) == (
        "1.4.0", False, False,
    )  # fmt: skip


def test_rollback_and_remove_patches_merge_over_the_previous_step() -> None:
    config = merge_config({"functions": {"resize": {"routing": "local"}}},
                          desired_patch("resize", "1.4.0", "r-1"))  # fmt: skip
    back = merge_config(config, desired_patch("resize", "1.3.0", "r-1", rollback=True))
    assert parse_deployments(back)["resize"].rollback is True
    assert back["functions"]["resize"] == {"routing": "local", "version": "1.3.0"}
    removed = merge_config(config, desired_patch("resize", None, "r-1", rollback=True))
    validate_config(removed)
    entry = parse_deployments(removed)["resize"]
    assert (entry.version, entry.remove, entry.rollback) == (None, True, True)
    assert "version" not in removed["functions"]["resize"]
    # A later forward step clears the remove flag again.
    again = merge_config(removed, desired_patch("resize", "1.5.0", "r-2"))
    assert parse_deployments(again)["resize"].remove is False


def test_operator_pinned_versions_have_no_rollout() -> None:
    got = parse_deployments({"functions": {"resize": {"version": "2.0.0"}, "other": {}}})
    assert list(got) == ["resize"] and got["resize"].rollout is None


def test_bad_desired_entries_are_all_reported() -> None:
    config = {
        "functions": {"resize": {"version": "1.4.0"}},
        "deployment": {"rollouts": {
            "resize": {"rollout": "r-1", "version": "1.5.0", "rollback": False},
            "other": {"rollout": "a/b", "version": "1.0.0", "colour": 1},
            "third": {"rollout": "r-1", "remove": True},
            "fourth": "yes",
        }},
    }  # fmt: skip
    with pytest.raises(MessageError) as info:
        parse_deployments(config)
    paths = [f.path for f in info.value.fields]
    assert "deployment.rollouts.resize.version" in paths
    assert "deployment.rollouts.other.colour" in paths
    assert "deployment.rollouts.third" in paths
    assert "deployment.rollouts.fourth" in paths
    with pytest.raises(MessageError):
        desired_patch("resize", None, "r-1")  # removing needs the rollback flag
    with pytest.raises(MessageError):
        desired_patch("Bad", "1.0", "r/1")


def test_status_report_round_trip_and_key() -> None:
    r = report(state=DeviceState.REJECTED, code="wrong_arch", message="no linux-armv7 artifact")
    data = json.loads(r.to_json())
    assert data["schema"] == STATUS_SCHEMA and data["state"] == "rejected"
    assert decode_status(r.to_json()) == r
    assert decode_status(data) == r
    assert r.key == "rollout-r-7f3a-edge-01-1"
    assert report(seq=2).key != r.key


@pytest.mark.parametrize(
    ("change", "path"),
    [
        ({"state": "notified"}, "state"),  # the platform decides that one
        ({"state": "timed_out"}, "state"),
        ({"state": "exploded"}, "state"),
        ({"state": "failed", "code": None}, "code"),
        ({"code": "Not A Code"}, "code"),
        ({"seq": 0}, "seq"),
        ({"seq": True}, "seq"),
        ({"at": "yesterday"}, "at"),
        ({"at": float("nan")}, "at"),
        ({"device": "a/b"}, "device"),
        ({"version": "1.4"}, "version"),
        ({"schema": "edgefn.rollout/0"}, "schema"),
        ({"extra": 1}, "extra"),
        ({"message": "x" * 1001}, "message"),
    ],
)
def test_bad_status_reports(change: dict[str, Any], path: str) -> None:
    data = {**report().to_dict(), **change}
    with pytest.raises(MessageError) as info:
        decode_status(json.dumps(data).encode())
    assert path in [f.path for f in info.value.fields], info.value
    assert info.value.code == "bad_rollout_message"


def test_not_json() -> None:
    with pytest.raises(MessageError, match="not JSON"):
        decode_status(b"\xff{")
    with pytest.raises(MessageError, match="object"):
        decode_status(b"[1]")


def test_order_drops_duplicates_and_late_arrivals() -> None:
    assert order(None, report(seq=5)) == "new"
    assert order(4, report(seq=5)) == "new"
    assert order(5, report(seq=5)) == "duplicate"
    assert order(6, report(seq=5)) == "stale"


def test_reported_document_carries_the_latest_report_per_function() -> None:
    latest = {"resize": report(seq=9, state=DeviceState.HEALTHY, version="1.4.0")}
    extra = reported_extra(latest)
    doc = {"device": "edge-01", "version": 12, **json.loads(json.dumps(extra))}
    doc["rollouts"]["broken"] = {"schema": STATUS_SCHEMA, "state": "healthy"}
    doc["rollouts"]["liar"] = report(seq=3).to_dict()  # says function resize under "liar"
    good, bad = reports_from_reported(doc)
    assert good == [latest["resize"]]
    assert {p.path.split(".")[1] for p in bad} == {"broken", "liar"}
    assert reports_from_reported({}) == ([], [])
    assert reports_from_reported({"rollouts": []})[1][0].path == "rollouts"


def test_entries_stored_with_the_patch_nulls_still_parse() -> None:
    # The platform sets `deployment.rollouts.<fn>` to the patch's entry as a whole, nulls kept.
    entry = desired_patch("resize", "1.4.0", "r-1")["deployment"]["rollouts"]["resize"]
    assert entry["remove"] is None
    config = {"functions": {"resize": {"version": "1.4.0"}},
              "deployment": {"rollouts": {"resize": entry}}}  # fmt: skip
    got = parse_deployments(config)["resize"]
    assert (got.version, got.rollback, got.remove) == ("1.4.0", False, False)
