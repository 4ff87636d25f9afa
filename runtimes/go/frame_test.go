package edgefn

import (
	"bytes"
	"encoding/hex"
	"errors"
	"io"
	"strings"
	"testing"
)

// The worked example of docs/protocol.md: INVOKE, request id 7, 1500 ms left, payload "hi".
const docExample = "00000019" + "01" + "01" + "0000" + "0000000000000007" + "00000007" + "01000400 0005dc" + "6869"

func mustHex(t *testing.T, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(strings.ReplaceAll(s, " ", ""))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestDecodeDocExample(t *testing.T) {
	f, err := readFrame(bytes.NewReader(mustHex(t, docExample)))
	if err != nil {
		t.Fatal(err)
	}
	if f.kind != kindInvoke || f.id != 7 || string(f.payload) != "hi" || f.flags != 0 {
		t.Fatalf("decoded %+v", f)
	}
	h, err := parseInvokeHeader(f.header)
	if err != nil {
		t.Fatal(err)
	}
	if !h.hasDeadline || h.deadlineMS != 1500 {
		t.Fatalf("header %+v", h)
	}
}

func TestEncodeMatchesDocExample(t *testing.T) {
	var buf bytes.Buffer
	header := []byte{keyDeadlineMS, 0, 4, 0, 0, 0x05, 0xdc}
	if err := writeFrame(&buf, frame{kind: kindInvoke, id: 7, header: header, payload: []byte("hi")}); err != nil {
		t.Fatal(err)
	}
	if want := mustHex(t, docExample); !bytes.Equal(buf.Bytes(), want) {
		t.Fatalf("encoded %x, want %x", buf.Bytes(), want)
	}
}

func TestRoundTrip(t *testing.T) {
	payload := []byte{0, 0xff, 1, 2, 3}
	header := appendTLV(appendTLV(nil, keyErrorCode, "function_error"), 200, "unknown key")
	in := frame{kind: kindError, flags: flagJSON, id: 1<<64 - 1, header: header, payload: payload}
	var buf bytes.Buffer
	for i := 0; i < 2; i++ {
		if err := writeFrame(&buf, in); err != nil {
			t.Fatal(err)
		}
	}
	for i := 0; i < 2; i++ {
		out, err := readFrame(&buf)
		if err != nil {
			t.Fatal(err)
		}
		if out.kind != in.kind || out.flags != in.flags || out.id != in.id ||
			!bytes.Equal(out.header, in.header) || !bytes.Equal(out.payload, in.payload) {
			t.Fatalf("round trip: got %+v, want %+v", out, in)
		}
	}
	if _, err := readFrame(&buf); err != io.EOF {
		t.Fatalf("at a frame boundary want io.EOF, got %v", err)
	}
}

func TestInvokeHeaderSkipsUnknownKeys(t *testing.T) {
	raw := appendTLV(nil, 99, "from the future")
	raw = append(raw, keyDeadlineMS, 0, 4, 0, 0, 0, 42)
	raw = appendTLV(raw, keyTraceID, "t-1")
	raw = appendTLV(raw, keyFunction, "fn")
	raw = appendTLV(raw, keyVersion, "1.2.3")
	raw = appendTLV(raw, keyContentType, "application/json")
	h, err := parseInvokeHeader(raw)
	if err != nil {
		t.Fatal(err)
	}
	want := invokeHeader{deadlineMS: 42, hasDeadline: true, traceID: "t-1", function: "fn",
		version: "1.2.3", contentType: "application/json"}
	if h != want {
		t.Fatalf("got %+v, want %+v", h, want)
	}
}

func TestAppendTLVCutsLongValues(t *testing.T) {
	raw := appendTLV(nil, keyTraceID, strings.Repeat("x", maxTLVValue+10))
	if len(raw) != 3+maxTLVValue {
		t.Fatalf("len %d", len(raw))
	}
	if err := eachTLV(raw, func(byte, []byte) error { return nil }); err != nil {
		t.Fatal(err)
	}
}

func TestMalformed(t *testing.T) {
	body := func(version, k byte, headerLen string, rest string) []byte {
		b := mustHex(t, "01"+"00"+"0000"+"0000000000000001"+headerLen+rest)
		b[0], b[1] = version, k
		n := len(b)
		return append([]byte{byte(n >> 24), byte(n >> 16), byte(n >> 8), byte(n)}, b...)
	}
	cases := map[string][]byte{
		"too long":           mustHex(t, "04000001"),
		"shorter than fixed": mustHex(t, "00000003 010100"),
		"bad version":        body(2, 1, "00000000", ""),
		"unknown kind":       body(1, 13, "00000000", ""),
		"kind zero":          body(1, 0, "00000000", ""),
		"header past frame":  body(1, 1, "00000005", "0100"),
		"truncated body":     mustHex(t, "00000020 0101"),
		"truncated prefix":   mustHex(t, "0000"),
	}
	for name, raw := range cases {
		_, err := readFrame(bytes.NewReader(raw))
		var pe protocolError
		if !errors.As(err, &pe) {
			t.Errorf("%s: want a protocolError, got %v", name, err)
		}
	}
	headers := map[string][]byte{
		"truncated entry":   {keyTraceID, 0},
		"entry past header": {keyTraceID, 0, 5, 'a'},
		"deadline not 4":    {keyDeadlineMS, 0, 2, 0, 1},
	}
	for name, raw := range headers {
		if _, err := parseInvokeHeader(raw); err == nil {
			t.Errorf("%s: want an error", name)
		}
	}
}
