// Errors and close codes of the GB6 protocol (PROTOCOL.md): what a rejected promise carries.

/** Close codes the server uses (PROTOCOL.md "Close codes"). */
export const CLOSE_BAD_HANDSHAKE = 4001; // terminal: the client sent something other than hello
export const CLOSE_UNAUTHORIZED = 4003; // terminal: do not retry with the same token
export const CLOSE_TOO_SLOW = 4008; // resume
export const CLOSE_DRAINING = 4009; // resume, on any edge

/** The protocol's error codes. */
export const CODES = Object.freeze([
  'invalid', 'unauthorized', 'forbidden', 'not_found', 'conflict', 'rate_limited',
  'quota_exceeded', 'too_large', 'unavailable', 'internal',
]);

/**
 * A request that failed: `code` is one of CODES, from the server's `error` reply (or HTTP
 * error body), or `unavailable` / `invalid` / `too_large` decided by the client itself.
 */
export class GB6Error extends Error {
  /**
   * @param {string} code
   * @param {string} message
   * @param {number|null} [retryAfterMs]
   */
  constructor(code, message, retryAfterMs = null) {
    super(message);
    this.name = 'GB6Error';
    /** @type {string} */
    this.code = code;
    /** @type {number|null} */
    this.retryAfterMs = retryAfterMs;
  }
}

/**
 * The error an `error` frame (or `{"error": {...}}` HTTP body) describes.
 * @param {Record<string, any>} frame
 * @returns {GB6Error}
 */
export function errorFromFrame(frame) {
  const code = typeof frame.code === 'string' ? frame.code : 'internal';
  const message = typeof frame.message === 'string' ? frame.message : code;
  const retry = Number.isInteger(frame.retry_after_ms) ? frame.retry_after_ms : null;
  return new GB6Error(code, message, retry);
}
