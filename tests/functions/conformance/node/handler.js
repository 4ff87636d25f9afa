// Conformance function for the Node host (docs/protocol.md, "Conformance").
// CommonJS on purpose: it is also the Lambda-style shape most existing functions have.
'use strict';

// Upper bound for "hang" so a mistaken request cannot pin a CPU for longer than this.
const DEFAULT_HANG_MS = 60000;

// The agent may send an op as JSON (flag or content type, then `event` is already parsed) or as
// plain bytes; accept both, and echo anything that is not an op.
function asOp(event) {
  if (Buffer.isBuffer(event)) {
    if (event.length === 0 || event[0] !== 0x7b /* { */) return null;
    try {
      event = JSON.parse(event.toString('utf8'));
    } catch {
      return null;
    }
  }
  return event !== null && typeof event === 'object' && typeof event.op === 'string' ? event : null;
}

async function block(context, c) {
  try {
    let value;
    switch (c.op) {
      case 'invoke':
        value = await context.invoke(c.target, c.payload ?? '');
        break;
      case 'publish':
        value = await context.publish(c.target, c.payload ?? '');
        break;
      case 'state.get':
        value = await context.state.get(c.target);
        if (value === null) return { missing: true };
        break;
      case 'state.set':
        value = await context.state.set(c.target, c.payload ?? '');
        break;
      case 'state.delete':
        value = await context.state.delete(c.target);
        break;
      case 'secret':
        value = await context.secret(c.target);
        break;
      case 'config':
        return { value: JSON.stringify(await context.config()) };
      default:
        throw new Error(`unknown block ${c.op}`);
    }
    return { value: value === undefined ? '' : value.toString('utf8') };
  } catch (err) {
    return { code: err.code ?? 'exception', message: String(err.message) };
  }
}

// Config changes the worker was told about (ops watch_config / config_seen).
const seenConfigs = [];
const onConfig = (cfg) => seenConfigs.push(cfg);

exports.handler = async (event, context) => {
  const req = asOp(event);
  if (req === null) return event; // bytes echoed byte for byte (a parsed JSON value as JSON)
  switch (req.op) {
    case 'sleep': {
      const ms = Number(req.ms) || 0;
      await new Promise((resolve) => setTimeout(resolve, ms));
      return { slept: ms };
    }
    case 'throw':
      throw new Error(String(req.message));
    case 'panic':
      // A throw from a nested callback: not part of the returned promise's chain, so only the
      // host's uncaught-exception handling can turn it into this request's ERROR frame.
      return new Promise(() => {
        setTimeout(() => {
          throw new TypeError(String(req.message));
        }, 0);
      });
    case 'log':
      context.logger.info(String(req.message));
      return { logged: true };
    case 'stdout':
      console.log(String(req.message));
      return { printed: true };
    case 'context':
      return {
        request_id: Number(context.requestId),
        function: context.functionName,
        version: context.functionVersion,
        trace_id: context.traceId,
        deadline_ms_left: context.getRemainingTimeInMillis(),
      };
    case 'watch_config':
      context.onConfigChange(onConfig); // the same listener twice is called once
      return { watching: true };
    case 'config_seen':
      return { seen: seenConfigs };
    case 'blocks':
      // Building blocks (docs/building-blocks.md): run every call at once, report each outcome.
      return { results: await Promise.all(req.calls.map((c) => block(context, c))) };
    case 'crash':
      process.exit(3);
      break;
    case 'hang': {
      const ms = req.ms === undefined ? DEFAULT_HANG_MS : Number(req.ms);
      const until = Date.now() + Math.min(Math.max(ms, 0), DEFAULT_HANG_MS);
      while (Date.now() < until) {
        // busy: the whole worker is blocked, which is the point
      }
      return { hung: ms };
    }
    default:
      throw new Error(`unknown op ${JSON.stringify(req.op)}`);
  }
};
