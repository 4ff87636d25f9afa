"""The MQTT topic tree, as pure functions: build a topic, parse one back, validate ids.

One versioned tree, so a v2 can run beside v1 during a migration::

    edgefn/v1/devices/{device_id}/desired    platform -> device, retained, QoS 1
    edgefn/v1/devices/{device_id}/reported   device -> platform, QoS 1
    edgefn/v1/devices/{device_id}/metrics    device -> platform, QoS 1
    edgefn/v1/devices/{device_id}/events     device -> platform, QoS 1
    edgefn/v1/devices/{device_id}/presence   device -> platform, retained, QoS 1, online/offline
    edgefn/v1/devices/{device_id}/rollout    device -> platform, QoS 1 (rollout status)
    edgefn/v1/devices/{device_id}/secrets    platform -> device, retained, QoS 1: names and
                                             versions only ("fetch"), never a value
    edgefn/v1/groups/{group}/desired         platform -> devices of the group, retained, QoS 1
    edgefn/v1/rollouts/{rollout_id}/status   platform -> operators, retained, QoS 1 (progress)

Ids become one topic level and, on Mosquitto, the `%u` of an ACL pattern (the device certificate's
CN), so they must never contain `/`, `+`, `#` or anything that could widen a subscription or an
ACL. See docs/mqtt-topics.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, get_args

from cloud_sync.errors import TopicError

ROOT = "edgefn"
VERSION = "v1"
PREFIX = f"{ROOT}/{VERSION}"

DeviceKind = Literal["desired", "reported", "metrics", "events", "presence", "rollout", "secrets"]
GroupKind = Literal["desired"]
RolloutKind = Literal["status"]
Scope = Literal["device", "group", "rollout"]
DEVICE_KINDS: tuple[str, ...] = get_args(DeviceKind)
GROUP_KINDS: tuple[str, ...] = get_args(GroupKind)
ROLLOUT_KINDS: tuple[str, ...] = get_args(RolloutKind)

# Retained topics hold *state* (the latest value is what a newcomer needs); the rest are streams.
RETAINED_KINDS = frozenset({"desired", "presence", "status", "secrets"})
# Everything is QoS 1: at-least-once plus idempotency keys is what the outbox is built for; QoS 2
# costs an extra round trip per message and is still not exactly-once across a broker crash.
QOS = 1

PRESENCE_ONLINE = b"online"
PRESENCE_OFFLINE = b"offline"

# 64 characters because ids double as certificate CNs (X.509 ub-common-name is 64). A leading
# alphanumeric keeps ids from looking like options, hidden files or `$SYS`-style topics.
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")


def validate_id(value: str, what: str = "device id") -> str:
    """Refuse anything that is not one safe topic level; returns the id for chaining."""
    if not isinstance(value, str) or not ID_RE.match(value):
        raise TopicError(
            f"invalid {what} {value!r}: use 1-64 letters, digits, '.', '_', ':' or '-', starting "
            "with a letter or digit (no '/', '+', '#', spaces)"
        )
    return value


def device_topic(device_id: str, kind: DeviceKind) -> str:
    if kind not in DEVICE_KINDS:
        raise TopicError(f"unknown device topic kind {kind!r}; expected one of {DEVICE_KINDS}")
    return f"{PREFIX}/devices/{validate_id(device_id)}/{kind}"


def group_topic(group: str, kind: GroupKind = "desired") -> str:
    if kind not in GROUP_KINDS:
        raise TopicError(f"unknown group topic kind {kind!r}; expected one of {GROUP_KINDS}")
    return f"{PREFIX}/groups/{validate_id(group, 'group name')}/{kind}"


def rollout_report_topic(device_id: str) -> str:
    """Where a device sends its rollout status reports (cloud_sync/rollout/messages.py)."""
    return device_topic(device_id, "rollout")


def rollout_topic(rollout_id: str, kind: RolloutKind = "status") -> str:
    """A rollout's progress summary, retained, so a console or a second platform replica sees
    the current state at once. Only the platform identity may publish or read it (the ACL gives
    devices their own subtree and the group documents, nothing under `rollouts/`)."""
    if kind not in ROLLOUT_KINDS:
        raise TopicError(f"unknown rollout topic kind {kind!r}; expected one of {ROLLOUT_KINDS}")
    return f"{PREFIX}/rollouts/{validate_id(rollout_id, 'rollout id')}/{kind}"


def is_retained(kind: str) -> bool:
    return kind in RETAINED_KINDS


@dataclass(frozen=True, slots=True)
class Topic:
    """A parsed topic: which subtree, whose, and what kind of message."""

    scope: Scope
    id: str
    kind: str

    def __str__(self) -> str:
        return f"{PREFIX}/{self.scope}s/{self.id}/{self.kind}"


def parse(topic: str) -> Topic:
    """Map a concrete topic back to (scope, id, kind); anything outside the tree is an error."""
    parts = topic.split("/")
    if len(parts) != 5 or parts[0] != ROOT or parts[1] != VERSION:
        raise TopicError(f"not an {PREFIX} topic: {topic!r}")
    _, _, tree, ident, kind = parts
    if tree == "devices":
        validate_id(ident)
        if kind not in DEVICE_KINDS:
            raise TopicError(f"unknown device topic kind {kind!r} in {topic!r}")
        return Topic("device", ident, kind)
    if tree == "groups":
        validate_id(ident, "group name")
        if kind not in GROUP_KINDS:
            raise TopicError(f"unknown group topic kind {kind!r} in {topic!r}")
        return Topic("group", ident, kind)
    if tree == "rollouts":
        validate_id(ident, "rollout id")
        if kind not in ROLLOUT_KINDS:
            raise TopicError(f"unknown rollout topic kind {kind!r} in {topic!r}")
        return Topic("rollout", ident, kind)
    raise TopicError(f"unknown subtree {tree!r} in {topic!r}")


def device_subscriptions(device_id: str, groups: tuple[str, ...] | list[str] = ()) -> list[str]:
    """What a device subscribes to: its own desired document and those of its groups, and the
    notice that its secrets changed."""
    return [
        device_topic(device_id, "desired"),
        *(group_topic(g) for g in groups),
        device_topic(device_id, "secrets"),
    ]


def platform_filter(kind: DeviceKind) -> str:
    """The platform's subscription for one kind of device traffic (all devices)."""
    if kind not in DEVICE_KINDS:
        raise TopicError(f"unknown device topic kind {kind!r}")
    return f"{PREFIX}/devices/+/{kind}"


def shared_platform_filter(kind: DeviceKind, share: str = "edgefn-platform") -> str:
    """MQTT 5 shared subscription so several platform replicas split device traffic."""
    return f"$share/{validate_id(share, 'share name')}/{platform_filter(kind)}"
