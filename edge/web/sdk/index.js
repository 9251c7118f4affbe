// The GB6 JavaScript SDK: plain ES modules, no build step. Import from the edge that serves it:
//
//   import { connect, Room } from '/sdk/index.js';
//   const client = await connect({ token });
//
// Modules: errors.js (GB6Error, close codes), core.js (the pure protocol core), transport.js
// (the WebSocket, backoff, heartbeat), client.js (Client: requests as promises, events,
// reconnect and resume), room.js (Room: a room's messages folded for a UI), files.js (HTTP).

import { Client } from './client.js';
import { GB6Error } from './errors.js';

export { Client, Emitter, newCid, SUBSCRIPTION_LOST } from './client.js';
export { Room } from './room.js';
export { GB6Error, CODES, CLOSE_DRAINING, CLOSE_TOO_SLOW, CLOSE_UNAUTHORIZED } from './errors.js';

/**
 * Where this page's node has its WebSocket: `GET /v1/config` → `{ws, files}` (docs/protocol.md,
 * "Web client"). @param {string} [base] the node's HTTP origin ('' = the page's)
 * @returns {Promise<{ws: string, files: boolean}>}
 */
export async function fetchConfig(base = '') {
  const resp = await fetch(`${base}/v1/config`, { cache: 'no-store' });
  if (!resp.ok) throw new GB6Error('unavailable', `GET /v1/config: HTTP ${resp.status}`);
  return resp.json();
}

/**
 * A connected client (its first hello done). `url` overrides the WebSocket URL that
 * /v1/config names; `base` is the node's HTTP origin for /v1/config and files.
 * Rejects with GB6Error `unauthorized` for a refused token.
 * @param {{token: string, url?: string, base?: string, backoff?: {initialMs?: number, maxMs?: number}}} opts
 * @returns {Promise<Client>}
 */
export async function connect(opts) {
  const base = opts.base ?? '';
  const first = opts.url ? null : await fetchConfig(base);
  let cached = first;
  const client = new Client({
    // Each attempt after the first asks /v1/config again: a node restarted elsewhere is found.
    url: async () => {
      if (opts.url) return opts.url;
      const config = cached ?? (await fetchConfig(base));
      cached = null;
      return config.ws;
    },
    token: opts.token,
    http: first && !first.files ? null : base,
    backoff: opts.backoff,
  });
  await client.connect();
  return client;
}
