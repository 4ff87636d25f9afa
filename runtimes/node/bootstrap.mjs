// edgefn Node.js host: runs one function module as a worker speaking docs/protocol.md.
//
//   node bootstrap.mjs /abs/path/to/entry.js [handlerName]
//
// Flow: take the real stdout for frames and hand user code a stdout/console that turn printing
// into LOG frames (stderr until READY) -> import() the entry (ESM or CommonJS) and find the
// handler -> send READY -> decode frames from stdin chunks: INVOKE runs the handler inside an
// AsyncLocalStorage scope (so console.log and uncaught errors are tied to their request),
// PING is answered with PONG, SHUTDOWN drains in-flight work then exits 0. Frames going out are
// queued and written once per tick (one writev for everything that finished in that tick).
//
// Exit codes: 0 after SHUTDOWN or EOF on stdin, 1 when the function cannot be loaded, 2 when the
// agent sends something that is not a valid frame (framing is lost, so there is no way on).
//
// No npm dependencies, and only modules Node has mostly loaded anyway: cold start is spawn to
// READY, and the target is within 1.3x of `node -e 0`.

import { AsyncLocalStorage } from 'node:async_hooks';
import { Writable } from 'node:stream';
import { pathToFileURL } from 'node:url';
import { format, inspect } from 'node:util';

// ---- protocol constants (docs/protocol.md, runtimes/protocol.py) ----
const PROTOCOL_VERSION = 1;
const INVOKE = 1;
const RESULT = 2;
const ERROR = 3;
const LOG = 4;
const PING = 5;
const PONG = 6;
const SHUTDOWN = 7;
const READY = 8;
const CALL = 9; // building blocks: function -> agent (docs/building-blocks.md)
const CALL_RESULT = 10;
const CALL_ERROR = 11;
const FLAG_JSON = 1;
const H_DEADLINE_MS = 1;
const H_TRACE_ID = 2;
const H_FUNCTION = 3;
const H_VERSION = 4;
const H_ERROR_CODE = 5;
const H_LOG_LEVEL = 6;
const H_CONTENT_TYPE = 7;
const H_RUNTIME = 8;
const H_OP = 9;
const H_TARGET = 10;
const H_PARENT_ID = 11;
const FIXED_LEN = 16;
const MAX_FRAME = 64 * 1024 * 1024; // same bound as the agent: larger frames kill the worker
// A log line is for humans; cap it so one runaway console.log cannot approach MAX_FRAME.
const MAX_LOG_CHARS = 256 * 1024;
// Payloads up to this size are copied into the frame's own buffer (one iovec); larger ones are
// written as a second buffer without copying.
const COPY_PAYLOAD_MAX = 16 * 1024;
// Without a DEADLINE_MS header (the agent always sends one) the request has no deadline: use the
// largest value the header could have carried.
const NO_DEADLINE_MS = 0xffffffff;
// SHUTDOWN/EOF wait this long for the last frames to reach the pipe before exiting regardless.
const EXIT_FLUSH_MS = 2000;

function tlv(key, value) {
  const raw = Buffer.from(value, 'utf8');
  const b = Buffer.allocUnsafe(3 + raw.length);
  b[0] = key;
  b.writeUInt16BE(raw.length, 1);
  raw.copy(b, 3);
  return b;
}

const CT_OCTET = tlv(H_CONTENT_TYPE, 'application/octet-stream');
const CT_TEXT = tlv(H_CONTENT_TYPE, 'text/plain; charset=utf-8');
const CT_JSON = tlv(H_CONTENT_TYPE, 'application/json');
const CODE_FUNCTION = tlv(H_ERROR_CODE, 'function_error');
const CODE_BAD_REQUEST = tlv(H_ERROR_CODE, 'bad_request');
const LEVEL = {
  debug: tlv(H_LOG_LEVEL, 'debug'),
  info: tlv(H_LOG_LEVEL, 'info'),
  warn: tlv(H_LOG_LEVEL, 'warn'),
  error: tlv(H_LOG_LEVEL, 'error'),
};

const stderr = process.stderr;
function note(text) {
  stderr.write(`edgefn node: ${text}\n`);
}

// ---- output: frames are queued and flushed once per tick ----
// The real stdout is taken before user code runs; afterwards `process.stdout` is a stand-in.
const out = process.stdout;
let outQueue = [];
let flushScheduled = false;

function flush() {
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

function enqueue(buf) {
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
function sendFrame(kind, flags, hi, lo, header, payload) {
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
function sendText(kind, flags, hi, lo, header, text) {
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

// ---- invocations ----
const als = new AsyncLocalStorage();
let ready = false;
let shuttingDown = false;
let exiting = false;
let inflight = 0;
const envFunction = process.env.EDGEFN_FUNCTION ?? '';
const envVersion = process.env.EDGEFN_VERSION ?? '';

function errorMessage(err) {
  if (err !== null && typeof err === 'object' && typeof err.message === 'string') {
    const name = typeof err.name === 'string' && err.name ? err.name : 'Error';
    return err.message ? `${name}: ${err.message}` : name;
  }
  if (typeof err === 'string') return err;
  try {
    const json = JSON.stringify(err);
    if (json !== undefined) return json;
  } catch {
    // fall through: not serialisable (cycle, BigInt)
  }
  return String(err);
}

const SELF_URL = import.meta.url;

// The stack for the log, cut where the host's own frames start (they say nothing about the bug).
function errorDetail(err) {
  if (err === null || typeof err !== 'object' || typeof err.stack !== 'string') {
    return errorMessage(err);
  }
  const lines = err.stack.split('\n');
  const cut = lines.findIndex((line) => line.includes(SELF_URL));
  return (cut > 0 ? lines.slice(0, cut) : lines).join('\n');
}

class Invocation {
  constructor(hi, lo, deadline, traceId, fn, version) {
    this.hi = hi;
    this.lo = lo;
    this.deadline = deadline;
    this.traceId = traceId;
    this.fn = fn;
    this.version = version;
    this.done = false;
    this.logHeaders = null;
  }

  requestIdString() {
    return this.hi === 0 ? String(this.lo) : String((BigInt(this.hi) << 32n) | BigInt(this.lo));
  }

  succeed(value) {
    if (this.done) return;
    let ok;
    if (value === undefined) {
      ok = sendFrame(RESULT, 0, this.hi, this.lo, CT_OCTET, null);
    } else if (typeof value === 'string') {
      ok = sendText(RESULT, 0, this.hi, this.lo, CT_TEXT, value);
    } else if (value instanceof Uint8Array) {
      const buf = Buffer.isBuffer(value)
        ? value
        : Buffer.from(value.buffer, value.byteOffset, value.byteLength);
      ok = sendFrame(RESULT, 0, this.hi, this.lo, CT_OCTET, buf);
    } else if (ArrayBuffer.isView(value) || value instanceof ArrayBuffer) {
      const buf = value instanceof ArrayBuffer
        ? Buffer.from(value)
        : Buffer.from(value.buffer, value.byteOffset, value.byteLength);
      ok = sendFrame(RESULT, 0, this.hi, this.lo, CT_OCTET, buf);
    } else {
      let json;
      try {
        json = JSON.stringify(value);
      } catch (err) {
        this.fail(err, 'the handler returned a value that cannot be serialised to JSON: ');
        return;
      }
      ok = sendText(RESULT, FLAG_JSON, this.hi, this.lo, CT_JSON, json ?? 'null');
    }
    if (!ok) {
      this.fail(new RangeError(`the result does not fit in one ${MAX_FRAME}-byte frame`));
      return;
    }
    this.finish();
  }

  fail(err, prefix = '') {
    if (this.done) return;
    const message = prefix + errorMessage(err);
    note(`${envFunction} request ${this.requestIdString()} failed: ${prefix}${errorDetail(err)}`);
    sendText(ERROR, 0, this.hi, this.lo, CODE_FUNCTION, message.slice(0, MAX_LOG_CHARS));
    this.finish();
  }

  badRequest(message) {
    sendText(ERROR, 0, this.hi, this.lo, CODE_BAD_REQUEST, message);
    this.finish();
  }

  finish() {
    this.done = true;
    inflight--;
    if (shuttingDown && inflight === 0) exitAfterFlush(0);
  }

  log(level, text) {
    let header = this.logHeaders?.get(level);
    if (header === undefined) {
      header = this.traceId
        ? Buffer.concat([LEVEL[level], tlv(H_TRACE_ID, this.traceId)])
        : LEVEL[level];
      (this.logHeaders ??= new Map()).set(level, header);
    }
    // A line logged after the request was answered (a timer it left behind) goes out with id 0:
    // the agent has forgotten that id, and may already have given it to another request.
    if (this.done) sendText(LOG, 0, 0, 0, header, clip(text));
    else sendText(LOG, 0, this.hi, this.lo, header, clip(text));
  }
}

function clip(text) {
  return text.length > MAX_LOG_CHARS
    ? `${text.slice(0, MAX_LOG_CHARS)} ...[${text.length - MAX_LOG_CHARS} more characters]`
    : text;
}

// One log line from anywhere: attributed to the invocation whose async scope is running.
function emitLog(level, text) {
  if (!ready) {
    // Printing while the module loads goes to stderr: READY must be the first frame on stdout.
    stderr.write(`${text}\n`);
    return;
  }
  const inv = als.getStore();
  if (inv !== undefined) inv.log(level, text);
  else sendText(LOG, 0, 0, 0, LEVEL[level], clip(text));
}

// The object handlers receive as `context` (AWS Lambda's shape, plus a logger).
class Context {
  #inv;
  #log = null;
  #logger = null;

  constructor(inv) {
    this.#inv = inv;
    this.requestId = inv.requestIdString();
    this.awsRequestId = this.requestId;
    this.functionName = inv.fn;
    this.functionVersion = inv.version;
    this.traceId = inv.traceId;
    this.deadline = inv.deadline;
    // Accepted for Lambda compatibility; the answer is sent as soon as the handler settles.
    this.callbackWaitsForEmptyEventLoop = true;
  }

  getRemainingTimeInMillis() {
    return Math.max(0, this.deadline - Date.now());
  }

  get log() {
    if (this.#log === null) {
      const inv = this.#inv;
      this.#log = (...args) => inv.log('info', format(...args));
    }
    return this.#log;
  }

  get logger() {
    if (this.#logger === null) {
      const inv = this.#inv;
      this.#logger = {
        debug: (...args) => inv.log('debug', format(...args)),
        info: (...args) => inv.log('info', format(...args)),
        log: (...args) => inv.log('info', format(...args)),
        warn: (...args) => inv.log('warn', format(...args)),
        error: (...args) => inv.log('error', format(...args)),
      };
    }
    return this.#logger;
  }

  // ---- building blocks: each a CALL frame to the agent, answered by CALL_RESULT/CALL_ERROR ----
  // Errors reject with an EdgefnError whose `code` is one of not_permitted, not_found, timeout,
  // quota_exceeded, unavailable (or the callee's own code for a failed invoke).

  invoke(fn, payload) {
    return call(this.#inv, 'invoke', fn, payload);
  }

  publish(topic, payload) {
    return call(this.#inv, 'publish', topic, payload).then(() => undefined);
  }

  get state() {
    const inv = this.#inv;
    return {
      // A key that was never set (or was deleted) resolves to null.
      get: (key) =>
        call(inv, 'state.get', key, null).catch((err) => {
          if (err instanceof EdgefnError && err.code === 'not_found') return null;
          throw err;
        }),
      set: (key, value) => call(inv, 'state.set', key, value).then(() => undefined),
      delete: (key) => call(inv, 'state.delete', key, null).then(() => undefined),
    };
  }

  config() {
    return call(this.#inv, 'config', '', null).then((buf) => JSON.parse(buf.toString('utf8')));
  }

  // Legacy Lambda completion methods.
  succeed(value) {
    this.#inv.succeed(value);
  }

  fail(err) {
    this.#inv.fail(err ?? new Error('context.fail() called'));
  }

  done(err, value) {
    if (err !== null && err !== undefined) this.#inv.fail(err);
    else this.#inv.succeed(value);
  }
}

// ---- building-block calls in flight: call id -> {resolve, reject} ----
class EdgefnError extends Error {
  constructor(code, message) {
    super(message);
    this.name = 'EdgefnError';
    this.code = code;
  }
}
globalThis.EdgefnError = EdgefnError; // for `err instanceof EdgefnError` in functions

const calls = new Map();
let nextCallId = 1;

function toBuffer(value) {
  if (value === null || value === undefined) return { buf: null, json: false };
  if (Buffer.isBuffer(value)) return { buf: value, json: false };
  if (typeof value === 'string') return { buf: Buffer.from(value, 'utf8'), json: false };
  if (value instanceof Uint8Array) {
    return { buf: Buffer.from(value.buffer, value.byteOffset, value.byteLength), json: false };
  }
  return { buf: Buffer.from(JSON.stringify(value), 'utf8'), json: true };
}

function call(inv, op, target, payload) {
  if (inv.done) {
    return Promise.reject(new EdgefnError('timeout', 'the invocation was already answered'));
  }
  if (typeof target !== 'string') {
    return Promise.reject(new TypeError(`${op}: the name must be a string`));
  }
  const id = nextCallId++;
  if (nextCallId > 0xffffffff) nextCallId = 1;
  const { buf, json } = toBuffer(payload);
  const parent = Buffer.allocUnsafe(7);
  parent[0] = H_PARENT_ID;
  parent.writeUInt16BE(4, 1);
  parent.writeUInt32BE(inv.lo, 3);
  const parts = [tlv(H_OP, op), parent];
  if (target) parts.push(tlv(H_TARGET, target));
  if (json) parts.push(CT_JSON);
  return new Promise((resolve, reject) => {
    if (!sendFrame(CALL, json ? FLAG_JSON : 0, 0, id, Buffer.concat(parts), buf)) {
      reject(new RangeError(`the ${op} payload does not fit in one ${MAX_FRAME}-byte frame`));
      return;
    }
    calls.set(id, { resolve, reject });
  });
}

function answerCall(kind, id, code, payload) {
  const pending = calls.get(id);
  if (pending === undefined) protocolError(`answer for unknown call id ${id}`);
  calls.delete(id);
  if (kind === CALL_RESULT) pending.resolve(Buffer.from(payload));
  else pending.reject(new EdgefnError(code || 'unavailable', payload.toString('utf8')));
}

let handler = null;
let callbackStyle = false;

function runHandler(inv, event) {
  const context = new Context(inv);
  let ret;
  try {
    if (callbackStyle) {
      const callback = (err, value) => {
        if (err !== null && err !== undefined) inv.fail(err);
        else inv.succeed(value);
      };
      ret = handler(event, context, callback);
    } else {
      ret = handler(event, context);
    }
  } catch (err) {
    inv.fail(err);
    return;
  }
  if (isObject(ret) && typeof ret.then === 'function') {
    const onValue = (value) => inv.succeed(value);
    const onError = (err) => inv.fail(err);
    if (ret instanceof Promise) ret.then(onValue, onError);
    else Promise.resolve(ret).then(onValue, onError);
  } else if (!callbackStyle) {
    inv.succeed(ret);
  }
  // Callback style with a plain return value: the answer comes when the callback is called.
}

function isObject(value) {
  return value !== null && (typeof value === 'object' || typeof value === 'function');
}

function isJsonType(ct) {
  const semi = ct.indexOf(';');
  return (semi === -1 ? ct : ct.slice(0, semi)).trim().toLowerCase() === 'application/json';
}

// ---- input: incremental frame decoder over stdin chunks ----
let chunks = [];
let buffered = 0;
let need = 4; // bytes required before the next parse attempt is worth it

function protocolError(message) {
  note(`protocol error from the agent: ${message}; exiting`);
  process.exit(2);
}

function onData(chunk) {
  chunks.push(chunk);
  buffered += chunk.length;
  if (buffered < need || exiting) return;
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
    handleFrame(buf, pos + 4, pos + 4 + len);
    pos += 4 + len;
    if (exiting) return;
  }
  if (pos === end) {
    chunks = [];
    buffered = 0;
  } else {
    const rest = pos === 0 ? buf : buf.subarray(pos);
    chunks = [rest];
    buffered = rest.length;
  }
}

function handleFrame(buf, start, end) {
  const pv = buf[start];
  if (pv !== PROTOCOL_VERSION) protocolError(`unsupported protocol version ${pv}`);
  const kind = buf[start + 1];
  const flags = buf.readUInt16BE(start + 2);
  const hi = buf.readUInt32BE(start + 4);
  const lo = buf.readUInt32BE(start + 8);
  const hlen = buf.readUInt32BE(start + 12);
  const hstart = start + FIXED_LEN;
  const pstart = hstart + hlen;
  if (pstart > end) protocolError('header length runs past the frame');

  let deadlineMs = -1;
  let traceId = '';
  let fn = '';
  let fnVersion = '';
  let ct = '';
  let code = '';
  let p = hstart;
  while (p < pstart) {
    if (p + 3 > pstart) protocolError('truncated header entry');
    const key = buf[p];
    const vlen = buf.readUInt16BE(p + 1);
    const v = p + 3;
    p = v + vlen;
    if (p > pstart) protocolError(`header entry ${key} runs past the header`);
    switch (key) {
      case H_DEADLINE_MS:
        if (vlen !== 4) protocolError(`header key ${key} must be 4 bytes, got ${vlen}`);
        deadlineMs = buf.readUInt32BE(v);
        break;
      case H_TRACE_ID:
        traceId = buf.toString('utf8', v, p);
        break;
      case H_FUNCTION:
        fn = buf.toString('utf8', v, p);
        break;
      case H_VERSION:
        fnVersion = buf.toString('utf8', v, p);
        break;
      case H_CONTENT_TYPE:
        ct = buf.toString('utf8', v, p);
        break;
      case H_ERROR_CODE:
        code = buf.toString('utf8', v, p);
        break;
      default:
        break; // unknown keys are skipped (protocol rule)
    }
  }

  switch (kind) {
    case INVOKE: {
      const deadline = Date.now() + (deadlineMs < 0 ? NO_DEADLINE_MS : deadlineMs);
      fn ||= envFunction;
      fnVersion ||= envVersion;
      const inv = new Invocation(hi, lo, deadline, traceId, fn, fnVersion);
      inflight++;
      if (shuttingDown) {
        inv.badRequest('the worker is shutting down');
        return;
      }
      const payload = buf.subarray(pstart, end);
      let event = payload;
      if ((flags & FLAG_JSON) !== 0 || (ct !== '' && isJsonType(ct))) {
        try {
          event = JSON.parse(payload.toString('utf8'));
        } catch (err) {
          inv.badRequest(`the payload is not valid JSON: ${err.message}`);
          return;
        }
      }
      als.run(inv, runHandler, inv, event);
      return;
    }
    case CALL_RESULT:
    case CALL_ERROR:
      answerCall(kind, lo, code, buf.subarray(pstart, end));
      return;
    case PING:
      sendFrame(PONG, 0, hi, lo, null, null);
      return;
    case SHUTDOWN:
      shuttingDown = true;
      if (inflight === 0) exitAfterFlush(0);
      return;
    default:
      protocolError(`unexpected frame kind ${kind} from the agent`);
  }
}

function exitAfterFlush(code) {
  if (exiting) return;
  exiting = true;
  flush();
  // The write callback runs once everything queued before it has reached the pipe.
  out.write(Buffer.alloc(0), () => process.exit(code));
  setTimeout(() => process.exit(code), EXIT_FLUSH_MS);
}

// ---- user-facing stdout and console ----
function installPrinting() {
  const toText = (chunk, encoding) => {
    if (typeof chunk === 'string') return chunk;
    const enc = typeof encoding === 'string' && encoding !== 'buffer' ? encoding : 'utf8';
    if (Buffer.isBuffer(chunk)) return chunk.toString(enc);
    if (chunk instanceof Uint8Array) {
      return Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength).toString(enc);
    }
    return String(chunk);
  };
  const writeLine = (chunk, encoding) => {
    let text = toText(chunk, encoding);
    if (text.length === 0) return;
    if (text.endsWith('\n')) text = text.slice(0, -1);
    emitLog('info', text);
  };
  // A real Writable so that `stream.pipe(process.stdout)` works, but with a synchronous write so
  // each line is attributed to the request that printed it.
  const fake = new Writable({
    write(chunk, encoding, cb) {
      writeLine(chunk, encoding);
      cb();
    },
  });
  fake.write = function write(chunk, encoding, cb) {
    if (typeof encoding === 'function') {
      cb = encoding;
      encoding = undefined;
    }
    writeLine(chunk, encoding);
    if (typeof cb === 'function') process.nextTick(cb);
    return true;
  };
  fake.isTTY = false;
  Object.defineProperty(process, 'stdout', {
    configurable: true,
    enumerable: true,
    get: () => fake,
  });

  const method = (level) => (...args) => emitLog(level, format(...args));
  console.log = method('info');
  console.info = method('info');
  console.debug = method('debug');
  console.warn = method('warn');
  console.error = method('error');
  console.dir = (obj, options) =>
    emitLog('info', inspect(obj, { customInspect: false, ...options }));
  console.trace = (...args) => {
    const stack = new Error().stack.split('\n').slice(2).join('\n');
    emitLog('debug', `Trace: ${format(...args)}\n${stack}`);
  };
}

// ---- failures outside the handler's own promise chain ----
function onStrayError(err, what) {
  const inv = als.getStore();
  if (inv !== undefined && !inv.done) {
    inv.fail(err); // e.g. a throw inside a setTimeout callback started by the handler
  } else {
    note(`${what} not tied to a request in flight (the worker keeps running): ${errorDetail(err)}`);
  }
}

process.on('uncaughtException', (err) => onStrayError(err, 'uncaught exception'));
process.on('unhandledRejection', (reason) => onStrayError(reason, 'unhandled promise rejection'));

// ---- start ----
async function main() {
  const [entryArg, handlerName = 'handler'] = process.argv.slice(2);
  if (!entryArg) {
    note('usage: node bootstrap.mjs <entry module> [handler name]');
    process.exit(1);
  }
  installPrinting();
  const entry = entryArg; // absolute by contract (a relative path resolves against the cwd)
  let ns;
  try {
    ns = await import(pathToFileURL(entry).href);
  } catch (err) {
    note(`cannot load ${entry}: ${errorDetail(err)}`);
    process.exit(1);
  }
  let fn = ns[handlerName];
  const dflt = ns.default;
  if (typeof fn !== 'function' && isObject(dflt)) {
    fn = dflt[handlerName]; // CommonJS `exports.handler`, or an ESM default export object
  }
  if (typeof fn !== 'function' && handlerName === 'handler' && typeof dflt === 'function') {
    fn = dflt; // `export default async function (event, context) {}` / `module.exports = fn`
  }
  if (typeof fn !== 'function') {
    const names = new Set(Object.keys(ns));
    if (dflt !== null && typeof dflt === 'object') for (const k of Object.keys(dflt)) names.add(k);
    names.delete('default');
    const list = names.size ? [...names].join(', ') : 'nothing';
    note(`${entry} does not export a function named '${handlerName}' (it exports: ${list})`);
    process.exit(1);
  }
  handler = fn;
  callbackStyle = fn.length >= 3;

  out.on('error', (err) => {
    // EPIPE: the agent is gone; nobody is left to answer.
    note(`stdout failed: ${err.message}; exiting`);
    process.exit(1);
  });
  const stdin = process.stdin;
  stdin.on('data', onData);
  stdin.on('end', () => exitAfterFlush(0));
  stdin.on('error', () => exitAfterFlush(0));

  ready = true;
  sendFrame(READY, 0, 0, 0, tlv(H_RUNTIME, `node/${process.versions.node}`), null);
  flush();
}

main().catch((err) => {
  note(`host failure before READY: ${errorDetail(err)}`);
  process.exit(1);
});
