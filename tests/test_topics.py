"""The topic tree: builders, parser, id validation (pure)."""

from __future__ import annotations

import pytest

from cloud_sync import topics
from cloud_sync.errors import TopicError


def test_device_and_group_topics_are_one_versioned_tree() -> None:
    assert topics.device_topic("dev-1", "desired") == "edgefn/v1/devices/dev-1/desired"
    assert topics.device_topic("dev-1", "presence") == "edgefn/v1/devices/dev-1/presence"
    assert topics.group_topic("west") == "edgefn/v1/groups/west/desired"
    for kind in topics.DEVICE_KINDS:
        assert topics.device_topic("d", kind).startswith(topics.PREFIX + "/devices/d/")  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", topics.DEVICE_KINDS)
def test_parse_round_trips_every_device_kind(kind: str) -> None:
    t = topics.parse(topics.device_topic("edge.01:a_b", kind))  # type: ignore[arg-type]
    assert (t.scope, t.id, t.kind) == ("device", "edge.01:a_b", kind)
    assert str(t) == topics.device_topic("edge.01:a_b", kind)  # type: ignore[arg-type]


def test_parse_group() -> None:
    t = topics.parse("edgefn/v1/groups/west-1/desired")
    assert (t.scope, t.id, t.kind) == ("group", "west-1", "desired")


@pytest.mark.parametrize(
    "bad",
    ["", "a/b", "a+b", "+", "#", "dev#1", "with space", "-lead", ".hidden", "x" * 65, "é", "a\x00"],
)
def test_ids_with_wildcards_slashes_or_odd_characters_are_refused(bad: str) -> None:
    with pytest.raises(TopicError) as info:
        topics.validate_id(bad)
    assert info.value.code == "bad_topic"
    with pytest.raises(TopicError):
        topics.device_topic(bad, "metrics")
    with pytest.raises(TopicError):
        topics.group_topic(bad)


@pytest.mark.parametrize(
    "topic",
    [
        "edgefn/v2/devices/d/desired",  # other version
        "edgefn/v1/devices/d/unknown",  # unknown kind
        "edgefn/v1/groups/g/metrics",  # groups only have desired
        "edgefn/v1/devices/+/metrics",  # a filter, not a topic
        "edgefn/v1/devices/d/metrics/extra",
        "edgefn/v1/things/d/desired",
        "other/v1/devices/d/desired",
        "edgefn/v1/devices//desired",
    ],
)
def test_parse_refuses_topics_outside_the_tree(topic: str) -> None:
    with pytest.raises(TopicError):
        topics.parse(topic)


def test_unknown_kinds_are_refused_by_builders() -> None:
    with pytest.raises(TopicError):
        topics.device_topic("d", "shadow")  # type: ignore[arg-type]
    with pytest.raises(TopicError):
        topics.group_topic("g", "reported")  # type: ignore[arg-type]


def test_retained_and_subscriptions() -> None:
    assert topics.is_retained("desired") and topics.is_retained("presence")
    assert not topics.is_retained("metrics") and not topics.is_retained("reported")
    assert topics.device_subscriptions("d", ["g1", "g2"]) == [
        "edgefn/v1/devices/d/desired",
        "edgefn/v1/groups/g1/desired",
        "edgefn/v1/groups/g2/desired",
        "edgefn/v1/devices/d/secrets",
    ]
    assert topics.platform_filter("metrics") == "edgefn/v1/devices/+/metrics"
    assert topics.shared_platform_filter("reported") == (
        "$share/edgefn-platform/edgefn/v1/devices/+/reported"
    )
