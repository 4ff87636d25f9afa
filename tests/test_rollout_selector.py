"""Target selectors over labels and hardware profile, and eligibility with reason codes."""

from __future__ import annotations

from typing import Any

import pytest

from cloud_sync.rollout.eligibility import BundleFacts, check_device, partition
from cloud_sync.rollout.errors import SelectorError
from cloud_sync.rollout.selector import DeviceFacts, parse_selector
from hardware.profile import DeviceProfile


def profile(arch: str = "aarch64", memory: int = 2048, libc: str = "glibc", **kw: Any) -> dict:
    p = DeviceProfile(
        arch=arch, libc=libc, libc_version="2.36", cpu_count=kw.get("cpus", 4), cpu_model="",
        memory_total_mb=memory, memory_available_mb=memory // 2, disk_total_mb=32_000,
        disk_free_mb=kw.get("disk_free", 10_000), data_dir="/var/lib/edgefn", board_vendor="",
        board_model=kw.get("board", "rpi4"), kernel="6.1", hostname="h",
    )  # fmt: skip
    return p.to_dict()


def dev(ident: str, labels: dict[str, str] | None = None, **kw: Any) -> DeviceFacts:
    runtimes = kw.pop("runtimes", None)
    prof = kw.pop("prof", True)
    return DeviceFacts(
        ident,
        labels or {},
        profile(**kw) if prof else None,
        frozenset(runtimes) if runtimes is not None else None,
    )


def test_issue_example_matches_labels_and_profile() -> None:
    sel = parse_selector("group=west,arch=aarch64,memory_mb>=1024")
    assert sel.matches(dev("a", {"group": "west"}))
    assert not sel.matches(dev("b", {"group": "east"}))
    assert not sel.matches(dev("c", {"group": "west"}, arch="x86_64"))
    assert not sel.matches(dev("d", {"group": "west"}, memory=512))
    assert sel.matches(dev("e", {"group": "west"}, memory=1024))
    assert not sel.matches(dev("f", {"group": "west"}, prof=False))  # profile unknown


@pytest.mark.parametrize(
    ("text", "memory", "expected"),
    [
        ("memory_mb>1024", 1024, False),
        ("memory_mb>1024", 1025, True),
        ("memory_mb<1024", 1023, True),
        ("memory_mb<=1024", 1024, True),
        ("memory_mb<=1024", 1025, False),
        ("memory_mb!=1024", 1024, False),
        ("memory_mb=1024", 1024, True),
        ("memory_mb=1024.0", 1024, True),
        ("memory_total_mb>=2000", 2048, True),
    ],
)
def test_numeric_operators(text: str, memory: int, expected: bool) -> None:
    assert parse_selector(text).matches(dev("x", memory=memory)) is expected


def test_alternatives_negation_and_missing_labels() -> None:
    sel = parse_selector("group=west|east")
    assert sel.matches(dev("a", {"group": "east"}))
    assert not sel.matches(dev("a", {"group": "north"}))
    assert not sel.matches(dev("a"))
    neg = parse_selector("group!=west|east")
    assert neg.matches(dev("a", {"group": "north"}))
    assert neg.matches(dev("a"))  # a missing label is not west (Kubernetes rule)
    assert not neg.matches(dev("a", {"group": "west"}))
    # Ordering on a missing or non-numeric value never matches.
    assert not parse_selector("tier>=2").matches(dev("a", {"tier": "gold"}))
    assert not parse_selector("tier>=2").matches(dev("a"))
    assert parse_selector("tier>=2").matches(dev("a", {"tier": "3"}))


def test_explicit_ids_star_and_label_named_like_a_profile_field() -> None:
    sel = parse_selector("device=edge-01|edge-03")
    assert [d.id for d in sel.select([dev("edge-01"), dev("edge-02"), dev("edge-03")])] == [
        "edge-01",
        "edge-03",
    ]
    assert parse_selector("id=edge-02").matches(dev("edge-02"))
    assert parse_selector("*").matches(dev("anything", prof=False))
    assert str(parse_selector("*")) == "*"
    d = dev("a", {"arch": "special"}, arch="x86_64")
    assert parse_selector("arch=x86_64").matches(d)
    assert parse_selector("labels.arch=special").matches(d)
    assert parse_selector("cpu_count=4").matches(dev("a", cpus=4))


def test_canonical_text_round_trips() -> None:
    text = " group = west , memory_mb >= 1024 ,device=a|b"
    sel = parse_selector(text)
    assert str(sel) == "group=west,memory_mb>=1024,device=a|b"
    assert parse_selector(str(sel)) == sel


def test_every_bad_term_is_reported() -> None:
    with pytest.raises(SelectorError) as info:
        parse_selector("group,memory_mb>=lots,device=a/b,x=,tier>=1|2,ok=yes,name=a b")
    err = info.value
    assert err.code == "bad_selector"
    assert [f.path for f in err.fields] == [
        "target[0]", "target[1]", "target[2]", "target[3]", "target[4]", "target[6]",
    ]  # fmt: skip
    assert "needs a number" in str(err)
    assert "not a device id" in str(err)
    with pytest.raises(SelectorError, match="'\\*' for the whole fleet"):
        parse_selector("  ")
    with pytest.raises(SelectorError, match="at most 32"):
        parse_selector(",".join(f"k{i}=v" for i in range(33)))


def test_from_view_reads_the_platform_device_list_shape() -> None:
    view = {
        "id": "edge-01",
        "labels": {"group": "west"},
        "profile": {**profile(), "runtimes": ["go", "cpp"]},
        "functions": {"resize": "1.3.0"},
        "online": True,
    }
    facts = DeviceFacts.from_view(view)
    assert facts.runtimes == frozenset({"go", "cpp"})
    assert facts.functions == {"resize": "1.3.0"}
    assert DeviceFacts.from_view({"id": "x"}).profile is None


ARM_ONLY = BundleFacts("resize", "1.4.0", "go", ("linux-aarch64",), memory_mb=1024, size=1 << 20)


def test_eligibility_reason_codes() -> None:
    assert check_device(dev("ok"), ARM_ONLY) is None
    wrong = check_device(dev("x86", arch="x86_64"), ARM_ONLY)
    assert wrong is not None and wrong.code == "wrong_arch"
    assert "linux-x86_64" in wrong.reason and "linux-aarch64" in wrong.reason
    small = check_device(dev("small", memory=512), ARM_ONLY)
    assert small is not None and small.code == "insufficient_memory"
    assert "512 MB" in small.reason
    node_only = check_device(dev("n", runtimes={"node"}), ARM_ONLY)
    assert node_only is not None and node_only.code == "no_runtime"
    full = check_device(dev("full", disk_free=5), ARM_ONLY)
    assert full is not None and full.code == "disk_full"
    # Not enough known to refuse: the device checks again itself at install.
    assert check_device(dev("unknown", prof=False), ARM_ONLY) is None
    assert check_device(DeviceFacts("broken", profile={"arch": "pdp11"}), ARM_ONLY) is None


def test_musl_device_takes_a_musl_or_plain_artifact_and_arch_independent_bundles() -> None:
    musl = dev("m", libc="musl")
    assert check_device(musl, BundleFacts("f", "1.0.0", "go", ("linux-aarch64-musl",))) is None
    assert check_device(musl, BundleFacts("f", "1.0.0", "go", ("linux-aarch64",))) is None
    glibc_dev = dev("g")
    musl_only = BundleFacts("f", "1.0.0", "go", ("linux-aarch64-musl",))
    verdict = check_device(glibc_dev, musl_only)
    assert verdict is not None and verdict.code == "wrong_arch"
    node = BundleFacts("f", "1.0.0", "node", ())
    assert check_device(dev("x", arch="armv7"), node) is None


def test_partition_keeps_order_and_from_record() -> None:
    record = {"name": "resize", "version": "1.4.0", "runtime": "go",
              "arches": ["linux-aarch64"], "size": 1000}  # fmt: skip
    bundle = BundleFacts.from_record(record)
    fleet = [dev("a"), dev("b", arch="x86_64"), dev("c"), dev("d", arch="armv7")]
    ok, bad = partition(fleet, bundle)
    assert [d.id for d in ok] == ["a", "c"]
    assert [(i.device, i.code) for i in bad] == [("b", "wrong_arch"), ("d", "wrong_arch")]
    assert bad[0].to_dict()["code"] == "wrong_arch"
