package edgefn

// Building blocks (docs/building-blocks.md): calls from a handler to the agent. Each is a CALL
// frame with the handler's request id as PARENT_ID; the reader goroutine hands the CALL_RESULT
// or CALL_ERROR with the same call id to the waiting goroutine. Many calls may be in flight at
// once, from one handler or from many.
//
//	out, err := edgefn.Invoke(ctx, "eta-node", payload)
//	err = edgefn.Publish(ctx, "traffic/jam", event)
//	v, err := edgefn.State(ctx).Get("last")   // errors.Is(err, edgefn.ErrNotFound) when unset
//	err = edgefn.Config(ctx, &cfg)
//	key, err := edgefn.Secret(ctx, "maps-api-key") // errors.Is(err, edgefn.ErrNotPermitted)
//	for cfg := range edgefn.ConfigChanges() { ... } // the new config, whenever it changes

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"sync"
)

// CallError is a building-block call's failure, with the stable code the agent sent.
type CallError struct {
	Code    string // not_permitted | not_found | timeout | quota_exceeded | unavailable | a callee's code
	Message string
}

func (e *CallError) Error() string { return e.Code + ": " + e.Message }

// Is matches the sentinel errors by code: errors.Is(err, edgefn.ErrNotPermitted).
func (e *CallError) Is(target error) bool {
	t, ok := target.(*CallError)
	return ok && t.Message == "" && t.Code == e.Code
}

// Sentinels for errors.Is; the error returned carries the agent's message too.
var (
	ErrNotPermitted  = &CallError{Code: "not_permitted"}
	ErrNotFound      = &CallError{Code: "not_found"}
	ErrTimeout       = &CallError{Code: "timeout"}
	ErrQuotaExceeded = &CallError{Code: "quota_exceeded"}
	ErrUnavailable   = &CallError{Code: "unavailable"}
)

type callAnswer struct {
	ok      bool
	code    string
	payload []byte
}

// calls in flight: call id -> where its answer goes (buffered, so the reader never blocks).
type callTable struct {
	mu   sync.Mutex
	next uint64
	wait map[uint64]chan callAnswer
}

func (t *callTable) add() (uint64, chan callAnswer) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.wait == nil {
		t.wait = make(map[uint64]chan callAnswer)
	}
	t.next++
	ch := make(chan callAnswer, 1)
	t.wait[t.next] = ch
	return t.next, ch
}

func (t *callTable) forget(id uint64) {
	t.mu.Lock()
	delete(t.wait, id)
	t.mu.Unlock()
}

// deliver hands an answer over. An answer for a call the handler gave up on (its ctx ended) is
// dropped: that is not a protocol error, the caller just stopped waiting.
func (t *callTable) deliver(f frame) {
	t.mu.Lock()
	ch := t.wait[f.id]
	delete(t.wait, f.id)
	t.mu.Unlock()
	if ch == nil {
		return
	}
	a := callAnswer{ok: f.kind == kindCallResult, payload: f.payload}
	if !a.ok {
		_ = eachTLV(f.header, func(key byte, value []byte) error {
			if key == keyErrorCode {
				a.code = string(value)
			}
			return nil
		})
		if a.code == "" {
			a.code = "unavailable"
		}
	}
	ch <- a
}

func doCall(ctx context.Context, op, target string, payload []byte, contentType string) ([]byte, error) {
	c, _ := ctx.Value(callKey{}).(*call)
	if c == nil {
		return nil, &CallError{Code: "unavailable", Message: "building blocks need the handler's ctx"}
	}
	id, ch := c.host.calls.add()
	parent := make([]byte, 4)
	binary.BigEndian.PutUint32(parent, uint32(c.req.id))
	header := appendTLV(nil, keyOp, op)
	header = append(header, keyParentID, 0, 4)
	header = append(header, parent...)
	if target != "" {
		header = appendTLV(header, keyTarget, target)
	}
	if contentType != "" {
		header = appendTLV(header, keyContentType, contentType)
	}
	f := frame{kind: kindCall, id: id, header: header, payload: payload}
	if frameSize(f) > maxFrame {
		c.host.calls.forget(id)
		return nil, fmt.Errorf("the %s payload does not fit in one frame", op)
	}
	c.host.send(f)
	select {
	case a := <-ch:
		if a.ok {
			return a.payload, nil
		}
		return nil, &CallError{Code: a.code, Message: string(a.payload)}
	case <-ctx.Done():
		c.host.calls.forget(id)
		return nil, &CallError{Code: "timeout", Message: ctx.Err().Error()}
	}
}

// Invoke calls another function through the agent's router (cache and routing policy apply)
// and returns its result. The manifest must list it in [permissions] invoke.
func Invoke(ctx context.Context, function string, payload []byte) ([]byte, error) {
	return doCall(ctx, "invoke", function, payload, "")
}

// InvokeJSON marshals in, invokes with content type application/json, and unmarshals into out.
func InvokeJSON(ctx context.Context, function string, in, out any) error {
	body, err := json.Marshal(in)
	if err != nil {
		return err
	}
	res, err := doCall(ctx, "invoke", function, body, "application/json")
	if err != nil || out == nil {
		return err
	}
	return json.Unmarshal(res, out)
}

// Publish sends an event to the platform. It returns once the event is durable on the device
// (the agent's outbox); delivery follows over MQTT or HTTP, after an outage too.
func Publish(ctx context.Context, topic string, payload []byte) error {
	_, err := doCall(ctx, "publish", topic, payload, "")
	return err
}

// Config unmarshals the function's config (from the platform's desired state) into v.
func Config(ctx context.Context, v any) error {
	body, err := doCall(ctx, "config", "", nil, "")
	if err != nil {
		return err
	}
	return json.Unmarshal(body, v)
}

// StateStore is the function's own key-value store (SQLite on the device, bounded in bytes).
type StateStore struct{ ctx context.Context }

// State returns the function's store, for calls made on behalf of ctx's request.
func State(ctx context.Context) StateStore { return StateStore{ctx: ctx} }

// Get returns the value of key; errors.Is(err, ErrNotFound) when it was never set.
func (s StateStore) Get(key string) ([]byte, error) {
	return doCall(s.ctx, "state.get", key, nil, "")
}

// Set stores value under key; errors.Is(err, ErrQuotaExceeded) past the manifest's bound.
func (s StateStore) Set(key string, value []byte) error {
	_, err := doCall(s.ctx, "state.set", key, value, "")
	return err
}

// Delete removes key (no error when it did not exist).
func (s StateStore) Delete(key string) error {
	_, err := doCall(s.ctx, "state.delete", key, nil, "")
	return err
}

// Secret returns the current value of a secret the platform delivered to this device. The
// manifest must list name in [permissions] secrets (ErrNotPermitted otherwise); ErrNotFound
// until it was delivered. The agent is asked on every call, so a rotation is seen at once.
func Secret(ctx context.Context, name string) ([]byte, error) {
	return doCall(ctx, "secret", name, nil, "")
}

// configChanges holds the latest config the agent announced; one slot, so a slow reader
// sees the newest config, not a backlog, and the frame reader never blocks.
var configChanges = make(chan json.RawMessage, 1)

// ConfigChanges delivers the function's new config (JSON) whenever the agent applies a new
// desired config for it. Changes that arrive while nobody reads are coalesced: the channel
// holds only the latest. Workers started after a change read Config themselves.
func ConfigChanges() <-chan json.RawMessage { return configChanges }

// deliverNotify handles a NOTIFY frame on the reader goroutine (the only sender).
func deliverNotify(f frame) {
	op := ""
	_ = eachTLV(f.header, func(key byte, value []byte) error {
		if key == keyOp {
			op = string(value)
		}
		return nil
	})
	if op != "config" || !json.Valid(f.payload) {
		return // a notification this host does not know, like an unknown header key
	}
	cfg := json.RawMessage(append([]byte(nil), f.payload...))
	for {
		select {
		case configChanges <- cfg:
			return
		default:
			select { // full: drop the older config, keep the newest
			case <-configChanges:
			default:
			}
		}
	}
}
