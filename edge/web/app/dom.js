// DOM helpers of the web app: the node's shared `h` and `replace` (node/web/elements.js), and
// the app's own.

export { h, replace } from './elements.js';

/** A short, readable time for a `ts` (ms since the epoch). */
export function time(ts) {
  return new Date(ts).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
}
