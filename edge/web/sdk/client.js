// The GB6 browser client: one session that survives reconnects, with a promise per request.
//
//   import { connect } from '/sdk/index.js';
//   const client = await connect({ token });            // learns the WebSocket from /v1/config
//   client.on('message', (ev) => ...);                  // or 'event' for every event
//   const { room } = await client.createRoom('general', { members: [otherUserId] });
//   await client.subscribe(room.id, 0);
//   const ack = await client.send(room.id, 'hello');    // {room, seq, ts, cid}
//
// Requests resolve with the `ok` frame's fields (without `op`/`re`) and reject with a
// GB6Error whose `code` is the protocol's error code.
//
// Reconnect and resume: a connection that ends for any reason but close 4003 (unauthorized)
// or 4001 (bad handshake), both terminal, is replaced after a jittered backoff (transport.js);
// a `reconnect` event (the edge is draining) makes the client stop writing, wait for the
// replies it is owed (at most `drainTimeoutMs`) and move at once. After each hello every
// subscribed room is subscribed again after the last seq the application got, and seq events
// at or below it are dropped: the application sees each event of a subscribed room once, in seq
// order (guarantee 2). Unanswered send/edit/delete/react are written again with the same `cid`
// (the caller gets the first write's seq; no duplicate exists); reads and idempotent writes are
// retried; anything else that was written when the connection was lost (room.create/join/leave/
// add/remove, typing) rejects with `unavailable`: it may or may not have happened. Requests
// made while disconnected wait for the next connection (bound them with `timeoutMs`).
//
// Events the client emits besides the server's event types: 'event' (every server event),
// 'status' ({status: 'connecting'|'ready'|'reconnecting'|'closed', error?}), 'ready'
// ({user, session}) after each hello, and SUBSCRIPTION_LOST.

import { CLOSE_BAD_HANDSHAKE, CLOSE_DRAINING, CLOSE_UNAUTHORIZED, GB6Error } from './errors.js';
import { Core, SUBSCRIPTION_LOST, newCid } from './core.js';
import { Transport } from './transport.js';
import { downloadFile, uploadFile } from './files.js';

const FATAL_HELLO = new Set(['unauthorized', 'invalid', 'forbidden']);
const MAX_BUFFERED = 4 << 20; // socket bytes not yet sent before writes wait

/** @typedef {{id: string, name: string, kind: string, open: boolean, head?: number, read?: number}} RoomInfo */
/** @typedef {{room: string, seq: number, ts: number, cid: string}} Ack */
/** @typedef {string|Record<string, any>} Body a text, or a body object with `text` */

/** A minimal event emitter: `on(type, fn)` returns the function that removes the listener. */
export class Emitter {
  constructor() {
    /** @type {Map<string, Set<Function>>} */
    this._listeners = new Map();
  }

  /** @param {string} type @param {(detail: any) => void} fn @returns {() => void} */
  on(type, fn) {
    if (!this._listeners.has(type)) this._listeners.set(type, new Set());
    this._listeners.get(type).add(fn);
    return () => this._listeners.get(type)?.delete(fn);
  }

  emit(type, detail) {
    for (const fn of [...(this._listeners.get(type) ?? [])]) {
      try {
        fn(detail);
      } catch (err) {
        console.error(`gb6: a '${type}' listener threw`, err);
      }
    }
  }
}

function bodyOf(body) {
  return typeof body === 'string' ? { text: body } : body;
}

export class Client extends Emitter {
  /**
   * @param {{url: string|(() => Promise<string>|string), token: string, http?: string|null,
   *   drainTimeoutMs?: number, helloTimeoutMs?: number, backoff?: {initialMs?: number, maxMs?: number}}} opts
   *   `http`: the base URL of the files API ('' = the page's origin, null = none here).
   */
  constructor(opts) {
    super();
    this.token = opts.token;
    this.http = opts.http ?? '';
    this.drainTimeoutMs = opts.drainTimeoutMs ?? 5_000;
    this.helloTimeoutMs = opts.helloTimeoutMs ?? 10_000; // an open socket that never answers
    /** @type {{id: string, name: string}|null} */
    this.user = null;
    this.session = '';
    /** @type {'connecting'|'ready'|'reconnecting'|'closed'} */
    this.status = 'connecting';
    /** @type {GB6Error|null} the terminal error, once closed */
    this.error = null;
    this._core = new Core(opts.token);
    /** @type {Map<number, {resolve: Function, reject: Function, timer: any}>} */
    this._waiters = new Map();
    const url = typeof opts.url === 'function' ? opts.url : () => opts.url;
    this._transport = new Transport(
      url,
      {
        onOpen: () => this._onOpen(),
        onText: (text) => this._onText(text),
        onClose: (code, reason) => this._onClose(code, reason),
      },
      opts.backoff,
    );
    this._draining = null;
    this._first = null;
  }

  /** Connect and complete the first hello. Rejects (and closes) when the token is refused. */
  connect() {
    if (!this._first) {
      this._first = new Promise((resolve, reject) => {
        const offReady = this.on('ready', (d) => { offReady(); offClosed(); resolve(d); });
        const offClosed = this.on('status', (s) => {
          if (s.status === 'closed') { offReady(); offClosed(); reject(s.error); }
        });
      });
      this._transport.start();
    }
    return this._first;
  }

  /** Subscribed rooms → the last seq delivered to the application. */
  get subscriptions() {
    return this._core.subscriptions;
  }

  // --- requests ---------------------------------------------------------------------------

  /**
   * Any request: resolves with the `ok` fields, rejects with GB6Error.
   * @param {string} op @param {Record<string, any>} [fields]
   * @param {{timeoutMs?: number}} [opts] give up waiting after `timeoutMs` (`unavailable`)
   * @returns {Promise<Record<string, any>>}
   */
  request(op, fields = {}, opts = {}) {
    let id;
    try {
      id = this._core.request(op, fields);
    } catch (err) {
      return Promise.reject(err);
    }
    const promise = new Promise((resolve, reject) => {
      let timer = null;
      if (opts.timeoutMs != null) {
        timer = setTimeout(() => {
          this._core.cancel(id);
          this._waiters.delete(id);
          reject(new GB6Error('unavailable', `no answer to ${op} within ${opts.timeoutMs} ms`));
        }, opts.timeoutMs);
      }
      this._waiters.set(id, { resolve, reject, timer });
    });
    this._flush();
    return promise;
  }

  /** @returns {Promise<RoomInfo[]>} the caller's rooms with `head` and `read` */
  async rooms() {
    return (await this.request('rooms')).rooms;
  }

  /**
   * @param {string} name @param {{kind?: string, members?: string[], open?: boolean}} [o]
   * @returns {Promise<RoomInfo>}
   */
  async createRoom(name, o = {}) {
    const fields = { name, kind: o.kind ?? 'chat', members: o.members ?? [] };
    if (o.open !== undefined) fields.open = o.open;
    return (await this.request('room.create', fields)).room;
  }

  async joinRoom(room) { return (await this.request('room.join', { room })).room; }
  /** @returns {Promise<Record<string, number>>} every member's read seq (members only) */
  async roomReads(room) { return (await this.request('room.reads', { room })).reads; }
  async leaveRoom(room) { return (await this.request('room.leave', { room })).room; }
  async addMembers(room, users) { return (await this.request('room.add', { room, users })).room; }
  async removeMembers(room, users) { return (await this.request('room.remove', { room, users })).room; }

  /**
   * Receive the room's events with seq > `after`, then live ones (in order, each once, across
   * reconnects). @returns {Promise<{room: string, head: number}>}
   */
  subscribe(room, after = 0) { return this.request('subscribe', { room, after }); }
  unsubscribe(room) { return this.request('unsubscribe', { room }); }

  /**
   * @param {string} room @param {Body} body
   * @param {{cid?: string, thread?: number}} [o] `cid`: reuse one to make a retry idempotent
   * @returns {Promise<Ack>}
   */
  async send(room, body, o = {}) {
    const fields = { room, body: bodyOf(body) };
    fields.cid = o.cid ?? newCid();
    if (o.thread != null) fields.thread = o.thread;
    return this._ack(await this.request('send', fields), fields);
  }

  async edit(room, target, body, o = {}) {
    const fields = { room, target, body: bodyOf(body) };
    fields.cid = o.cid ?? newCid();
    return this._ack(await this.request('edit', fields), fields);
  }

  async delete(room, target, o = {}) {
    const fields = { room, target };
    fields.cid = o.cid ?? newCid();
    return this._ack(await this.request('delete', fields), fields);
  }

  async react(room, target, emoji, o = {}) {
    const fields = { room, target, emoji };
    fields.cid = o.cid ?? newCid();
    return this._ack(await this.request('react', fields), fields);
  }

  _ack(ok, fields) {
    return { room: ok.room, seq: ok.seq, ts: ok.ts, cid: ok.cid ?? fields.cid };
  }

  /**
   * The room's events (messages, edits, deletes, reactions), oldest first: the newest `limit`,
   * or the `limit` just below `before`. @returns {Promise<Record<string, any>[]>}
   */
  async history(room, o = {}) {
    const fields = { room };
    if (o.before != null) fields.before = o.before;
    if (o.limit != null) fields.limit = o.limit;
    return (await this.request('history', fields)).messages;
  }

  receipt(room, read) { return this.request('receipt', { room, read }); }
  typing(room) { return this.request('typing', { room }); }

  async search(query, o = {}) {
    const fields = { query };
    if (o.room) fields.room = o.room;
    return (await this.request('search', fields)).hits;
  }

  setPresence(status) { return this.request('presence.set', { status }); }
  async getPresence(users) { return (await this.request('presence.get', { users })).presence; }

  /** Upload into `room` over HTTP. @returns {Promise<{id: string, size: number, type: string}>} */
  uploadFile(room, data, type) {
    if (this.http === null) return Promise.reject(new GB6Error('unavailable', 'no files API here'));
    return uploadFile(this.http, this.token, room, data, type);
  }

  /** @returns {Promise<Blob>} */
  downloadFile(fileId) {
    if (this.http === null) return Promise.reject(new GB6Error('unavailable', 'no files API here'));
    return downloadFile(this.http, this.token, fileId);
  }

  /** Close for good: pending and later requests reject with `unavailable`. */
  close() {
    this._terminal(new GB6Error('unavailable', 'client closed'));
  }

  /** Drop the current connection as if the network had failed (tests, diagnostics). */
  dropConnection() {
    this._transport.drop(4000, 'dropped by the application');
  }

  // --- the connection ---------------------------------------------------------------------

  _setStatus(status, error = null) {
    this.status = status;
    this.emit('status', { status, error });
  }

  _onOpen() {
    if (this._core.phase === 'closed') return;
    this._transport.send(this._core.connectionMade());
    clearTimeout(this._helloTimer);
    this._helloTimer = setTimeout(() => {
      if (this._core.phase === 'hello') this._transport.drop(4000, 'no answer to hello');
    }, this.helloTimeoutMs);
  }

  _onText(text) {
    const out = this._core.receive(text);
    if (out) this._handle(out);
    this._flush();
  }

  _handle(out) {
    switch (out.type) {
      case 'hello':
        clearTimeout(this._helloTimer);
        this.user = out.user;
        this.session = out.session;
        this._transport.resetBackoff();
        this._transport.heartbeat(out.heartbeatMs, () => {
          this._core.ping();
          this._flush();
        });
        for (const a of out.answers) this._handle(a);
        this._setStatus('ready');
        this.emit('ready', { user: out.user, session: out.session });
        break;
      case 'hello_failed':
        if (FATAL_HELLO.has(out.error.code)) this._terminal(out.error);
        else {
          this._retryAfter = out.error.retryAfterMs;
          this._transport.drop(1000, 'hello failed');
        }
        break;
      case 'reply':
      case 'failure': {
        const w = this._waiters.get(out.id);
        if (!w) break;
        this._waiters.delete(out.id);
        clearTimeout(w.timer);
        if (out.type === 'reply') w.resolve(out.fields);
        else w.reject(out.error);
        if (this._draining && this._core.owed === 0) this._draining();
        break;
      }
      case 'deliver':
        this.emit('event', out.event);
        this.emit(out.event.type, out.event);
        this._core.delivered(out);
        break;
      case 'drain':
        this._drain();
        break;
      default:
        break;
    }
  }

  _drain() {
    if (this._draining) return;
    const done = () => {
      clearTimeout(timer);
      this._draining = null;
      this._transport.drop(CLOSE_DRAINING, 'draining');
    };
    const timer = setTimeout(done, this.drainTimeoutMs);
    this._draining = done;
    if (this._core.owed === 0) done();
  }

  _onClose(code, reason) {
    clearTimeout(this._helloTimer);
    if (this._draining) {
      this._draining = null;
    }
    if (this._core.phase === 'closed') return;
    if (code === CLOSE_UNAUTHORIZED) {
      this._terminal(new GB6Error('unauthorized', reason || 'unauthorized'));
      return;
    }
    if (code === CLOSE_BAD_HANDSHAKE) {
      this._terminal(new GB6Error('invalid', reason || 'bad handshake'));
      return;
    }
    for (const out of this._core.connectionLost()) this._handle(out);
    this._setStatus('reconnecting');
    const delay = code === CLOSE_DRAINING ? 0 : this._transport.backoff(this._retryAfter);
    this._retryAfter = null;
    this._transport.reconnect(delay);
  }

  _terminal(error) {
    if (this._core.phase === 'closed') return;
    clearTimeout(this._helloTimer);
    this.error = error;
    for (const out of this._core.close(error)) this._handle(out);
    this._transport.stop();
    this._setStatus('closed', error);
  }

  _flush() {
    if (!this._transport.open) return;
    while (this._transport.buffered < MAX_BUFFERED) {
      const text = this._core.nextOutgoing();
      if (text === null) return;
      this._transport.send(text);
    }
    setTimeout(() => this._flush(), 50); // the socket is backed up: write the rest later
  }
}

export { SUBSCRIPTION_LOST, newCid };
