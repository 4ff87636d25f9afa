package edgefn

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"testing"
)

// serve answers INVOKE and PING, and on SHUTDOWN returns only after every answer is flushed.
func TestServeAnswersThenDrainsOnShutdown(t *testing.T) {
	var in bytes.Buffer
	for _, f := range []frame{
		{kind: kindInvoke, id: 1, payload: []byte("abc")},
		{kind: kindInvoke, id: 2, payload: []byte("fail")},
		{kind: kindInvoke, id: 3, payload: []byte("panic")},
		{kind: kindPing, id: 4},
		{kind: kindShutdown},
	} {
		if err := writeFrame(&in, f); err != nil {
			t.Fatal(err)
		}
	}
	handler := func(ctx context.Context, req *Request) ([]byte, error) {
		switch string(req.Payload) {
		case "fail":
			return nil, errors.New("nope")
		case "panic":
			panic("boom")
		}
		return req.ReplyJSON(map[string]string{"id": RequestFrom(ctx).ID})
	}
	var out bytes.Buffer
	h := &host{handler: handler, out: make(chan outgoing, outQueueLen)}
	go h.writeLoop(bufio.NewWriter(&out))
	if code := h.serve(&in); code != 0 {
		t.Fatalf("exit status %d", code)
	}

	got := map[uint64]frame{}
	first, err := readFrame(&out)
	if err != nil || first.kind != kindReady {
		t.Fatalf("first frame %+v, %v: want READY", first, err)
	}
	for out.Len() > 0 {
		f, err := readFrame(&out)
		if err != nil {
			t.Fatal(err)
		}
		got[f.id] = f
	}
	if f := got[1]; f.kind != kindResult || string(f.payload) != `{"id":"1"}` || f.flags != flagJSON {
		t.Errorf("request 1: %+v", f)
	}
	if f := got[2]; f.kind != kindError || string(f.payload) != "nope" {
		t.Errorf("request 2: %+v", f)
	}
	if f := got[3]; f.kind != kindError || string(f.payload) != "panic: boom" {
		t.Errorf("request 3: %+v", f)
	}
	if f := got[4]; f.kind != kindPong {
		t.Errorf("ping 4: %+v", f)
	}
}
