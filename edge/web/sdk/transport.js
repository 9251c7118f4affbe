// One WebSocket at a time, replaced when it ends: connect, backoff, heartbeat, silence.
//
// Rules:
// - `start()` opens a connection; when it closes (for any reason) the owner is told
//   (`onClose(code, reason)`) and decides: `reconnect(delayMs)` or `stop()`. Nothing reconnects
//   on its own, so the owner's state machine (core.js) is the one place that decides.
// - Backoff: `backoff(retryAfterMs)` is the delay before the next attempt, doubling from
//   `initialMs` up to `maxMs`, each drawn from [d/2, d] (jitter: a restarted edge is not hit
//   by all its clients at once); a server's retry_after_ms is honoured. `resetBackoff()` after
//   a connection completes hello.
// - Heartbeat: once `heartbeat(ms, ping)` is set, `ping()` is called every ms/2 (the server
//   closes connections silent for twice `heartbeat_ms`), and a connection that has received no
//   frame for 2 × ms is dropped (close 4000, "silent") so that a dead network is noticed.
// - Writes go straight to the socket; `bufferedAmount` is observable (`buffered`).

/** @typedef {{onOpen: () => void, onText: (text: string) => void, onClose: (code: number, reason: string) => void}} TransportHooks */

export const CLOSE_SILENT = 4000; // ours: no frame for two heartbeats

export class Transport {
  /**
   * @param {() => Promise<string>|string} url the WebSocket URL for each attempt
   * @param {TransportHooks} hooks
   * @param {{initialMs?: number, maxMs?: number, WebSocketImpl?: typeof WebSocket}} [opts]
   */
  constructor(url, hooks, opts = {}) {
    this._url = url;
    this._hooks = hooks;
    this._initialMs = opts.initialMs ?? 250;
    this._maxMs = opts.maxMs ?? 5_000;
    this._WS = opts.WebSocketImpl ?? globalThis.WebSocket;
    this._delay = this._initialMs;
    /** @type {WebSocket|null} */
    this._ws = null;
    this._timer = null;
    this._beat = null;
    this._lastRx = 0;
    this._stopped = false;
    this._starting = false;
    this._dropClosed = null;
  }

  get open() {
    return this._ws !== null && this._ws.readyState === 1;
  }

  get buffered() {
    return this._ws ? this._ws.bufferedAmount : 0;
  }

  /** Open a connection now (unless stopped or one is open or being opened). */
  async start() {
    if (this._stopped || this._ws || this._starting) return;
    clearTimeout(this._timer);
    this._timer = null;
    this._starting = true;
    let url;
    try {
      url = await this._url();
    } catch (err) {
      this._hooks.onClose(1006, `no URL: ${err?.message ?? err}`);
      return;
    } finally {
      this._starting = false;
    }
    if (this._stopped || this._ws) return;
    const ws = new this._WS(url);
    this._ws = ws;
    let closed = false;
    const closedOnce = (code, reason) => {
      if (closed) return;
      closed = true;
      if (this._ws === ws) this._ws = null;
      this._stopHeartbeat();
      this._hooks.onClose(code, reason);
    };
    ws.onopen = () => {
      this._lastRx = Date.now();
      this._hooks.onOpen();
    };
    ws.onmessage = (ev) => {
      this._lastRx = Date.now();
      if (typeof ev.data === 'string') this._hooks.onText(ev.data);
    };
    ws.onclose = (ev) => closedOnce(ev.code, ev.reason);
    ws.onerror = () => {}; // a close follows every error
    this._dropClosed = closedOnce;
  }

  /** @param {string} text */
  send(text) {
    if (this.open) this._ws.send(text);
  }

  /**
   * End the current connection now and report it closed with `code` (the owner then decides
   * what follows). Used for silence, draining and by tests.
   */
  drop(code = 1000, reason = '') {
    const ws = this._ws;
    if (!ws) return;
    try {
      ws.close(code >= 3000 || code === 1000 ? code : 1000, reason);
    } catch {
      ws.close();
    }
    // Do not wait for the closing handshake of a peer that may be gone.
    this._dropClosed?.(code, reason);
  }

  /** The delay before the next attempt (and double the one after it). */
  backoff(retryAfterMs = null) {
    const d = this._delay;
    this._delay = Math.min(this._maxMs, this._delay * 2);
    const jittered = d / 2 + Math.random() * (d / 2);
    return Math.max(jittered, retryAfterMs ?? 0);
  }

  resetBackoff() {
    this._delay = this._initialMs;
  }

  /** Open the next connection after `delayMs`. */
  reconnect(delayMs) {
    if (this._stopped) return;
    clearTimeout(this._timer);
    this._timer = setTimeout(() => this.start(), delayMs);
  }

  /** @param {number} ms the server's heartbeat_ms @param {() => void} ping */
  heartbeat(ms, ping) {
    this._stopHeartbeat();
    this._beat = setInterval(() => {
      if (Date.now() - this._lastRx > 2 * ms) this.drop(CLOSE_SILENT, 'silent');
      else ping();
    }, Math.max(50, ms / 2));
  }

  _stopHeartbeat() {
    clearInterval(this._beat);
    this._beat = null;
  }

  /** Terminal: close the socket (1000) and never reconnect. */
  stop() {
    this._stopped = true;
    clearTimeout(this._timer);
    this._stopHeartbeat();
    const ws = this._ws;
    this._ws = null;
    if (ws) ws.close(1000, 'bye');
  }
}
