package edgefn

// The worker loop behind Start:
//
//	stdin ─▶ reader (Start's goroutine) ─▶ a goroutine per INVOKE ─▶ out queue ─▶ writer ─▶ frames fd
//
// The reader decodes frames and answers PING itself; handlers never touch the frame stream. A
// single writer goroutine owns it: it writes into a buffer and flushes whenever its queue runs
// empty, so a burst of answers costs one write syscall while a lone answer is not held back.

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"runtime/debug"
	"strings"
	"sync"
	"time"
)

const (
	readBufferSize  = 64 << 10
	writeBufferSize = 64 << 10
	// Frames queued for the writer before senders block: absorbs a burst of answers without
	// letting a stalled agent make the worker buffer without bound.
	outQueueLen = 256
)

// Start runs the worker and never returns. It exits 0 after SHUTDOWN (once in-flight requests
// are answered) or at the end of stdin, and 2 when stdin is not a valid frame stream.
func Start(handler Handler) {
	if handler == nil {
		fmt.Fprintln(os.Stderr, "edgefn: Start called with a nil handler")
		os.Exit(1)
	}
	frames, err := takeStdout()
	if err != nil {
		fmt.Fprintf(os.Stderr, "edgefn: cannot take over stdout: %v\n", err)
		os.Exit(1)
	}
	dieWithParent()
	h := &host{handler: handler, out: make(chan outgoing, outQueueLen)}
	go h.writeLoop(bufio.NewWriterSize(frames, writeBufferSize))
	os.Exit(h.serve(bufio.NewReaderSize(os.Stdin, readBufferSize)))
}

type host struct {
	handler  Handler
	out      chan outgoing
	inflight sync.WaitGroup
	calls    callTable
}

// outgoing is a frame for the writer, or (flushed != nil) a request to flush and report back.
type outgoing struct {
	f       frame
	flushed chan struct{}
}

func (h *host) send(f frame) { h.out <- outgoing{f: f} }

// serve reads frames until SHUTDOWN or EOF and returns the exit status.
func (h *host) serve(in io.Reader) int {
	name := "go/" + strings.TrimPrefix(runtime.Version(), "go")
	h.send(frame{kind: kindReady, header: appendTLV(appendTLV(nil, keyRuntime, name), keyFeatures, "notify")})
	for {
		f, err := readFrame(in)
		if err == io.EOF {
			return 0 // the agent closed our stdin: it is gone or wants us gone, in-flight work is dropped
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "edgefn: %v\n", err)
			return 2
		}
		switch f.kind {
		case kindInvoke:
			hdr, err := parseInvokeHeader(f.header)
			if err != nil {
				fmt.Fprintf(os.Stderr, "edgefn: %v\n", err)
				return 2
			}
			h.inflight.Add(1)
			go h.invoke(newRequest(f, hdr, time.Now()))
		case kindCallResult, kindCallError:
			h.calls.deliver(f)
		case kindNotify:
			deliverNotify(f)
		case kindPing:
			h.send(frame{kind: kindPong, id: f.id})
		case kindShutdown:
			h.inflight.Wait()
			h.flush()
			return 0
		default:
			fmt.Fprintf(os.Stderr, "edgefn: protocol error: a worker does not accept frames of kind %d\n", f.kind)
			return 2
		}
	}
}

// flush returns once everything queued before it is written and flushed.
func (h *host) flush() {
	done := make(chan struct{})
	h.out <- outgoing{flushed: done}
	<-done
}

func (h *host) writeLoop(w *bufio.Writer) {
	for o := range h.out {
		var err error
		if o.flushed == nil {
			err = writeFrame(w, o.f)
		}
		if err == nil && (o.flushed != nil || len(h.out) == 0) {
			err = w.Flush()
		}
		if err != nil {
			// The agent stopped reading: nobody is left to answer.
			fmt.Fprintf(os.Stderr, "edgefn: writing to the agent failed: %v\n", err)
			os.Exit(1)
		}
		if o.flushed != nil {
			close(o.flushed)
		}
	}
}

// invoke runs the handler for one request and sends its answer.
func (h *host) invoke(req *Request) {
	defer h.inflight.Done()
	ctx := context.WithValue(context.Background(), callKey{}, &call{host: h, req: req})
	cancel := context.CancelFunc(func() {})
	if !req.Deadline.IsZero() {
		ctx, cancel = context.WithDeadline(ctx, req.Deadline)
	}
	defer cancel()

	body, err := h.call(ctx, req)
	if err != nil {
		h.sendError(req.id, errorCode(err), err.Error())
		return
	}
	answer := frame{kind: kindResult, id: req.id, payload: body}
	if req.replyType != "" {
		answer.header = appendTLV(nil, keyContentType, req.replyType)
		if isJSONType(req.replyType) {
			answer.flags = flagJSON
		}
	}
	if frameSize(answer) > maxFrame {
		h.sendError(req.id, "function_error",
			fmt.Sprintf("the result of %d bytes exceeds the %d-byte frame limit", len(body), maxFrame))
		return
	}
	h.send(answer)
}

// call runs the handler and turns a panic into an error, so one bad request fails alone and the
// worker keeps serving the others.
func (h *host) call(ctx context.Context, req *Request) (body []byte, err error) {
	returned := false
	defer func() {
		if v := recover(); v != nil {
			fmt.Fprintf(os.Stderr, "edgefn: request %s panicked: %v\n%s", req.ID, v, debug.Stack())
			err = fmt.Errorf("panic: %v", v)
		} else if !returned {
			// runtime.Goexit: this goroutine ends after the defers, so answer from here.
			h.sendError(req.id, "function_error", "the handler called runtime.Goexit")
		}
	}()
	body, err = h.handler(ctx, req)
	returned = true
	return body, err
}

func (h *host) sendError(id uint64, code, message string) {
	h.send(frame{kind: kindError, id: id, header: appendTLV(nil, keyErrorCode, code), payload: []byte(message)})
}

func errorCode(err error) string {
	if errors.Is(err, context.DeadlineExceeded) {
		return "deadline_exceeded"
	}
	return "function_error"
}
