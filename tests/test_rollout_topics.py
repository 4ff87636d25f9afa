"""The rollout topics: device status reports and the platform's retained progress topic."""

from __future__ import annotations

import pytest

from cloud_sync import topics
from cloud_sync.errors import TopicError


def test_rollout_topics_build_and_parse_back() -> None:
    assert topics.rollout_report_topic("edge-01") == "edgefn/v1/devices/edge-01/rollout"
    assert topics.rollout_topic("r-7f3a") == "edgefn/v1/rollouts/r-7f3a/status"
    t = topics.parse("edgefn/v1/rollouts/r-7f3a/status")
    assert (t.scope, t.id, t.kind) == ("rollout", "r-7f3a", "status")
    assert str(t) == "edgefn/v1/rollouts/r-7f3a/status"
    assert topics.is_retained("status") and not topics.is_retained("rollout")
    assert topics.platform_filter("rollout") == "edgefn/v1/devices/+/rollout"


@pytest.mark.parametrize(
    "topic",
    [
        "edgefn/v1/rollouts/r-1/desired",
        "edgefn/v1/rollouts/+/status",
        "edgefn/v1/rollouts/a b/status",
    ],
)
def test_bad_rollout_topics_are_refused(topic: str) -> None:
    with pytest.raises(TopicError):
        topics.parse(topic)


def test_rollout_ids_are_one_safe_level() -> None:
    with pytest.raises(TopicError, match="rollout id"):
        topics.rollout_topic("r/1")
    with pytest.raises(TopicError):
        topics.rollout_topic("r-1", "desired")  # type: ignore[arg-type]
