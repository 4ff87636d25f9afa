// edgefn Node.js host: the frame layer of docs/protocol.md (constants, encoding, the output
// queue written once per tick, the incremental decoder). Used by bootstrap.mjs and calls.mjs.

// ---- protocol constants (docs/protocol.md, runtimes/protocol.py) ----
export const PROTOCOL_VERSION = 1;
export const INVOKE = 1;
export const RESULT = 2;
export const ERROR = 3;
export const LOG = 4;
export const PING = 5;
export const PONG = 6;
export const SHUTDOWN = 7;
export const READY = 8;
export const CALL = 9; // building blocks: function -> agent (docs/building-blocks.md)
export const CALL_RESULT = 10;
export const CALL_ERROR = 11;
export const NOTIFY = 12; // agent -> worker: OP `config`, payload = the new config (JSON)
export const FLAG_JSON = 1;
export const H_DEADLINE_MS = 1;
export const H_TRACE_ID = 2;
export const H_FUNCTION = 3;
export const H_VERSION = 4;
export const H_ERROR_CODE = 5;
export const H_LOG_LEVEL = 6;
export const H_CONTENT_TYPE = 7;
export const H_RUNTIME = 8;
export const H_OP = 9;
export const H_TARGET = 10;
export const H_PARENT_ID = 11;
export const H_FEATURES = 12; // on READY: optional frames this host takes
export const FIXED_LEN = 16;
export const MAX_FRAME = 64 * 1024 * 1024; // same bound as the agent: larger frames kill the worker
// A log line is for humans; cap it so one runaway console.log cannot approach MAX_FRAME.
export const MAX_LOG_CHARS = 256 * 1024;
// Payloads up to this size are copied into the frame's own buffer (one iovec); larger ones are
// written as a second buffer without copying.
export const COPY_PAYLOAD_MAX = 16 * 1024;
// Without a DEADLINE_MS header (the agent always sends one) the request has no deadline: use the
// largest value the header could have carried.
export const NO_DEADLINE_MS = 0xffffffff;
// SHUTDOWN/EOF wait this long for the last frames to reach the pipe before exiting regardless.
export const EXIT_FLUSH_MS = 2000;

export function tlv(key, value) {
  const raw = Buffer.from(value, 'utf8');
  const b = Buffer.allocUnsafe(3 + raw.length);
  b[0] = key;
  b.writeUInt16BE(raw.length, 1);
  raw.copy(b, 3);
  return b;
}

export const CT_OCTET = tlv(H_CONTENT_TYPE, 'application/octet-stream');
export const CT_TEXT = tlv(H_CONTENT_TYPE, 'text/plain; charset=utf-8');
export const CT_JSON = tlv(H_CONTENT_TYPE, 'application/json');
export const CODE_FUNCTION = tlv(H_ERROR_CODE, 'function_error');
export const CODE_BAD_REQUEST = tlv(H_ERROR_CODE, 'bad_request');
export const LEVEL = {
  debug: tlv(H_LOG_LEVEL, 'debug'),
  info: tlv(H_LOG_LEVEL, 'info'),
  warn: tlv(H_LOG_LEVEL, 'warn'),
  error: tlv(H_LOG_LEVEL, 'error'),
};

export const stderr = process.stderr;
export function note(text) {
  stderr.write(`edgefn node: ${text}\n`);
}

// ---- output: frames are queued and flushed once per tick ----
// The real stdout is taken before user code runs; afterwards `process.stdout` is a stand-in.
export const out = process.stdout;
let outQueue = [];
let flushScheduled = false;

export function flush() {
  flushScheduled = false;
  const q = outQueue;
  if (q.length === 0) return;
  outQueue = [];
  if (q.length === 1) {
    out.write(q[0]);
    return;
  }
  // Corked writes leave as a single writev.
  out.cork();
  for (let i = 0; i < q.length; i++) out.write(q[i]);
  out.uncork();
}

export function enqueue(buf) {
  outQueue.push(buf);
  if (!flushScheduled) {
    flushScheduled = true;
    process.nextTick(flush);
  }
}

function writeFixed(b, bodyLen, kind, flags, hi, lo, hlen) {
  b.writeUInt32BE(bodyLen, 0);
  b[4] = PROTOCOL_VERSION;
  b[5] = kind;
  b.writeUInt16BE(flags, 6);
  b.writeUInt32BE(hi, 8);
  b.writeUInt32BE(lo, 12);
  b.writeUInt32BE(hlen, 16);
}

// Queue one frame with a byte payload (Buffer or null). Returns false when it would exceed
// MAX_FRAME (nothing is queued then).
export function sendFrame(kind, flags, hi, lo, header, payload) {
  const hlen = header === null ? 0 : header.length;
  const plen = payload === null ? 0 : payload.length;
  const bodyLen = FIXED_LEN + hlen + plen;
  if (bodyLen > MAX_FRAME) return false;
  const inline = plen <= COPY_PAYLOAD_MAX;
  const b = Buffer.allocUnsafe(4 + FIXED_LEN + hlen + (inline ? plen : 0));
  writeFixed(b, bodyLen, kind, flags, hi, lo, hlen);
  if (hlen) header.copy(b, 20);
  if (inline) {
    if (plen) payload.copy(b, 20 + hlen);
    enqueue(b);
  } else {
    enqueue(b);
    enqueue(payload);
  }
  return true;
}

// Same for a string payload, encoded as UTF-8 straight into the frame buffer.
export function sendText(kind, flags, hi, lo, header, text) {
  const hlen = header === null ? 0 : header.length;
  const plen = Buffer.byteLength(text, 'utf8');
  const bodyLen = FIXED_LEN + hlen + plen;
  if (bodyLen > MAX_FRAME) return false;
  const b = Buffer.allocUnsafe(4 + bodyLen);
  writeFixed(b, bodyLen, kind, flags, hi, lo, hlen);
  if (hlen) header.copy(b, 20);
  b.write(text, 20 + hlen, plen, 'utf8');
  enqueue(b);
  return true;
}

// ---- input: incremental frame decoder over stdin chunks ----
export function protocolError(message) {
  note(`protocol error from the agent: ${message}; exiting`);
  process.exit(2);
}

// The stdin 'data' listener: calls onFrame(buf, start, end) for each whole frame body, and
// stops (leaving the rest unread) once stopped() is true.
export function frameDecoder(onFrame, stopped) {
  let chunks = [];
  let buffered = 0;
  let need = 4; // bytes required before the next parse attempt is worth it

  return function onData(chunk) {
    chunks.push(chunk);
    buffered += chunk.length;
    if (buffered < need || stopped()) return;
    const buf = chunks.length === 1 ? chunks[0] : Buffer.concat(chunks, buffered);
    const end = buf.length;
    let pos = 0;
    need = 4;
    while (end - pos >= 4) {
      const len = buf.readUInt32BE(pos);
      if (len > MAX_FRAME) {
        protocolError(`frame of ${len} bytes exceeds the ${MAX_FRAME}-byte maximum`);
      }
      if (len < FIXED_LEN) protocolError(`frame body of ${len} bytes is shorter than ${FIXED_LEN}`);
      if (end - pos - 4 < len) {
        need = 4 + len;
        break;
      }
      onFrame(buf, pos + 4, pos + 4 + len);
      pos += 4 + len;
      if (stopped()) return;
    }
    if (pos === end) {
      chunks = [];
      buffered = 0;
    } else {
      const rest = pos === 0 ? buf : buf.subarray(pos);
      chunks = [rest];
      buffered = rest.length;
    }
  };
}
