package edgefn

// The wire format of docs/protocol.md: pure encode/decode, no I/O beyond the reader and writer
// it is given. The Python twin is runtimes/protocol.py; both must produce the same bytes.

import (
	"encoding/binary"
	"fmt"
	"io"
)

const (
	protocolVersion = 1
	fixedLen        = 16       // version, kind, flags, request id, header length
	maxFrame        = 64 << 20 // MAX_FRAME: bounds what a broken peer can make us allocate
	maxTLVValue     = 0xFFFF   // a TLV length is a u16
)

type kind uint8

const (
	kindInvoke kind = iota + 1
	kindResult
	kindError
	kindLog
	kindPing
	kindPong
	kindShutdown
	kindReady
	kindCall       // worker -> agent: a building-block call (blocks.go)
	kindCallResult // agent -> worker
	kindCallError  // agent -> worker
	kindNotify     // agent -> worker: OP "config", payload = the function's new config (JSON)
)

const flagJSON uint16 = 1

// Header keys (TLV). Unknown keys are skipped so the agent can add keys without a version bump.
const (
	keyDeadlineMS  byte = 1
	keyTraceID     byte = 2
	keyFunction    byte = 3
	keyVersion     byte = 4
	keyErrorCode   byte = 5
	keyLogLevel    byte = 6
	keyContentType byte = 7
	keyRuntime     byte = 8
	keyOp          byte = 9
	keyTarget      byte = 10
	keyParentID    byte = 11
	keyFeatures    byte = 12 // on READY: optional frames this host takes
)

type frame struct {
	kind    kind
	flags   uint16
	id      uint64
	header  []byte // encoded TLV entries
	payload []byte
}

// protocolError means the byte stream cannot be trusted any more: the worker exits with status 2.
type protocolError string

func (e protocolError) Error() string { return "protocol error: " + string(e) }

func protoErrorf(format string, args ...any) error {
	return protocolError(fmt.Sprintf(format, args...))
}

// readFrame reads one frame. It returns io.EOF only when the stream ends on a frame boundary.
func readFrame(r io.Reader) (frame, error) {
	var prefix [4]byte
	if _, err := io.ReadFull(r, prefix[:]); err != nil {
		if err == io.ErrUnexpectedEOF {
			return frame{}, protoErrorf("stream ended inside a length prefix")
		}
		return frame{}, err
	}
	n := binary.BigEndian.Uint32(prefix[:])
	if n > maxFrame {
		return frame{}, protoErrorf("frame of %d bytes exceeds the %d-byte maximum", n, maxFrame)
	}
	if n < fixedLen {
		return frame{}, protoErrorf("frame body of %d bytes is shorter than %d", n, fixedLen)
	}
	body := make([]byte, n)
	if _, err := io.ReadFull(r, body); err != nil {
		return frame{}, protoErrorf("stream ended inside a %d-byte frame", n)
	}
	if body[0] != protocolVersion {
		return frame{}, protoErrorf("unsupported protocol version %d", body[0])
	}
	k := kind(body[1])
	if k < kindInvoke || k > kindNotify {
		return frame{}, protoErrorf("unknown frame kind %d", k)
	}
	hl := binary.BigEndian.Uint32(body[12:16])
	if uint64(hl) > uint64(n-fixedLen) {
		return frame{}, protoErrorf("header length %d runs past the frame", hl)
	}
	return frame{
		kind:    k,
		flags:   binary.BigEndian.Uint16(body[2:4]),
		id:      binary.BigEndian.Uint64(body[4:12]),
		header:  body[fixedLen : fixedLen+hl],
		payload: body[fixedLen+hl:],
	}, nil
}

// writeFrame writes f with its length prefix. The caller checks the size (see frameSize).
func writeFrame(w io.Writer, f frame) error {
	var fixed [4 + fixedLen]byte
	binary.BigEndian.PutUint32(fixed[0:4], uint32(frameSize(f)))
	fixed[4] = protocolVersion
	fixed[5] = byte(f.kind)
	binary.BigEndian.PutUint16(fixed[6:8], f.flags)
	binary.BigEndian.PutUint64(fixed[8:16], f.id)
	binary.BigEndian.PutUint32(fixed[16:20], uint32(len(f.header)))
	if _, err := w.Write(fixed[:]); err != nil {
		return err
	}
	if _, err := w.Write(f.header); err != nil {
		return err
	}
	_, err := w.Write(f.payload)
	return err
}

// frameSize is the value of the length prefix: everything after it.
func frameSize(f frame) int { return fixedLen + len(f.header) + len(f.payload) }

// appendTLV adds one header entry; values longer than a u16 can say are cut, never rejected,
// because they are only ever echoes or author-chosen labels.
func appendTLV(b []byte, key byte, value string) []byte {
	if len(value) > maxTLVValue {
		value = value[:maxTLVValue]
	}
	b = append(b, key, byte(len(value)>>8), byte(len(value)))
	return append(b, value...)
}

// eachTLV calls fn for every header entry, in order.
func eachTLV(raw []byte, fn func(key byte, value []byte) error) error {
	for len(raw) > 0 {
		if len(raw) < 3 {
			return protoErrorf("truncated header entry")
		}
		key, n := raw[0], int(binary.BigEndian.Uint16(raw[1:3]))
		raw = raw[3:]
		if n > len(raw) {
			return protoErrorf("header entry %d runs past the header", key)
		}
		if err := fn(key, raw[:n]); err != nil {
			return err
		}
		raw = raw[n:]
	}
	return nil
}

// invokeHeader is what an INVOKE header tells the host.
type invokeHeader struct {
	deadlineMS  uint32
	hasDeadline bool
	traceID     string
	function    string
	version     string
	contentType string
}

func parseInvokeHeader(raw []byte) (invokeHeader, error) {
	var h invokeHeader
	err := eachTLV(raw, func(key byte, value []byte) error {
		switch key {
		case keyDeadlineMS:
			if len(value) != 4 {
				return protoErrorf("header key %d must be 4 bytes, got %d", key, len(value))
			}
			h.deadlineMS, h.hasDeadline = binary.BigEndian.Uint32(value), true
		case keyTraceID:
			h.traceID = string(value)
		case keyFunction:
			h.function = string(value)
		case keyVersion:
			h.version = string(value)
		case keyContentType:
			h.contentType = string(value)
		}
		return nil
	})
	return h, err
}
