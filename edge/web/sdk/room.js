// A room as a view model: its events folded into messages (edits, deletes, reactions applied),
// history paging, pending sends, receipts and typing. No DOM: a UI renders `messages()` on
// every 'change'.
//
// Rules:
// - Events are kept by seq, so the state is the same however often an event arrives (history
//   pages and the live stream overlap) and whatever order pages load in; `messages()` is
//   always in seq order. The loaded range is contiguous: the newest page from `history`, older
//   pages below it (`loadOlder`), live events above it from the client's subscription (which
//   resumes gap-free across reconnects).
// - `open()` listens first, then loads the newest page, then subscribes after it unless the
//   client is already subscribed to the room (the stream then continues from where it is).
// - A send shows at once as `pending` (keyed by its cid) and turns into the message when the
//   room's own event with that cid arrives; the cid makes a retry idempotent.
// - `readers` (user → read seq) starts from `room.reads` when the room opens and then follows
//   receipt events (each only moves a reader forward); a typing user is shown for `typingMs` after their last signal or until their next message.
// - At most `maxEvents` events are kept; older ones are dropped from memory (loadOlder brings
//   them back).

import { Emitter, newCid } from './client.js';
import { SEQ_TYPES } from './core.js';
import { GB6Error } from './errors.js';

/**
 * @typedef {{seq: number, ts: number, sender: string, cid: string, text: string,
 *   body: Record<string, any>|null, edited: number|null, deleted: boolean,
 *   reactions: Map<string, Set<string>>, thread: number|null, pending: boolean,
 *   failed: GB6Error|null}} MessageView
 */

export class Room extends Emitter {
  /**
   * @param {import('./client.js').Client} client
   * @param {{id: string, name?: string, kind?: string}} info
   * @param {{pageSize?: number, typingMs?: number, maxEvents?: number}} [opts]
   */
  constructor(client, info, opts = {}) {
    super();
    this.client = client;
    this.id = info.id;
    this.info = info;
    this.pageSize = opts.pageSize ?? 50;
    this.typingMs = opts.typingMs ?? 5_000;
    this.maxEvents = opts.maxEvents ?? 5_000;
    /** @type {Map<number, Record<string, any>>} */
    this.events = new Map();
    /** @type {Map<string, {text: string, ts: number, failed: GB6Error|null}>} */
    this.pending = new Map();
    /** @type {Map<string, number>} user → read seq */
    this.readers = new Map();
    /** @type {Map<string, any>} user → timer */
    this._typing = new Map();
    this.oldest = 0; // lowest seq loaded (0: none)
    this.newest = 0;
    this._off = [];
  }

  /** Start: listen, load the newest page, subscribe. */
  async open() {
    this._off.push(this.client.on('event', (ev) => this._onEvent(ev)));
    this._off.push(this.client.on('ready', () => this.emit('change')));
    const page = await this.client.history(this.id, { limit: this.pageSize });
    this._addAll(page);
    if (page.length === 0) this.oldest = 1;
    if (!this.client.subscriptions.has(this.id)) {
      await this.client.subscribe(this.id, this.newest);
    }
    // Who has read what so far; receipts that arrive meanwhile are kept (the larger wins).
    const reads = await this.client.roomReads(this.id).catch(() => null);
    for (const [user, read] of Object.entries(reads ?? {})) {
      this.readers.set(user, Math.max(read, this.readers.get(user) ?? 0));
    }
    this.emit('change');
  }

  /** Stop listening (the subscription stays: the app may count unread events with it). */
  close() {
    for (const off of this._off) off();
    this._off = [];
    for (const t of this._typing.values()) clearTimeout(t);
    this._typing.clear();
  }

  get hasOlder() {
    return this.oldest > 1;
  }

  /** Load the page below the oldest loaded event. Resolves to whether older ones remain. */
  async loadOlder() {
    if (!this.hasOlder) return false;
    const page = await this.client.history(this.id, { before: this.oldest, limit: this.pageSize });
    this._addAll(page);
    if (page.length === 0) this.oldest = 1;
    this.emit('change');
    return this.hasOlder;
  }

  _addAll(events) {
    for (const ev of events) this._add(ev);
  }

  _add(ev) {
    if (!Number.isInteger(ev.seq)) return;
    this.events.set(ev.seq, ev);
    if (this.oldest === 0 || ev.seq < this.oldest) this.oldest = ev.seq;
    if (ev.seq > this.newest) this.newest = ev.seq;
    if (ev.type === 'message' && ev.sender === this.client.user?.id) this.pending.delete(ev.cid);
    if (ev.type === 'message') this._stopTyping(ev.sender);
    if (this.events.size > this.maxEvents) {
      const drop = [...this.events.keys()].sort((a, b) => a - b).slice(0, this.events.size - this.maxEvents);
      for (const seq of drop) this.events.delete(seq);
      this.oldest = drop[drop.length - 1] + 1;
    }
  }

  _onEvent(ev) {
    if (ev.room !== this.id) return;
    if (SEQ_TYPES.has(ev.type)) this._add(ev);
    else if (ev.type === 'receipt') this.readers.set(ev.user, Math.max(ev.read, this.readers.get(ev.user) ?? 0));
    else if (ev.type === 'typing') this._startTyping(ev.user);
    else if (ev.type !== 'members') return;
    this.emit(ev.type, ev);
    this.emit('change');
  }

  _startTyping(user) {
    clearTimeout(this._typing.get(user));
    this._typing.set(user, setTimeout(() => { this._stopTyping(user); this.emit('change'); }, this.typingMs));
  }

  _stopTyping(user) {
    if (!this._typing.has(user)) return;
    clearTimeout(this._typing.get(user));
    this._typing.delete(user);
  }

  /** Users typing now (not the caller). @returns {string[]} */
  typingUsers() {
    return [...this._typing.keys()].filter((u) => u !== this.client.user?.id);
  }

  /** The loaded messages, oldest first, with edits, deletes and reactions applied; then the
   * pending sends. @returns {MessageView[]} */
  messages() {
    const seqs = [...this.events.keys()].sort((a, b) => a - b);
    /** @type {Map<number, MessageView>} */
    const views = new Map();
    for (const seq of seqs) {
      const ev = this.events.get(seq);
      if (ev.type === 'message') {
        views.set(seq, {
          seq, ts: ev.ts, sender: ev.sender, cid: ev.cid, body: ev.body ?? null,
          text: ev.body?.text ?? '', edited: null, deleted: !!ev.deleted,
          reactions: new Map(), thread: ev.thread ?? null, pending: false, failed: null,
        });
        continue;
      }
      const m = views.get(ev.target);
      if (!m) continue; // its message is not loaded (yet)
      if (ev.type === 'edit' && !m.deleted && ev.body) {
        m.edited = seq;
        m.body = ev.body;
        m.text = ev.body.text ?? '';
      } else if (ev.type === 'delete') {
        m.deleted = true;
      } else if (ev.type === 'react') {
        if (!m.reactions.has(ev.emoji)) m.reactions.set(ev.emoji, new Set());
        m.reactions.get(ev.emoji).add(ev.sender);
      }
    }
    for (const m of views.values()) {
      if (m.deleted) {
        m.body = null;
        m.text = '';
      }
    }
    const out = [...views.values()];
    for (const [cid, p] of this.pending) {
      out.push({
        seq: 0, ts: p.ts, sender: this.client.user?.id ?? '', cid, text: p.text, body: { text: p.text },
        edited: null, deleted: false, reactions: new Map(), thread: null, pending: true, failed: p.failed,
      });
    }
    return out;
  }

  /**
   * Send a text (or a body object with `text`); shown as pending until its event arrives.
   * @param {string|Record<string, any>} body @returns {Promise<import('./client.js').Ack>}
   */
  async send(body, o = {}) {
    const cid = o.cid ?? newCid();
    const b = typeof body === 'string' ? { text: body } : body;
    this.pending.set(cid, { text: String(b.text ?? ''), ts: Date.now(), failed: null });
    this.emit('change');
    try {
      const ack = await this.client.send(this.id, b, { cid, thread: o.thread });
      if (this.events.has(ack.seq)) this.pending.delete(cid);
      return ack;
    } catch (err) {
      const p = this.pending.get(cid);
      if (p) p.failed = err;
      this.emit('change');
      throw err;
    }
  }

  edit(seq, text) { return this.client.edit(this.id, seq, { text }); }
  delete(seq) { return this.client.delete(this.id, seq); }
  react(seq, emoji) { return this.client.react(this.id, seq, emoji); }
  typing() { return this.client.typing(this.id); }

  /** Tell the server the caller has read up to `seq` (default: the newest loaded). */
  async markRead(seq = this.newest) {
    if (seq <= 0 || seq <= (this._readSent ?? 0)) return;
    this._readSent = seq;
    await this.client.receipt(this.id, seq);
  }

  /** Users other than the caller whose receipt reached `seq`. @returns {string[]} */
  readBy(seq) {
    const me = this.client.user?.id;
    return [...this.readers].filter(([u, r]) => u !== me && r >= seq).map(([u]) => u);
  }
}
