// The client protocol's pure core: requests in, frames out; frames in, replies and events out.
// No WebSocket, no timers (the same design as the Python SDK's node/_client_core.py): the
// client drives one Core across all of its connections.
//
// Phases:
//   disconnected --connectionMade--> hello --hello ok--> ready --`reconnect` event--> draining
//   hello | ready | draining --connectionLost--> disconnected;  any --close--> closed (terminal)
//
// Rules:
// - Only `ready` writes requests (nextOutgoing). `hello` writes only the hello; `draining`
//   writes nothing and waits for the replies it is owed; `disconnected` queues.
// - Every request gets an integer id, unique for the client's lifetime. On connectionLost the
//   pending requests are sorted by kind: APPEND ops (send, edit, delete, react) are written
//   again on the next connection with the same `cid` (the origin deduplicates: the caller gets
//   the first write's seq, and no second event exists); RETRY ops (reads, idempotent writes)
//   are written again as they are; ONCE ops that had been written fail with `unavailable`
//   (they may or may not have taken effect). An `unsubscribe` is answered locally.
// - Subscriptions: subs[room] is the last seq handed to the application, set from a subscribe
//   ok (to that request's `after`: the ok precedes the restarted stream) and advanced by each
//   delivered seq event. Seq events of other rooms, or at or below it, are dropped: a stream
//   restarted by a resume may repeat what the application already has.
// - After each hello ok every subscribed room is subscribed again with `after` = its last seq,
//   before any other queued request is written (guarantee 2 of PROTOCOL.md: gap-free resume).

import { GB6Error, errorFromFrame } from './errors.js';

export const SEQ_TYPES = new Set(['message', 'edit', 'delete', 'react']);
export const APPEND_OPS = new Set(['send', 'edit', 'delete', 'react']);
export const RETRY_OPS = new Set([
  'ping', 'rooms', 'history', 'search', 'subscribe', 'unsubscribe', 'receipt', 'presence.set',
  'presence.get', 'room.reads',
]);
/** A local event (never sent by a server): a subscription that a resume could not restore. */
export const SUBSCRIPTION_LOST = 'client.subscription_lost';
export const DEFAULT_HEARTBEAT_MS = 30_000;
export const DEFAULT_MAX_FRAME_BYTES = 1 << 20;

/** @typedef {'append'|'retry'|'once'|'internal'} Kind */
/** @typedef {{id: number, op: string, kind: Kind, text: string, room: string|null, after: number, sent: boolean}} Pending */
/**
 * @typedef {{type: 'hello', user: {id: string, name: string}, session: string, heartbeatMs: number, answers: Output[]}
 *   | {type: 'hello_failed', error: GB6Error}
 *   | {type: 'reply', id: number, fields: Record<string, any>}
 *   | {type: 'failure', id: number, error: GB6Error}
 *   | {type: 'deliver', event: Record<string, any>, room: string|null, seq: number|null}
 *   | {type: 'drain'}} Output
 */

/** @param {string} op @returns {Kind} */
export function kindOf(op) {
  if (APPEND_OPS.has(op)) return 'append';
  if (RETRY_OPS.has(op)) return 'retry';
  return 'once';
}

/** A fresh client id for an append (`cid`): 32 hex digits. */
export function newCid() {
  const bytes = new Uint8Array(16);
  globalThis.crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

export class Core {
  /** @param {string} token @param {{maxFrameBytes?: number}} [opts] */
  constructor(token, opts = {}) {
    this._token = token;
    this._maxFrameBytes = opts.maxFrameBytes ?? DEFAULT_MAX_FRAME_BYTES;
    this._nextId = 0;
    /** @type {Map<number, Pending>} */
    this._pending = new Map();
    /** @type {number[]} ids to write on the current connection, in order */
    this._queue = [];
    /** @type {Map<string, number>} */
    this._subs = new Map();
    this._helloId = null;
    /** @type {GB6Error|null} */
    this._closedError = null;
    /** @type {'disconnected'|'hello'|'ready'|'draining'|'closed'} */
    this.phase = 'disconnected';
    this._encoder = new TextEncoder();
  }

  /** Subscribed rooms → the last seq delivered to the application. */
  get subscriptions() {
    return new Map(this._subs);
  }

  /** Application requests written on this connection whose reply has not arrived. */
  get owed() {
    let n = 0;
    for (const p of this._pending.values()) if (p.sent && p.kind !== 'internal') n++;
    return n;
  }

  // --- requests ---------------------------------------------------------------------------

  /**
   * Register an application request; returns its id. Throws GB6Error when it can never be
   * answered (client closed, frame too large, reserved op or field).
   * @param {string} op @param {Record<string, any>} fields @returns {number}
   */
  request(op, fields) {
    if (this._closedError) throw new GB6Error(this._closedError.code, this._closedError.message);
    if (op === 'hello') throw new GB6Error('invalid', 'hello is sent by the client itself');
    if ('id' in fields || 'op' in fields) {
      throw new GB6Error('invalid', "fields 'id' and 'op' are set by the client");
    }
    const kind = kindOf(op);
    const body = { ...fields };
    if (kind === 'append' && body.cid == null) body.cid = newCid();
    const pending = this._add(op, kind, body);
    if (op === 'subscribe') pending.after = Number.isInteger(body.after) ? body.after : 0;
    if (op === 'unsubscribe' && pending.room !== null) this._subs.delete(pending.room);
    if (this.phase === 'ready') this._queue.push(pending.id);
    return pending.id;
  }

  /** Queue a heartbeat ping (ready only; nobody waits for its reply). */
  ping() {
    if (this.phase === 'ready') this._queue.push(this._add('ping', 'internal', {}).id);
  }

  /** The caller stopped waiting: forget the request (a late reply is ignored). */
  cancel(id) {
    this._pending.delete(id);
  }

  /** The next frame to write on the current connection, or null. Marks it written. */
  nextOutgoing() {
    if (this.phase !== 'ready') return null;
    while (this._queue.length) {
      const p = this._pending.get(this._queue.shift());
      if (p && !p.sent) {
        p.sent = true;
        return p.text;
      }
    }
    return null;
  }

  _add(op, kind, fields) {
    const id = ++this._nextId;
    const text = JSON.stringify({ op, id, ...fields });
    if (this._encoder.encode(text).length > this._maxFrameBytes) {
      this._nextId--;
      throw new GB6Error('too_large', `request over ${this._maxFrameBytes} bytes`);
    }
    const room = typeof fields.room === 'string' ? fields.room : null;
    /** @type {Pending} */
    const pending = { id, op, kind, text, room, after: 0, sent: false };
    this._pending.set(id, pending);
    return pending;
  }

  // --- connection transitions -------------------------------------------------------------

  /** A new connection is open: returns the hello frame to write first. */
  connectionMade() {
    if (this.phase !== 'disconnected') throw new Error(`connectionMade in phase ${this.phase}`);
    this._helloId = ++this._nextId;
    this.phase = 'hello';
    return JSON.stringify({ op: 'hello', id: this._helloId, token: this._token });
  }

  /** @returns {Output[]} */
  _ready() {
    this.phase = 'ready';
    this._queue = [];
    /** @type {Output[]} */
    const out = [];
    const waiting = [...this._pending.values()];
    const ownSubscribe = new Set(
      waiting.filter((p) => p.op === 'subscribe' && p.kind === 'retry').map((p) => p.room),
    );
    for (const [room, last] of this._subs) {
      if (ownSubscribe.has(room)) continue; // the application's own subscribe restores it
      const sub = this._add('subscribe', 'internal', { room, after: last });
      sub.after = last;
      this._queue.push(sub.id);
    }
    for (const p of waiting) {
      if (p.op === 'unsubscribe') {
        out.push({ type: 'reply', id: p.id, fields: {} });
        this._pending.delete(p.id);
      } else if (!p.sent) {
        this._queue.push(p.id);
      }
    }
    return out;
  }

  /** The current connection is gone. @returns {Output[]} the failures and local answers */
  connectionLost() {
    if (this.phase === 'closed') return [];
    this.phase = 'disconnected';
    this._helloId = null;
    this._queue = [];
    /** @type {Output[]} */
    const out = [];
    for (const p of [...this._pending.values()]) {
      if (p.kind === 'internal') {
        this._pending.delete(p.id);
      } else if (p.op === 'unsubscribe') {
        out.push({ type: 'reply', id: p.id, fields: {} });
        this._pending.delete(p.id);
      } else if (p.sent && p.kind === 'once') {
        const msg = `connection lost during ${p.op}; it may or may not have taken effect`;
        out.push({ type: 'failure', id: p.id, error: new GB6Error('unavailable', msg) });
        this._pending.delete(p.id);
      } else {
        p.sent = false;
      }
    }
    return out;
  }

  /** Terminal: every pending and future request fails with `error`. @returns {Output[]} */
  close(error) {
    this.phase = 'closed';
    this._closedError = error;
    this._queue = [];
    /** @type {Output[]} */
    const out = [];
    for (const p of this._pending.values()) {
      if (p.kind !== 'internal') {
        out.push({ type: 'failure', id: p.id, error: new GB6Error(error.code, error.message) });
      }
    }
    this._pending.clear();
    return out;
  }

  // --- frames in --------------------------------------------------------------------------

  /** One frame from the server → at most one output. @param {string} text @returns {Output|null} */
  receive(text) {
    let frame;
    try {
      frame = JSON.parse(text);
    } catch {
      return null;
    }
    if (frame === null || typeof frame !== 'object' || Array.isArray(frame)) return null;
    if (this.phase === 'hello') return this._receiveHello(frame);
    if (frame.op === 'ok' || frame.op === 'error') return this._receiveReply(frame, frame.op === 'ok');
    if (frame.op === 'event') return this._receiveEvent(frame);
    return null;
  }

  _receiveHello(frame) {
    if (frame.re !== this._helloId || (frame.op !== 'ok' && frame.op !== 'error')) return null;
    if (frame.op === 'error') return { type: 'hello_failed', error: errorFromFrame(frame) };
    const user = frame.user;
    if (!user || typeof user.id !== 'string') {
      return { type: 'hello_failed', error: new GB6Error('internal', 'hello ok without a user') };
    }
    const hb = Number.isInteger(frame.heartbeat_ms) && frame.heartbeat_ms > 0
      ? frame.heartbeat_ms : DEFAULT_HEARTBEAT_MS;
    return {
      type: 'hello',
      user: { id: user.id, name: String(user.name ?? '') },
      session: typeof frame.session === 'string' ? frame.session : '',
      heartbeatMs: hb,
      answers: this._ready(),
    };
  }

  _receiveReply(frame, ok) {
    const re = frame.re;
    if (!Number.isInteger(re)) return null;
    const p = this._pending.get(re);
    if (!p) return null; // cancelled by its caller, or an internal request already forgotten
    if (!ok && this.phase === 'draining' && frame.code === 'unavailable' && p.kind !== 'once') {
      // A draining edge refused it without acting on it: write it again on the next connection.
      if (p.kind === 'internal') this._pending.delete(re);
      else p.sent = false;
      return null;
    }
    this._pending.delete(re);
    if (p.kind === 'internal') {
      if (p.op === 'subscribe' && !ok) return this._subscriptionLost(p, errorFromFrame(frame));
      return null;
    }
    if (!ok) return { type: 'failure', id: re, error: errorFromFrame(frame) };
    if (p.op === 'subscribe' && p.room !== null) this._subs.set(p.room, p.after);
    const fields = { ...frame };
    delete fields.op;
    delete fields.re;
    return { type: 'reply', id: re, fields };
  }

  _subscriptionLost(p, err) {
    if (p.room === null || !this._subs.delete(p.room)) return null;
    const event = {
      op: 'event', type: SUBSCRIPTION_LOST, room: p.room, after: p.after, code: err.code,
      message: err.message,
    };
    return { type: 'deliver', event, room: p.room, seq: null };
  }

  _receiveEvent(frame) {
    const type = frame.type;
    if (type === 'reconnect') {
      if (this.phase === 'ready') this.phase = 'draining';
      return { type: 'drain' };
    }
    const room = typeof frame.room === 'string' ? frame.room : null;
    if (SEQ_TYPES.has(type)) {
      if (room === null || !Number.isInteger(frame.seq)) return null;
      const last = this._subs.get(room);
      if (last === undefined || frame.seq <= last) return null; // not subscribed, or seen
      return { type: 'deliver', event: frame, room, seq: frame.seq };
    }
    return { type: 'deliver', event: frame, room, seq: null };
  }

  /** The application has the event of `output`: a resume starts after it. */
  delivered(output) {
    if (output.room === null || output.seq === null) return;
    const last = this._subs.get(output.room);
    if (last !== undefined && output.seq > last) this._subs.set(output.room, output.seq);
  }
}
