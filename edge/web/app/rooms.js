// The signed-in user's rooms with unread counts, kept current.
//
// Rules: the list comes from the `rooms` request (each with `head` and `read`), loaded at start,
// after every (re)connect (changes made while away are not replayed) and on demand; between
// those, `room.added` / `room.removed` events (sent to each of the user's connections) add and
// drop rooms as they happen: no polling. Every listed room is subscribed after its head (at most MAX_SUBSCRIBED), so
// new events move `head` live; unread = head − read, the room's seq events since the user's
// last receipt.

import { Emitter } from '/sdk/index.js';

const MAX_SUBSCRIBED = 500; // the server allows 1,000 subscriptions per connection

export class RoomList extends Emitter {
  /** @param {import('/sdk/index.js').Client} client */
  constructor(client) {
    super();
    this.client = client;
    /** @type {Map<string, {id: string, name: string, kind: string, open: boolean, head: number, read: number}>} */
    this.rooms = new Map();
    this._offs = [
      client.on('event', (ev) => this._onEvent(ev)),
      client.on('ready', () => this.refresh().catch(() => {})),
    ];
  }

  stop() {
    for (const off of this._offs) off();
  }

  get(id) {
    return this.rooms.get(id);
  }

  /** Rooms sorted by name. */
  list() {
    return [...this.rooms.values()].sort((a, b) => a.name.localeCompare(b.name) || a.id.localeCompare(b.id));
  }

  unread(id) {
    const r = this.rooms.get(id);
    return r ? Math.max(0, r.head - r.read) : 0;
  }

  async refresh() {
    const rooms = await this.client.rooms();
    const seen = new Set();
    for (const r of rooms) {
      seen.add(r.id);
      const known = this.rooms.get(r.id);
      this.rooms.set(r.id, {
        ...r,
        head: Math.max(r.head ?? 0, known?.head ?? 0),
        read: Math.max(r.read ?? 0, known?.read ?? 0),
      });
    }
    for (const id of [...this.rooms.keys()]) if (!seen.has(id)) this.rooms.delete(id);
    this.emit('change');
    const subs = this.client.subscriptions;
    let n = subs.size;
    for (const r of this.rooms.values()) {
      if (subs.has(r.id) || n >= MAX_SUBSCRIBED) continue;
      n++;
      this.client.subscribe(r.id, r.head).catch(() => {});
    }
  }

  /** A room the user just created or joined. */
  upsert(room) {
    const known = this.rooms.get(room.id);
    this.rooms.set(room.id, { head: 0, read: 0, ...known, ...room });
    this.emit('change');
    this.refresh().catch(() => {});
  }

  remove(id) {
    this.rooms.delete(id);
    this.client.unsubscribe(id).catch(() => {});
    this.emit('change');
  }

  /** The user has read `room` up to `seq`. */
  markRead(id, seq) {
    const r = this.rooms.get(id);
    if (r && seq > r.read) {
      r.read = seq;
      this.emit('change');
    }
  }

  _onEvent(ev) {
    if (ev.type === 'room.added' && ev.room?.id) {
      const known = this.rooms.get(ev.room.id);
      this.rooms.set(ev.room.id, {
        ...ev.room,
        head: Math.max(ev.room.head ?? 0, known?.head ?? 0),
        read: Math.max(ev.room.read ?? 0, known?.read ?? 0),
      });
      this.emit('change');
      if (!this.client.subscriptions.has(ev.room.id) && this.client.subscriptions.size < MAX_SUBSCRIBED) {
        this.client.subscribe(ev.room.id, this.rooms.get(ev.room.id).head).catch(() => {});
      }
      return;
    }
    if (ev.type === 'room.removed' && ev.room?.id) {
      // The server ended the subscription already; forget it here too.
      if (this.rooms.delete(ev.room.id)) this.emit('change');
      if (this.client.subscriptions.has(ev.room.id)) this.client.unsubscribe(ev.room.id).catch(() => {});
      return;
    }
    const r = this.rooms.get(ev.room);
    if (!r || !Number.isInteger(ev.seq)) return;
    if (ev.seq > r.head) {
      r.head = ev.seq;
      // The user's own events need no reading.
      if (ev.sender === this.client.user?.id && r.read === ev.seq - 1) r.read = ev.seq;
      this.emit('change');
    }
  }
}
