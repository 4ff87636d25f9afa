"""The worker protocol on bytes alone: layout, incremental decoding, and refusal of bad input."""

from __future__ import annotations

import struct

import pytest

from runtimes import protocol
from runtimes.protocol import Frame, FrameDecoder, Key, Kind, ProtocolError


def test_documented_example_bytes() -> None:
    # The worked example in docs/protocol.md, byte for byte.
    raw = protocol.encode(Frame(Kind.INVOKE, 7, b"hi", {Key.DEADLINE_MS: 1500}))
    assert raw.hex(" ") == (
        "00 00 00 19 01 01 00 00 00 00 00 00 00 00 00 07 00 00 00 07 01 00 04 00 00 05 dc 68 69"
    )


def test_hot_path_encoder_matches_generic_encoder() -> None:
    fast = protocol.encode_invoke(
        42,
        b"\x00payload\xff",
        deadline_ms=250,
        trace_id="t-1",
        function="fn",
        version="1.2.3",
        content_type="application/json",
        json=True,
    )
    generic = protocol.encode(
        Frame(
            Kind.INVOKE,
            42,
            b"\x00payload\xff",
            {
                Key.DEADLINE_MS: 250,
                Key.TRACE_ID: "t-1",
                Key.FUNCTION: "fn",
                Key.VERSION: "1.2.3",
                Key.CONTENT_TYPE: "application/json",
            },
            protocol.Flag.JSON,
        )
    )
    assert fast == generic


def test_round_trip_all_kinds_byte_by_byte() -> None:
    frames = [
        Frame(Kind.READY, 0, b"", {Key.RUNTIME: b"node/20"}),
        Frame(Kind.RESULT, 1, bytes(range(256)), {Key.CONTENT_TYPE: b"application/x"}),
        Frame(Kind.ERROR, 2, b"boom", {Key.ERROR_CODE: b"function_error"}),
        Frame(Kind.LOG, 3, b"line", {Key.LOG_LEVEL: b"warn"}),
        Frame(Kind.PONG, 2**64 - 1),
    ]
    stream = b"".join(protocol.encode(f) for f in frames)
    decoder = FrameDecoder()
    out: list[Frame] = []
    for i in range(len(stream)):  # worst case: one byte at a time
        out.extend(decoder.feed(stream[i : i + 1]))
    assert out == frames
    assert decoder.buffered == 0


def test_many_frames_in_one_chunk_and_a_partial_tail() -> None:
    one = protocol.encode(Frame(Kind.RESULT, 5, b"x" * 10))
    decoder = FrameDecoder()
    got = list(decoder.feed(one * 3 + one[:7]))
    assert [f.request_id for f in got] == [5, 5, 5]
    assert decoder.buffered == 7
    assert [f.payload for f in decoder.feed(one[7:])] == [b"x" * 10]


def test_unknown_header_keys_are_kept_not_fatal() -> None:
    raw = protocol.encode(Frame(Kind.RESULT, 1, b"", {200: b"future"}))
    (frame,) = FrameDecoder().feed(raw)
    assert frame.headers[200] == b"future"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (struct.pack(">I", 3) + b"abc", "shorter than"),
        (struct.pack(">IBBHQI", 16, 9, 2, 0, 1, 0), "unsupported protocol version"),
        (struct.pack(">IBBHQI", 16, 1, 99, 0, 1, 0), "unknown frame kind"),
        (struct.pack(">IBBHQI", 16, 1, 2, 0, 1, 50), "header length runs past"),
        (struct.pack(">IBBHQI", 18, 1, 2, 0, 1, 2) + b"\x01\x00", "truncated header"),
        (struct.pack(">IBBHQI", 20, 1, 2, 0, 1, 4) + b"\x02\x00\x09x", "runs past the header"),
        (struct.pack(">IBBHQI", 21, 1, 1, 0, 1, 5) + b"\x01\x00\x02\x00\x01", "must be 4 bytes"),
    ],
)
def test_malformed_frames_raise(raw: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        list(FrameDecoder().feed(raw))


def test_oversized_frame_is_refused_before_buffering_it() -> None:
    decoder = FrameDecoder(max_frame=1024)
    with pytest.raises(ProtocolError, match="exceeds"):
        list(decoder.feed(struct.pack(">I", 1025)))


def test_encoder_refuses_oversized_frames_and_bad_header_values() -> None:
    with pytest.raises(ProtocolError):
        protocol.encode(Frame(Kind.RESULT, 1, b"x" * (protocol.MAX_FRAME + 1)))
    with pytest.raises(ValueError, match="does not take an integer"):
        protocol.encode(Frame(Kind.LOG, 1, b"", {Key.LOG_LEVEL: 3}))
    with pytest.raises(ValueError, match="longer than 65535"):
        protocol.encode(Frame(Kind.LOG, 1, b"", {Key.TRACE_ID: "x" * 70000}))


def test_frame_accessors() -> None:
    f = Frame(Kind.INVOKE, 1, b"", {Key.DEADLINE_MS: 12, Key.TRACE_ID: b"abc"})
    assert f.number(Key.DEADLINE_MS) == 12
    assert f.text(Key.TRACE_ID) == "abc"
    assert f.text(Key.FUNCTION, "none") == "none"
    assert f.number(Key.TRACE_ID, -1) == -1
