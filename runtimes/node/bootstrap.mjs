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
// Beside it: frames.mjs (frame constants, encoding, output queue, decoder) and calls.mjs (the
// building-block client behind context.invoke/publish/state/config).
//
// No npm dependencies, and only modules Node has mostly loaded anyway: cold start is spawn to
// READY, and the target is within 1.3x of `node -e 0`.

import { AsyncLocalStorage } from 'node:async_hooks';
import { pathToFileURL } from 'node:url';
import { format } from 'node:util';
import { CallClient, answerCall, notify } from './calls.mjs';
import { installPrinting } from './printing.mjs';
import {
  CALL_ERROR, CALL_RESULT, CODE_BAD_REQUEST, CODE_FUNCTION, CT_JSON, CT_OCTET, CT_TEXT, ERROR,
  EXIT_FLUSH_MS, FIXED_LEN, FLAG_JSON, H_CONTENT_TYPE, H_DEADLINE_MS, H_ERROR_CODE, H_FEATURES,
  H_FUNCTION, H_OP, H_RUNTIME, H_TRACE_ID, H_VERSION, INVOKE, LEVEL, LOG, MAX_FRAME, MAX_LOG_CHARS,
  NO_DEADLINE_MS, NOTIFY, PING, PONG, PROTOCOL_VERSION, READY, RESULT, SHUTDOWN, flush,
  frameDecoder, note, out,
  protocolError, sendFrame, sendText, stderr, tlv,
} from './frames.mjs';

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

// The host's own modules, by URL (stack frames in them say nothing about the function's bug).
const HOST_URLS = ['./bootstrap.mjs', './calls.mjs', './frames.mjs', './printing.mjs'].map(
  (name) => new URL(name, import.meta.url).href,
);

// The stack for the log, cut where the host's own frames start.
function errorDetail(err) {
  if (err === null || typeof err !== 'object' || typeof err.stack !== 'string') {
    return errorMessage(err);
  }
  const lines = err.stack.split('\n');
  const cut = lines.findIndex((line) => HOST_URLS.some((url) => line.includes(url)));
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
class Context extends CallClient {
  #inv;
  #log = null;
  #logger = null;

  constructor(inv) {
    super(inv);
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
  let op = '';
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
      case H_OP:
        op = buf.toString('utf8', v, p);
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
    case NOTIFY:
      notify(op, buf.subarray(pstart, end));
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
  installPrinting(emitLog);
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
  stdin.on('data', frameDecoder(handleFrame, () => exiting));
  stdin.on('end', () => exitAfterFlush(0));
  stdin.on('error', () => exitAfterFlush(0));

  ready = true;
  // FEATURES: the optional agent -> worker frames this host takes (NOTIFY, docs/protocol.md).
  const header = [tlv(H_RUNTIME, `node/${process.versions.node}`), tlv(H_FEATURES, 'notify')];
  sendFrame(READY, 0, 0, 0, Buffer.concat(header), null);
  flush();
}

main().catch((err) => {
  note(`host failure before READY: ${errorDetail(err)}`);
  process.exit(1);
});
