package edgefn

import (
	"encoding/json"
	"testing"
)

// NOTIFY config: the newest config wins when nobody read the older one; other ops and bad
// JSON are ignored like unknown header keys.
func TestNotifyConfigCoalesces(t *testing.T) {
	notify := func(op, payload string) {
		deliverNotify(frame{kind: kindNotify, header: appendTLV(nil, keyOp, op), payload: []byte(payload)})
	}
	notify("config", `{"zone":"a"}`)
	notify("config", `{"zone":"b"}`)
	notify("other", `{"zone":"c"}`)
	notify("config", `not json`)
	select {
	case got := <-ConfigChanges():
		var cfg map[string]string
		if err := json.Unmarshal(got, &cfg); err != nil || cfg["zone"] != "b" {
			t.Fatalf("want the newest config b, got %s (%v)", got, err)
		}
	default:
		t.Fatal("no config change delivered")
	}
	select {
	case got := <-ConfigChanges():
		t.Fatalf("want one coalesced change, got another: %s", got)
	default:
	}
}
