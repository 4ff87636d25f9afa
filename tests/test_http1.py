"""edge_agent.http1 on its own: the strict head parser and the chunked decoder, with bounded
fuzzing (seeded, counted): any input is a Head or an HttpError, never another exception."""

from __future__ import annotations

import contextlib
import random

import pytest

from edge_agent.http1 import ChunkedDecoder, HttpError, parse_head

GOOD = (
    b"POST /v1/functions/eta/invoke?x=1&y=%20 HTTP/1.1\r\nHost: a\r\n"
    b"Content-Type: application/json\r\nX-Dup: 1\r\nx-dup: 2\r\nContent-Length: 7\r\n\r\n"
)


def parse(raw: bytes):  # type: ignore[no-untyped-def]
    return parse_head(raw, max_headers=16, max_line=256)


def test_a_good_head() -> None:
    head = parse(GOOD)
    assert (head.method, head.path, head.query) == ("POST", "/v1/functions/eta/invoke", "x=1&y=%20")
    assert head.http11 and head.keep_alive and head.content_length == 7 and not head.chunked
    assert head.lower["x-dup"] == "1, 2" and ("X-Dup", "1") in head.headers


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"POST  /x HTTP/1.1\r\nHost: a\r\n\r\n", "bad_request"),
        (b"POST x HTTP/1.1\r\nHost: a\r\n\r\n", "bad_request"),
        (b"P@ST /x HTTP/1.1\r\nHost: a\r\n\r\n", "bad_request"),
        (b"POST /x HTTP/1.1\nHost: a\r\n\r\n", "bad_request"),
        (b"POST /x HTTP/1.1\r\nHost : a\r\n\r\n", "bad_request"),
        (b"POST /x HTTP/1.1\r\nHost: a\x01b\r\n\r\n", "bad_request"),
        (b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", "bad_request"),
        (b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
         "bad_request"),
        (b"POST /x HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", "bad_request"),
        (b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
         "not_implemented"),
        (b"POST /x HTTP/0.9\r\n\r\n", "http_version_not_supported"),
    ],
)  # fmt: skip
def test_refusals_have_stable_codes(raw: bytes, code: str) -> None:
    with pytest.raises(HttpError) as err:
        parse(raw)
    assert err.value.code == code and 400 <= err.value.status < 600


def test_fuzzed_heads_are_a_head_or_an_http_error() -> None:
    rng = random.Random(7)
    alphabet = b"\r\n :\t\x00\x7f\xffAz09/?%,;-"
    for _ in range(3000):
        data = bytearray(GOOD)
        for _ in range(rng.randint(1, 5)):
            at = rng.randrange(len(data))
            if rng.random() < 0.5:
                data[at] = rng.choice(alphabet)
            else:
                data[at:at] = bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 4)))
        raw = bytes(data)
        if not raw.endswith(b"\r\n\r\n"):
            raw += b"\r\n\r\n"
        with contextlib.suppress(HttpError):  # the only exception allowed
            parse(raw)


def test_chunked_body_split_anywhere_decodes_the_same() -> None:
    body = b"4\r\nwiki\r\n5;name=v\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nT: 1\r\n\r\nNEXT"
    rng = random.Random(3)
    for _ in range(300):
        dec = ChunkedDecoder(1024)
        pending, at = bytearray(), 0
        while not dec.done:  # as the protocol does: unconsumed bytes wait for more
            assert at < len(body), "ran out of input before the end of the body"
            step = rng.randint(1, 9)
            pending += body[at : at + step]
            at += step
            del pending[: dec.feed(pending)]
        assert bytes(dec.body) == b"wikipedia in\r\n\r\nchunks."
        assert bytes(pending) + body[at:] == b"NEXT"  # the next request's bytes are left alone


@pytest.mark.parametrize(
    "raw",
    [b"zz\r\n", b"5\r\nabcdeXX", b"-1\r\n", b"1" * 2000, b"0\r\nnot a trailer\r\n",
     b"ffffffffffffffffff\r\n"],
)  # fmt: skip
def test_bad_chunks_are_refused(raw: bytes) -> None:
    with pytest.raises(HttpError):
        ChunkedDecoder(1024).feed(raw)


def test_chunked_over_the_limit_is_413() -> None:
    with pytest.raises(HttpError) as err:
        ChunkedDecoder(10).feed(b"b\r\n")
    assert err.value.status == 413
