"""The rollout CLI's flags become the spec the platform checks, and the rollout store keeps
what the controller writes (real SQLite files and a real PostgreSQL: the `backend` fixture; the
end-to-end runs are in test_rollout_controller_e2e*.py)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from cloud_sync.platform import rollout_cli
from cloud_sync.platform.cli import build_parser
from cloud_sync.platform.rollout_feed import RecordFeed
from cloud_sync.platform.rollout_store import RolloutStore
from cloud_sync.rollout.eligibility import BundleFacts
from cloud_sync.rollout.errors import SpecError
from cloud_sync.rollout.messages import StatusReport
from cloud_sync.rollout.model import new_rollout, plan
from cloud_sync.rollout.selector import DeviceFacts
from cloud_sync.rollout.spec import RolloutSpec
from cloud_sync.rollout.states import DeviceState, RolloutState
from tests.platform_backends import Backend


def parse(*argv: str) -> dict[str, object]:
    args = build_parser().parse_args(["rollout", "start", *argv])
    assert args.handler is rollout_cli.cmd_start
    return rollout_cli.spec_from_args(args)


def test_start_flags_become_the_spec_and_flags_left_out_keep_the_defaults() -> None:
    spec = parse("resize@1.4.0", "--target", "group=west,arch=aarch64", "--waves", "10,50,100",
                 "--bake", "30", "--gate", "error_rate<=0.05", "--gate", "p95_ms<=200",
                 "--min-invocations", "50", "--on-failure", "pause")  # fmt: skip
    assert spec == {
        "function": "resize", "version": "1.4.0", "target": "group=west,arch=aarch64",
        "waves": "10,50,100", "bake_s": 30.0, "gates": ["error_rate<=0.05", "p95_ms<=200"],
        "min_invocations": 50, "on_failure": "pause",
    }  # fmt: skip
    checked = RolloutSpec.from_dict(spec)
    assert checked.waves == (10, 50, 100) and checked.on_failure == "pause"
    assert RolloutSpec.from_dict(parse("resize@1.4.0", "--target", "*")).bake_s == 300


def test_a_bad_reference_is_refused_before_any_call() -> None:
    with pytest.raises(SpecError):
        parse("resize", "--target", "*")
    with pytest.raises(SystemExit):  # argparse: --on-failure has three choices
        parse("resize@1.0.0", "--target", "*", "--on-failure", "explode")


def test_every_rollout_verb_is_registered() -> None:
    for verb in ("pause", "resume", "abort"):
        args = build_parser().parse_args(["rollout", verb, "r-1", "--platform", "http://x"])
        assert (args.handler, args.verb) == (rollout_cli.cmd_command, verb)
    args = build_parser().parse_args(["rollout", "status", "r-1", "--watch", "--json"])
    assert args.handler is rollout_cli.cmd_status and args.watch and args.json


def test_the_store_keeps_rollouts_across_reopening(backend: Backend) -> None:
    fleet = [DeviceFacts(f"d{i}", {"group": "west"}) for i in range(10)]
    spec = RolloutSpec.from_dict({"function": "resize", "version": "1.4.0", "target": "*"})
    r = new_rollout(spec, plan("r-1", spec, fleet, BundleFacts("resize", "1.4.0", "node")), 1.0)
    store = RolloutStore(backend.engine("rollouts.db"))
    store.save(r)
    done = replace(r, id="r-0", state=RolloutState.SUCCEEDED, created_at=0.5)
    store.save(done)
    store.close()
    again = RolloutStore(backend.engine("rollouts.db"))
    try:
        assert again.get("r-1") == r
        assert [x.id for x in again.active()] == ["r-1"]
        assert [x.id for x in again.all()] == ["r-0", "r-1"]
        assert again.last_succeeded() == {"resize": done}
        assert again.get("r-nope") is None
    finally:
        again.close()


def test_the_feed_reads_reports_and_per_version_metrics_from_stored_records(
    backend: Backend,
) -> None:
    from cloud_sync.platform.fleet_store import FleetStore

    fleet = FleetStore(backend.engine("fleet.db"))
    fleet.enroll("d1", {}, "token-1", 1)
    report = StatusReport("d1", "resize", "r-1", "1.4.0", DeviceState.HEALTHY, 3, 10.0)
    forged = StatusReport("d2", "resize", "r-1", "1.4.0", DeviceState.FAILED, 9, 10.0, "crash_loop")
    metrics = {"schema": "edgefn.metrics/1", "device": "d1", "interval_start": 1,
               "interval_end": 2, "functions": {"resize": {"invocations": 7, "errors": 2}},
               "versions": {"resize": "1.4.0"}}  # fmt: skip
    for i, (kind, payload) in enumerate([
        ("rollout", report.to_json()), ("rollout", forged.to_json()),
        ("metrics", json.dumps(metrics).encode()), ("rollout", b"not json"),
    ]):  # fmt: skip
        assert fleet.ingest("d1", kind, f"t/{i}", payload, key=f"k{i}", via="http")
    fleet.close()
    engine = backend.engine("fleet.db")  # as the platform does: the fleet store's engine
    feed = RecordFeed(engine)
    try:
        batch = feed.read(0)
        assert batch.reports == [report]  # d1 cannot speak for d2; the bad record is skipped
        assert batch.metrics[("d1", "resize", "1.4.0")].errors == 2
        assert feed.read(batch.last_id).rows == 0
        assert feed.first_id_since(0.0) == 0
    finally:
        feed.close()
    count = engine.read(lambda c: c.execute("SELECT COUNT(*) FROM records").fetchone())
    assert tuple(count) == (4,)  # the reader wrote nothing
