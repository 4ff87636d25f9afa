// edgefn Node.js host: the building-block client. context.invoke/publish/state/config/secret
// send a CALL frame to the agent (docs/building-blocks.md) and wait for its CALL_RESULT/CALL_ERROR.
// context.onConfigChange registers a worker-wide listener the agent's NOTIFY `config` frames call.

import {
  CALL,
  CALL_RESULT,
  CT_JSON,
  FLAG_JSON,
  H_OP,
  H_PARENT_ID,
  H_TARGET,
  LEVEL,
  LOG,
  MAX_FRAME,
  protocolError,
  sendFrame,
  sendText,
  tlv,
} from './frames.mjs';

// ---- building-block calls in flight: call id -> {resolve, reject} ----
export class EdgefnError extends Error {
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

export function call(inv, op, target, payload) {
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

export function answerCall(kind, id, code, payload) {
  const pending = calls.get(id);
  if (pending === undefined) protocolError(`answer for unknown call id ${id}`);
  calls.delete(id);
  if (kind === CALL_RESULT) pending.resolve(Buffer.from(payload));
  else pending.reject(new EdgefnError(code || 'unavailable', payload.toString('utf8')));
}

// ---- config change listeners: worker-wide (a handler registers from any invocation; the same
// function registered twice is called once). Each gets the new config object. ----
const configListeners = new Set();

export function notify(op, payload) {
  if (op !== 'config') return; // a NOTIFY this host does not know: ignored, like unknown headers
  let config;
  try {
    config = JSON.parse(payload.toString('utf8'));
  } catch (err) {
    protocolError(`NOTIFY config payload is not JSON: ${err.message}`);
  }
  for (const fn of configListeners) {
    try {
      const ret = fn(config);
      if (ret !== null && typeof ret === 'object' && typeof ret.catch === 'function') {
        ret.catch((err) => logListenerError(err));
      }
    } catch (err) {
      logListenerError(err);
    }
  }
}

function logListenerError(err) {
  const text = `onConfigChange listener failed: ${err?.stack ?? String(err)}`;
  sendText(LOG, 0, 0, 0, LEVEL.error, text.slice(0, 64 * 1024));
}

// The building-block half of the `context` object handlers receive (bootstrap.mjs Context).
export class CallClient {
  #inv;

  constructor(inv) {
    this.#inv = inv;
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

  // The secret's current value as a Buffer (`String(buf)` for text). The manifest must list the
  // name in [permissions] secrets; not_found until the platform delivered it to this device.
  // Asked of the agent on every call, so a rotation is seen at once: do not keep it for long.
  secret(name) {
    return call(this.#inv, 'secret', name, null);
  }

  // fn(newConfig) is called whenever the agent applies a new desired config for this function,
  // outside any invocation. Returns a function that removes the listener.
  onConfigChange(fn) {
    if (typeof fn !== 'function') throw new TypeError('onConfigChange: expects a function');
    configListeners.add(fn);
    return () => configListeners.delete(fn);
  }
}
