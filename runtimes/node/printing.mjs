// User code's printing inside a worker: process.stdout and console become log lines.
//
// stdout belongs to the protocol (frames.mjs), so printing from a handler must never reach fd 1.
// `installPrinting(emitLog)` replaces process.stdout with a Writable whose write is synchronous
// (each line is attributed to the request that printed it, through emitLog's AsyncLocalStorage
// lookup in bootstrap.mjs) and points every console method at emitLog with its level.
import { Writable } from 'node:stream';
import { format, inspect } from 'node:util';

export function installPrinting(emitLog) {
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
