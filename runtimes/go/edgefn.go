// Package edgefn is the Go SDK for edgefn functions.
//
// A function is a program whose main calls Start with its handler:
//
//	func main() { edgefn.Start(handle) }
//
//	func handle(ctx context.Context, req *edgefn.Request) ([]byte, error) {
//		edgefn.Logf(ctx, edgefn.LevelInfo, "got %d bytes", len(req.Payload))
//		return req.Payload, nil
//	}
//
// Start turns the process into a worker that speaks the edgefn worker protocol
// (docs/protocol.md) on stdin/stdout: it reads INVOKE frames, runs the handler for each one in
// its own goroutine and writes RESULT or ERROR frames back, in whatever order they finish.
package edgefn

import (
	"context"
	"encoding/json"
	"fmt"
	"mime"
	"os"
	"strconv"
	"strings"
	"time"
)

// Handler answers one invocation. Returning an error (or panicking) sends an ERROR frame with
// code function_error and the error text as message; context.DeadlineExceeded becomes
// deadline_exceeded. The returned bytes are sent back unchanged.
type Handler func(ctx context.Context, req *Request) ([]byte, error)

// Request is one invocation. The handler owns it until it returns.
type Request struct {
	ID          string    // the request id as a decimal string, unique among in-flight requests
	Payload     []byte    // raw request body
	Function    string    // function name from the manifest
	Version     string    // function version
	TraceID     string    // the agent's trace id, echoed on log lines
	ContentType string    // MIME type of Payload, "" when the client sent none
	IsJSON      bool      // Payload is JSON (flagged by the agent or Content-Type application/json)
	Deadline    time.Time // when the agent gives up on this request; zero when it sent none

	id        uint64
	replyType string
}

// Decode unmarshals a JSON payload into v, with an error message fit to show the caller.
func (r *Request) Decode(v any) error {
	if err := json.Unmarshal(r.Payload, v); err != nil {
		return fmt.Errorf("request body is not the expected JSON: %w", err)
	}
	return nil
}

// SetContentType sets the MIME type of the response. "application/json" (with or without
// parameters) also sets the protocol's JSON flag.
func (r *Request) SetContentType(contentType string) { r.replyType = contentType }

// ReplyJSON marshals v and marks the response as JSON: `return req.ReplyJSON(out)`.
func (r *Request) ReplyJSON(v any) ([]byte, error) {
	body, err := json.Marshal(v)
	if err != nil {
		return nil, fmt.Errorf("encoding the JSON response: %w", err)
	}
	r.SetContentType("application/json")
	return body, nil
}

// Level is the severity of a log line.
type Level string

const (
	LevelDebug Level = "debug"
	LevelInfo  Level = "info"
	LevelWarn  Level = "warn"
	LevelError Level = "error"
)

// Logs longer than this are cut: a log line is for people, and the agent keeps lines in memory.
const maxLogBytes = 16 << 10

// Logf sends one log line to the agent, tagged with the request and trace id found in ctx.
// With a ctx that carries no request (e.g. context.Background()) the line goes to stderr,
// which the agent also collects.
func Logf(ctx context.Context, level Level, format string, args ...any) {
	msg := strings.TrimRight(fmt.Sprintf(format, args...), "\n")
	if len(msg) > maxLogBytes {
		msg = msg[:maxLogBytes] + "...(truncated)"
	}
	switch level {
	case LevelDebug, LevelInfo, LevelWarn, LevelError:
	default:
		level = LevelInfo
	}
	c, _ := ctx.Value(callKey{}).(*call)
	if c == nil {
		fmt.Fprintf(os.Stderr, "%s: %s\n", level, msg)
		return
	}
	header := appendTLV(nil, keyLogLevel, string(level))
	if c.req.TraceID != "" {
		header = appendTLV(header, keyTraceID, c.req.TraceID)
	}
	c.host.send(frame{kind: kindLog, id: c.req.id, header: header, payload: []byte(msg)})
}

// RequestFrom returns the request a handler's ctx belongs to, or nil.
func RequestFrom(ctx context.Context) *Request {
	if c, _ := ctx.Value(callKey{}).(*call); c != nil {
		return c.req
	}
	return nil
}

type callKey struct{}

// call is what a handler's context carries: the request, and the host its log lines go to.
type call struct {
	host *host
	req  *Request
}

func newRequest(f frame, h invokeHeader, now time.Time) *Request {
	req := &Request{
		ID:          strconv.FormatUint(f.id, 10),
		Payload:     f.payload,
		Function:    h.function,
		Version:     h.version,
		TraceID:     h.traceID,
		ContentType: h.contentType,
		IsJSON:      f.flags&flagJSON != 0 || isJSONType(h.contentType),
		id:          f.id,
	}
	if h.hasDeadline {
		req.Deadline = now.Add(time.Duration(h.deadlineMS) * time.Millisecond)
	}
	return req
}

func isJSONType(contentType string) bool {
	media, _, err := mime.ParseMediaType(contentType)
	return err == nil && media == "application/json"
}
