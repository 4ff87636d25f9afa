// The Go conformance function: echoes a non-JSON payload byte for byte and runs the JSON ops of
// the conformance table in docs/protocol.md.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"sync"
	"syscall"
	"time"
	"unsafe"

	edgefn "edgefn.dev/sdk"
)

type op struct {
	Op      string  `json:"op"`
	MS      *int    `json:"ms"`
	Message string  `json:"message"`
	Calls   []block `json:"calls"`
}

// block is one building-block call of the "blocks" op (docs/protocol.md, "Conformance").
type block struct {
	Op      string `json:"op"`
	Target  string `json:"target"`
	Payload string `json:"payload"`
}

// runBlock makes one call through the SDK and reports its outcome the way every runtime does.
func runBlock(ctx context.Context, b block) map[string]any {
	var out []byte
	var err error
	switch b.Op {
	case "invoke":
		out, err = edgefn.Invoke(ctx, b.Target, []byte(b.Payload))
	case "publish":
		err = edgefn.Publish(ctx, b.Target, []byte(b.Payload))
	case "state.get":
		out, err = edgefn.State(ctx).Get(b.Target)
		if errors.Is(err, edgefn.ErrNotFound) {
			return map[string]any{"missing": true}
		}
	case "state.set":
		err = edgefn.State(ctx).Set(b.Target, []byte(b.Payload))
	case "state.delete":
		err = edgefn.State(ctx).Delete(b.Target)
	case "secret":
		out, err = edgefn.Secret(ctx, b.Target)
	case "config":
		var cfg map[string]any
		if err = edgefn.Config(ctx, &cfg); err == nil {
			var raw []byte
			raw, err = json.Marshal(cfg)
			out = raw
		}
	default:
		err = fmt.Errorf("unknown block %q", b.Op)
	}
	var ce *edgefn.CallError
	if errors.As(err, &ce) {
		return map[string]any{"code": ce.Code, "message": ce.Message}
	}
	if err != nil {
		return map[string]any{"code": "exception", "message": err.Error()}
	}
	return map[string]any{"value": string(out)}
}

func main() { edgefn.Start(handle) }

// Config changes the worker was told about (ops watch_config / config_seen).
var (
	watchOnce sync.Once
	seenMu    sync.Mutex
	seen      = []json.RawMessage{}
)

func watchConfig() {
	watchOnce.Do(func() {
		go func() {
			for cfg := range edgefn.ConfigChanges() {
				seenMu.Lock()
				seen = append(seen, cfg)
				seenMu.Unlock()
			}
		}()
	})
}

func handle(ctx context.Context, req *edgefn.Request) ([]byte, error) {
	if !req.IsJSON {
		return req.Payload, nil
	}
	var o op
	if err := req.Decode(&o); err != nil {
		return nil, err
	}
	switch o.Op {
	case "sleep":
		ms := o.ms(0)
		time.Sleep(time.Duration(ms) * time.Millisecond)
		return req.ReplyJSON(map[string]int{"slept": ms})
	case "throw":
		return nil, errors.New(o.Message)
	case "panic":
		panic(o.Message)
	case "log":
		edgefn.Logf(ctx, edgefn.LevelInfo, "%s", o.Message)
		return req.ReplyJSON(map[string]bool{"logged": true})
	case "stdout":
		fmt.Println(o.Message)
		return req.ReplyJSON(map[string]bool{"printed": true})
	case "context":
		var left any // null when the agent sent no deadline
		if !req.Deadline.IsZero() {
			left = time.Until(req.Deadline).Milliseconds()
		}
		id, _ := strconv.ParseUint(req.ID, 10, 64) // a number, as the other runtimes report it
		return req.ReplyJSON(map[string]any{
			"request_id":       id,
			"function":         req.Function,
			"version":          req.Version,
			"trace_id":         req.TraceID,
			"deadline_ms_left": left,
		})
	case "watch_config":
		watchConfig()
		return req.ReplyJSON(map[string]bool{"watching": true})
	case "config_seen":
		seenMu.Lock()
		defer seenMu.Unlock()
		return req.ReplyJSON(map[string]any{"seen": seen})
	case "blocks":
		// All calls at once, each in its own goroutine: many in flight on one worker.
		results := make([]map[string]any, len(o.Calls))
		var wg sync.WaitGroup
		for i, b := range o.Calls {
			wg.Add(1)
			go func(i int, b block) {
				defer wg.Done()
				results[i] = runBlock(ctx, b)
			}(i, b)
		}
		wg.Wait()
		return req.ReplyJSON(map[string]any{"results": results})
	case "crash":
		os.Exit(3)
	case "hang":
		ms := o.ms(60000)
		if err := freeze(time.Duration(ms) * time.Millisecond); err != nil {
			return nil, fmt.Errorf("hang: %w", err)
		}
		return req.ReplyJSON(map[string]int{"hung": ms})
	case "":
		return req.Payload, nil // JSON without an op is echoed like any other payload
	}
	return nil, fmt.Errorf("unknown op %q", o.Op)
}

func (o op) ms(def int) int {
	if o.MS == nil {
		return def
	}
	return *o.MS
}

// freeze blocks the whole worker, not just this goroutine: Go keeps serving other requests and
// PINGs while one goroutine blocks, so the process stops itself with SIGSTOP, and a kernel
// timer armed first sends SIGCONT after d. Nothing in the process runs meanwhile, exactly like a
// runaway handler in a single-threaded runtime. The timer repeats every d until deleted, so a
// SIGCONT that fires before the stop takes effect cannot leave the worker stopped for good.
func freeze(d time.Duration) error {
	if d < time.Millisecond {
		d = time.Millisecond // a zero timer value would disarm the timer
	}
	// struct sigevent: sigval, signo, notify (SIGEV_SIGNAL = 0), padding to 64 bytes.
	var ev struct {
		value  uintptr
		signo  int32
		notify int32
		_      [64 - 8 - unsafe.Sizeof(uintptr(0))]byte
	}
	ev.signo = int32(syscall.SIGCONT)
	var timer int32
	const clockMonotonic = 1
	if _, _, e := syscall.Syscall(syscall.SYS_TIMER_CREATE, clockMonotonic,
		uintptr(unsafe.Pointer(&ev)), uintptr(unsafe.Pointer(&timer))); e != 0 {
		return fmt.Errorf("timer_create: %w", e)
	}
	defer syscall.Syscall(syscall.SYS_TIMER_DELETE, uintptr(timer), 0, 0)
	every := syscall.NsecToTimespec(d.Nanoseconds())
	spec := [2]syscall.Timespec{every, every} // it_interval, it_value
	if _, _, e := syscall.Syscall6(syscall.SYS_TIMER_SETTIME, uintptr(timer), 0,
		uintptr(unsafe.Pointer(&spec)), 0, 0, 0); e != 0 {
		return fmt.Errorf("timer_settime: %w", e)
	}
	// Stop this very thread's group: a thread-directed stop signal is taken on the way out of
	// tgkill, so we only return once resumed. (kill(getpid()) may let this thread run on and
	// delete the timer before the stop reaches it.)
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	return syscall.Tgkill(os.Getpid(), syscall.Gettid(), syscall.SIGSTOP)
}
