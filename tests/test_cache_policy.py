"""The [cache] table and key derivation: pure values, no files."""

from __future__ import annotations

from typing import Any

import pytest
from multidict import CIMultiDict, MultiDict

from edge_agent.cache_policy import CachePolicy, parse_cache_policy, policy_from_manifest
from runtimes.errors import ManifestError
from runtimes.manifest import parse_manifest

BASE: dict[str, Any] = {"name": "eta", "version": "1.2.3", "runtime": "node", "entry": "index.js"}


def test_absent_table_means_caching_off() -> None:
    assert parse_cache_policy(None) == CachePolicy()
    assert not parse_cache_policy({}).enabled


def test_full_table_from_a_real_manifest() -> None:
    m = parse_manifest(
        {
            **BASE,
            "cache": {
                "enabled": True,
                "ttl_s": 30,
                "stale_if_error_s": 600,
                "epoch": "2024-06",
                "key": {
                    "body": False,
                    "headers": ["Accept-Language", "x-Units"],
                    "query": ["b", "a"],
                },
            },
        }
    )
    p = policy_from_manifest(m.extra, "fn/edgefn.toml")
    assert p == CachePolicy(
        enabled=True,
        ttl_s=30.0,
        stale_if_error_s=600.0,
        key_body=False,
        key_headers=("accept-language", "x-units"),
        key_query=("a", "b"),
        epoch="2024-06",
    )
    assert p.scope("9.9.9") == "e=2024-06"
    assert CachePolicy(enabled=True, ttl_s=1).scope("9.9.9") == "v=9.9.9"


@pytest.mark.parametrize(
    ("table", "field", "words"),
    [
        ({"enabled": "yes", "ttl_s": 1}, "enabled", "true or false"),
        ({"enabled": True}, "ttl_s", "missing"),
        ({"enabled": True, "ttl_s": 0}, "ttl_s", "greater than 0"),
        ({"enabled": True, "ttl_s": -5}, "ttl_s", "greater than 0"),
        ({"enabled": True, "ttl_s": "60"}, "ttl_s", "number"),
        ({"enabled": True, "ttl_s": True}, "ttl_s", "number"),
        ({"enabled": True, "ttl_s": float("nan")}, "ttl_s", "number"),
        ({"enabled": True, "ttl_s": 3.2e9}, "ttl_s", "at most"),
        ({"enabled": True, "ttl_s": 1, "stale_if_error_s": -1}, "stale_if_error_s", "0 or more"),
        ({"enabled": True, "ttl_s": 1, "epoch": ""}, "epoch", "must be a string"),
        ({"enabled": True, "ttl_s": 1, "epoch": "a/b"}, "epoch", "must be a string"),
        ({"enabled": True, "ttl_s": 1, "epoch": 3}, "epoch", "must be a string"),
        ({"enabled": True, "ttl_s": 1, "key": "body"}, "key", "table"),
        ({"enabled": True, "ttl_s": 1, "key": {"body": 1}}, "body", "true or false"),
        ({"enabled": True, "ttl_s": 1, "key": {"headers": "Accept"}}, "headers", "list"),
        ({"enabled": True, "ttl_s": 1, "key": {"headers": [""]}}, "headers", "non-empty"),
        ({"enabled": True, "ttl_s": 1, "key": {"headers": ["a b"]}}, "headers", "header name"),
        ({"enabled": True, "ttl_s": 1, "key": {"query": [1]}}, "query", "list"),
        ({"enabled": True, "ttl_s": 1, "key": {"query": ["q"] * 33}}, "query", "more than"),
        ({"enabled": True, "ttl_s": 1, "ttl": 5}, "ttl", "unknown field"),
        ({"enabled": True, "ttl_s": 1, "key": {"cookies": []}}, "cookies", "unknown field"),
    ],
)
def test_bad_fields_are_named(table: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(ManifestError) as err:
        parse_cache_policy(table, "fn/edgefn.toml")
    msg = str(err.value)
    assert msg.startswith("fn/edgefn.toml [cache"), msg
    assert f"'{field}'" in msg and words in msg, msg


def test_not_a_table() -> None:
    with pytest.raises(ManifestError, match="'cache' must be a table"):
        parse_cache_policy(["enabled"])


def test_disabled_table_is_still_validated() -> None:
    assert parse_cache_policy({"enabled": False}) == CachePolicy()
    with pytest.raises(ManifestError, match="ttl_s"):
        parse_cache_policy({"enabled": False, "ttl_s": -1})


POLICY = CachePolicy(enabled=True, ttl_s=60, key_headers=("accept",), key_query=("lang",))


def _digest(policy: CachePolicy = POLICY, **kw: Any) -> str:
    return policy.key_for("fn", "1.0.0", **kw).digest


def test_body_is_part_of_the_key_by_default() -> None:
    assert _digest(body=b"a") != _digest(body=b"b")
    assert _digest(body=b"a") == _digest(body=b"a")
    no_body = CachePolicy(enabled=True, ttl_s=1, key_body=False)
    assert _digest(no_body, body=b"a") == _digest(no_body, body=b"b")
    # Switching the body off changes the key itself: no entry is shared across the two policies.
    assert _digest(no_body, body=b"") != _digest(CachePolicy(enabled=True, ttl_s=1), body=b"")


def test_selected_headers_count_case_insensitively_and_others_are_ignored() -> None:
    base = _digest(body=b"x", headers={"Accept": "text/html"})
    assert _digest(body=b"x", headers={"accept": "text/html", "X-Request-Id": "1"}) == base
    assert _digest(body=b"x", headers=[("ACCEPT", "text/html"), ("User-Agent", "z")]) == base
    assert _digest(body=b"x", headers={"Accept": "application/json"}) != base
    # Absent and empty differ.
    assert _digest(body=b"x", headers={}) != _digest(body=b"x", headers={"Accept": ""})


def test_query_params_count_by_exact_name_and_order_of_names_does_not_matter() -> None:
    p = CachePolicy(enabled=True, ttl_s=1, key_query=("a", "lang"))
    one = _digest(p, query=[("lang", "de"), ("a", "1"), ("utm", "x")])
    assert _digest(p, query={"a": "1", "lang": "de"}) == one
    assert _digest(p, query={"a": "1", "lang": "fr"}) != one
    assert _digest(p, query={"a": "1", "LANG": "de"}) != one  # URLs are case-sensitive


def test_repeated_values_from_multidicts_all_count() -> None:
    h1 = CIMultiDict([("Accept", "a"), ("accept", "b")])
    h2 = CIMultiDict([("Accept", "a")])
    assert _digest(headers=h1) != _digest(headers=h2)
    q1 = MultiDict([("lang", "de"), ("lang", "fr")])
    q2 = MultiDict([("lang", "fr"), ("lang", "de")])
    assert _digest(query=q1) != _digest(query=q2)


def test_encoding_is_length_prefixed() -> None:
    p = CachePolicy(enabled=True, ttl_s=1, key_headers=("a", "b"))
    assert _digest(p, headers={"a": "xy", "b": "z"}) != _digest(p, headers={"a": "x", "b": "yz"})
    # A header value cannot pose as the body or as another header.
    assert _digest(p, body=b"", headers={"a": "x"}) != _digest(p, body=b"x", headers={})


def test_function_and_version_or_epoch_are_in_the_key() -> None:
    p = CachePolicy(enabled=True, ttl_s=1)
    k1 = p.key_for("fn", "1.0.0", b"x")
    assert k1.id == f"fn/v=1.0.0/{k1.digest}" and len(k1.digest) == 64
    assert p.key_for("fn", "1.0.1", b"x").id != k1.id
    assert p.key_for("other", "1.0.0", b"x").id != k1.id
    e = CachePolicy(enabled=True, ttl_s=1, epoch="e1")
    assert e.key_for("fn", "1.0.0", b"x").id == e.key_for("fn", "2.0.0", b"x").id
    assert e.key_for("fn", "1.0.0", b"x").scope == "e=e1"
    e2 = CachePolicy(enabled=True, ttl_s=1, epoch="e2")
    assert e2.key_for("fn", "1.0.0", b"x").id != e.key_for("fn", "1.0.0", b"x").id
