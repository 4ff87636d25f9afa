// eta-node: estimated travel time for a trip of one or more legs.
//
// POST one leg or a list of legs (JSON):
//   {"distance_km": 12.5, "speed_kmh": 50, "traffic": "heavy"}
//   [{"distance_km": 3, "speed_kmh": 30, "traffic": "light"}, {"distance_km": 20, "speed_kmh": 90}]
//   {"legs": [...]}                      (same as a bare list)
// Answer: {"eta_min": 27, "tip": "..."}. Bad input throws a ValidationError, which the agent
// returns as a function error with the message below.
'use strict';

// How much longer a leg takes than at free-flow speed.
const TRAFFIC_FACTOR = { light: 1.0, moderate: 1.3, heavy: 1.8 };
const DEFAULT_TRAFFIC = 'light';
const MAX_LEGS = 100; // a trip, not a data set
const MAX_SPEED_KMH = 300;

class ValidationError extends Error {
  constructor(message) {
    super(message);
    this.name = 'ValidationError';
  }
}

function parseBody(event) {
  // The agent parses JSON for us when the request says application/json; accept raw bytes too.
  if (!Buffer.isBuffer(event)) return event;
  try {
    return JSON.parse(event.toString('utf8'));
  } catch {
    throw new ValidationError(
      'the request body must be JSON, e.g. {"distance_km": 12.5, "speed_kmh": 50}',
    );
  }
}

function checkLeg(leg, where) {
  if (leg === null || typeof leg !== 'object' || Array.isArray(leg)) {
    throw new ValidationError(`${where} must be an object with distance_km and speed_kmh`);
  }
  const { distance_km: distance, speed_kmh: speed, traffic = DEFAULT_TRAFFIC } = leg;
  if (typeof distance !== 'number' || !Number.isFinite(distance) || distance < 0) {
    throw new ValidationError(
      `${where}: distance_km must be a number >= 0, got ${JSON.stringify(distance)}`,
    );
  }
  if (typeof speed !== 'number' || !Number.isFinite(speed) || speed <= 0 || speed > MAX_SPEED_KMH) {
    throw new ValidationError(
      `${where}: speed_kmh must be a number above 0 and at most ${MAX_SPEED_KMH}, ` +
        `got ${JSON.stringify(speed)}`,
    );
  }
  if (!Object.hasOwn(TRAFFIC_FACTOR, traffic)) {
    throw new ValidationError(
      `${where}: traffic must be one of ${Object.keys(TRAFFIC_FACTOR).join(', ')}, ` +
        `got ${JSON.stringify(traffic)}`,
    );
  }
  return { distance, speed, traffic };
}

function tipFor(legs, etaMin) {
  const heavy = legs.filter((l) => l.traffic === 'heavy').length;
  if (heavy > 0) {
    const which = legs.length === 1 ? 'on your route' : `on ${heavy} of ${legs.length} legs`;
    return `Heavy traffic ${which}: leave early or consider public transport.`;
  }
  if (legs.some((l) => l.traffic === 'moderate')) {
    return 'Some slowdowns expected: allow a few extra minutes.';
  }
  return etaMin > 120
    ? 'Clear roads, but a long drive: plan a break.'
    : 'Clear roads: enjoy the drive.';
}

exports.handler = async (event, context) => {
  const body = parseBody(event);
  const raw = Array.isArray(body) ? body : body && Array.isArray(body.legs) ? body.legs : [body];
  if (raw.length === 0) throw new ValidationError('at least one leg is required');
  if (raw.length > MAX_LEGS) {
    throw new ValidationError(`at most ${MAX_LEGS} legs are allowed, got ${raw.length}`);
  }
  const legs = raw.map((leg, i) => checkLeg(leg, raw.length === 1 ? 'the trip' : `leg ${i + 1}`));
  const minutes = legs.reduce(
    (sum, l) => sum + (l.distance / l.speed) * 60 * TRAFFIC_FACTOR[l.traffic],
    0,
  );
  const etaMin = Math.round(minutes * 10) / 10;
  context.logger.debug(`eta for ${legs.length} leg(s): ${etaMin} min`);
  return { eta_min: etaMin, tip: tipFor(legs, etaMin) };
};
