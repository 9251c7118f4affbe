// Media in the browser: join a meeting or live room's media through the client WebSocket
// (the `media.*` ops of docs/protocol.md, "Media"), publish camera, microphone and screen,
// receive the others' tracks, mute, leave.
//
//   import { MediaSession } from '/sdk/media.js';          // with a Client from /sdk/index.js
//   const media = new MediaSession(client, roomId);
//   media.on('track', ({ info, track, stream }) => video.srcObject = stream);   // remote tracks
//   media.on('track_removed', ({ id }) => ...);
//   await media.join();                       // → {participant, role, participants, tracks,
//                                             //    recording}
//   const cam = await media.publishCamera();  // {id, track, source}; also publishMicrophone(),
//   await media.mute(cam.id, true);           //   publishScreen(), publish(track, source)
//   await media.leave();
//
// Rules: one RTCPeerConnection per session (BUNDLE), negotiations one at a time (a queue): the
// browser offers for what it publishes (`media.offer`), and answers the SFU's offers, which
// come in the `ok` of `media.subscribe`/`unsubscribe`/`renegotiate` (the SFU never offers on
// its own, so offers never collide). With `autoSubscribe` (the default) every track published
// in the room is received as soon as it is announced; an unpublished track is dropped at once
// and the connection renegotiated. ICE: the configured servers only (none by default), host
// candidates gathered before the offer goes out, later ones trickled (`media.ice`). Events:
// 'joined', 'participant_joined', 'participant_left', 'track', 'track_removed', 'track_muted',
// 'speakers', 'quality', 'viewers', 'recording', 'role', 'state' ({state}), 'change' (after
// any of them), 'error' (a background negotiation failed: {error}).
//
// Resume: the server ends a participant when its socket closes, so when the client
// reconnects (status 'reconnecting' then 'ready') the session joins again by itself: state
// 'reconnecting' meanwhile (received tracks removed, the local ones kept), then a new
// participant on a new RTCPeerConnection that republishes the same local tracks (each `pub`
// object keeps its identity and gets the new track id; mutes are applied again) and receives
// what is published ('joined' again). Only a client that closes for good ends the session.
// A live room's host un-named as co-host (`role` viewer) stops sending its tracks.

import { Emitter } from './client.js';
import { GB6Error } from './errors.js';

const GATHER_WAIT_MS = 1_500; // how long an offer waits for host candidates before trickling

/** A map of mid → msid track id from a session description (the SFU names tracks this way). */
export function tracksByMid(sdp) {
  const out = new Map();
  let mid = null;
  for (const line of sdp.split(/\r?\n/)) {
    if (line.startsWith('m=')) mid = null;
    else if (line.startsWith('a=mid:')) mid = line.slice(6).trim();
    else if (line.startsWith('a=msid:') && mid !== null) {
      const parts = line.slice(7).trim().split(/\s+/);
      out.set(mid, { participant: parts[0], track: parts[1] ?? parts[0] });
    }
  }
  return out;
}

export class MediaSession extends Emitter {
  /**
   * @param {import('./client.js').Client} client a connected client
   * @param {string} room a meeting or live room the user is a member of
   * @param {{iceServers?: RTCIceServer[], autoSubscribe?: boolean}} [opts]
   */
  constructor(client, room, opts = {}) {
    super();
    this.client = client;
    this.room = room;
    this.autoSubscribe = opts.autoSubscribe ?? true;
    this.iceServers = opts.iceServers ?? [];
    this.participant = null;
    this.role = null;
    this.state = 'new';
    this.viewers = null;
    this.recording = null;
    /** participant id → {participant, user} */
    this.participants = new Map();
    /** published track id → the track's info (every publisher's, ours included) */
    this.published = new Map();
    /** received track id → {info, track, stream, mid} */
    this.remote = new Map();
    /** our track id → {id, track, source, sender} */
    this.local = new Map();
    this.speakers = [];
    this.quality = new Map();
    this._pc = null;
    this._queue = Promise.resolve();
    this._mids = new Map();
    this._off = [];
    this._closed = false;
    this._suspended = false;
  }

  get pc() { return this._pc; }

  /** Join the room's media; receives what is published already (with autoSubscribe). */
  async join() {
    this._pc = this._newPc();
    this._off.push(this.client.on('event', (ev) => this._onEvent(ev)));
    this._off.push(this.client.on('status', ({ status }) => this._onStatus(status)));
    let ok;
    try {
      ok = await this.client.request('media.join', { room: this.room });
    } catch (err) {
      this._teardown();
      throw err;
    }
    this._recordingIs(ok.recording ?? null);
    this._joined(ok);
    return ok;
  }

  /** The room's recording as a join found it: a session that rejoined (on another edge, say)
   * may have missed the `media.recording` events of its old one. */
  _recordingIs(recording) {
    if (recording === this.recording) return;
    const ev = recording !== null
      ? { room: this.room, recording, state: 'started' }
      : { room: this.room, recording: this.recording, state: 'stopped' };
    this.recording = recording;
    this.emit('recording', ev);
  }

  _joined(ok) {
    this.participant = ok.participant;
    this.role = ok.role;
    this.viewers = ok.viewers ?? null;
    for (const p of ok.participants) this.participants.set(p.participant, p);
    for (const t of ok.tracks) this.published.set(t.id, t);
    this.emit('joined', ok);
    this._changed();
    if (this.autoSubscribe) {
      const ids = ok.tracks.map((t) => t.id);
      if (ids.length) this.subscribe(ids).catch((error) => this.emit('error', { error }));
    }
  }

  _newPc() {
    const pc = new RTCPeerConnection({ iceServers: this.iceServers, bundlePolicy: 'max-bundle' });
    pc.ontrack = (e) => { if (pc === this._pc) this._onTrack(e); };
    pc.onconnectionstatechange = () => { if (pc === this._pc) this._setState(pc.connectionState); };
    return pc;
  }

  // --- resume ----------------------------------------------------------------------------

  _onStatus(status) {
    if (this._closed) return;
    if (status === 'closed') this._ended('closed');
    else if (status === 'ready' && this._suspended) this._resume();
    else if (status !== 'ready' && !this._suspended && this.participant) this._suspend();
  }

  /** The socket is gone, and with it our participant at the server: keep the local tracks. */
  _suspend() {
    this._suspended = true;
    this._pc.onicecandidate = null;
    this._pc.close();
    for (const id of [...this.remote.keys()]) this._dropRemote(id);
    this.participants.clear();
    this.published.clear();
    this.speakers = [];
    this.participant = null;
    this._setState('reconnecting');
  }

  /** Join again on a new connection; republish the same tracks; resubscribe. */
  _resume() {
    this._suspended = false;
    const pubs = [...this.local.values()];
    this.local.clear();
    this._pc = this._newPc();
    this._mids = new Map();
    const run = this._queue.then(async () => {
      const ok = await this.client.request('media.join', { room: this.room });
      if (this._closed) return;
      this.participant = ok.participant; // before our tracks' own track_published events
      this._recordingIs(ok.recording ?? null); // before the events that follow the join's ok
      if (ok.role !== 'host') for (const pub of pubs) pub.track.stop(); // may no longer publish
      else if (pubs.length) {
        for (const pub of pubs) {
          const res = await this.client.request('media.publish', {
            room: this.room, kind: pub.track.kind, source: pub.source, msid_track: pub.track.id,
          });
          const tr = this._pc.addTransceiver(pub.track, { direction: 'sendonly', streams: [new MediaStream([pub.track])] });
          Object.assign(pub, { id: res.track, sender: tr.sender, transceiver: tr });
          this.local.set(pub.id, pub);
        }
        await this._offer();
        for (const pub of pubs) {
          if (pub.muted) await this.client.request('media.mute', { room: this.room, track: pub.id, muted: true });
        }
      }
      this._joined(ok); // after our own tracks: the snapshot's tracks are the others'
    });
    this._queue = run.catch(() => {});
    run.catch((error) => {
      if (this._closed) return;
      this.emit('error', { error });
      if (this.client.status === 'ready') this._ended('failed');
    });
  }

  // --- publishing ------------------------------------------------------------------------

  async publishCamera(constraints = { width: 640, height: 480, frameRate: 15 }) {
    const stream = await navigator.mediaDevices.getUserMedia({ video: constraints });
    return this.publish(stream.getVideoTracks()[0], 'camera');
  }

  async publishMicrophone() {
    const stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    return this.publish(stream.getAudioTracks()[0], 'microphone');
  }

  /** Share the screen (the browser asks the user which one). Ends when the user stops it. */
  async publishScreen() {
    const stream = await navigator.mediaDevices.getDisplayMedia({ video: true, audio: false });
    const track = stream.getVideoTracks()[0];
    const pub = await this.publish(track, 'screen');
    track.addEventListener('ended', () => { this.unpublish(pub.id).catch(() => {}); });
    return pub;
  }

  /**
   * Publish a MediaStreamTrack as `source` (camera, microphone, screen, screen_audio).
   * @returns {Promise<{id: string, track: MediaStreamTrack, source: string}>}
   */
  async publish(track, source) {
    this._check();
    return this._serial(async () => {
      const ok = await this.client.request('media.publish', {
        room: this.room, kind: track.kind, source, msid_track: track.id,
      });
      const stream = new MediaStream([track]);
      const tr = this._pc.addTransceiver(track, { direction: 'sendonly', streams: [stream] });
      const pub = { id: ok.track, track, source, sender: tr.sender, transceiver: tr };
      this.local.set(ok.track, pub);
      try {
        await this._offer();
      } catch (err) {
        this.local.delete(ok.track);
        tr.sender.replaceTrack(null).catch(() => {});
        tr.direction = 'inactive';
        this.client.request('media.unpublish', { room: this.room, track: ok.track }).catch(() => {});
        throw err;
      }
      this._changed();
      return pub;
    });
  }

  async unpublish(id) {
    const pub = this.local.get(id);
    if (!pub) throw new GB6Error('not_found', `no local track ${id}`);
    return this._serial(async () => {
      this.local.delete(id);
      await this.client.request('media.unpublish', { room: this.room, track: id });
      await pub.sender.replaceTrack(null);
      pub.transceiver.direction = 'inactive';
      pub.track.stop();
      await this._offer();
      this._changed();
    });
  }

  /** Stop (or resume) sending one of our tracks; the room is told (`track_muted`). */
  async mute(id, muted = true) {
    const pub = this.local.get(id);
    if (!pub) throw new GB6Error('not_found', `no local track ${id}`);
    await this.client.request('media.mute', { room: this.room, track: id, muted });
    pub.track.enabled = !muted;
    pub.muted = muted;
    this._changed();
  }

  // --- receiving -------------------------------------------------------------------------

  subscribe(ids) {
    return this._serial(async () => {
      const wanted = ids.filter((id) => this.published.has(id) && !this.remote.has(id)
        && this.published.get(id).participant !== this.participant);
      if (!wanted.length) return;
      const ok = await this.client.request('media.subscribe', { room: this.room, tracks: wanted });
      await this._answer(ok.sdp);
    });
  }

  unsubscribe(ids) {
    return this._serial(async () => {
      const ok = await this.client.request('media.unsubscribe', { room: this.room, tracks: ids });
      for (const id of ids) this._dropRemote(id);
      await this._answer(ok.sdp);
    });
  }

  renegotiate() {
    return this._serial(async () => {
      const ok = await this.client.request('media.renegotiate', { room: this.room });
      await this._answer(ok.sdp);
    });
  }

  /** Start (`on`) or stop a recording of the room (its creator, owners and admins). */
  record(on = true) {
    return this.client.request('media.record', { room: this.room, on });
  }

  /**
   * What each received track has decoded so far, by track id (from getStats): video
   * `framesDecoded`, audio `totalSamplesReceived`/`concealedSamples`, and `packetsReceived`.
   */
  async stats() {
    const out = {};
    if (!this._pc) return out;
    const report = await this._pc.getStats();
    const byMid = new Map([...this.remote.values()].map((r) => [r.mid, r.info.id]));
    report.forEach((s) => {
      if (s.type !== 'inbound-rtp' || !byMid.has(s.mid)) return;
      out[byMid.get(s.mid)] = {
        kind: s.kind,
        framesDecoded: s.framesDecoded ?? 0,
        totalSamplesReceived: s.totalSamplesReceived ?? 0,
        concealedSamples: s.concealedSamples ?? 0,
        packetsReceived: s.packetsReceived ?? 0,
      };
    });
    return out;
  }

  async leave() {
    if (this._closed) return;
    const req = this.client.request('media.leave', { room: this.room }).catch(() => {});
    this._ended('closed');
    await req;
  }

  // --- internals -------------------------------------------------------------------------

  _check() {
    if (this._closed || !this._pc) throw new GB6Error('invalid', 'join the media first');
  }

  _serial(fn) {
    const run = this._queue.then(() => { this._check(); return fn(); });
    this._queue = run.catch(() => {});
    return run;
  }

  async _offer() {
    const pc = this._pc;
    await pc.setLocalDescription(await pc.createOffer());
    await gathered(pc, GATHER_WAIT_MS);
    const ok = await this.client.request('media.offer', { room: this.room, sdp: pc.localDescription.sdp });
    await pc.setRemoteDescription({ type: 'answer', sdp: ok.sdp });
    this._trickle();
  }

  async _answer(sdp) {
    if (!sdp) return;
    const pc = this._pc;
    this._mids = tracksByMid(sdp);
    await pc.setRemoteDescription({ type: 'offer', sdp });
    await pc.setLocalDescription(await pc.createAnswer());
    await gathered(pc, GATHER_WAIT_MS);
    await this.client.request('media.answer', { room: this.room, sdp: pc.localDescription.sdp });
    this._trickle();
  }

  _trickle() {
    if (this._pc.onicecandidate) return;
    this._pc.onicecandidate = (e) => {
      if (this._closed) return;
      const candidate = e.candidate ? e.candidate.candidate : null;
      if (candidate === '') return;
      this.client.request('media.ice', { room: this.room, candidate }).catch(() => {});
    };
  }

  _onTrack(e) {
    const mid = e.transceiver?.mid;
    const named = this._mids.get(mid);
    if (!named) return;
    const info = this.published.get(named.track)
      ?? { id: named.track, participant: named.participant, kind: e.track.kind };
    const stream = new MediaStream([e.track]);
    const entry = { info, track: e.track, stream, mid };
    this.remote.set(info.id, entry);
    this.emit('track', entry);
    this._changed();
  }

  _dropRemote(id) {
    const entry = this.remote.get(id);
    if (!entry) return;
    this.remote.delete(id);
    this.emit('track_removed', { id, info: entry.info });
  }

  _onEvent(ev) {
    if (ev.room !== this.room || !ev.type?.startsWith('media.') || this._closed) return;
    switch (ev.type) {
      case 'media.participant_joined':
        this.participants.set(ev.participant, { participant: ev.participant, user: ev.user });
        this.emit('participant_joined', ev);
        break;
      case 'media.participant_left':
        this.participants.delete(ev.participant);
        this.emit('participant_left', ev);
        break;
      case 'media.track_published':
        this.published.set(ev.track.id, ev.track);
        if (this.autoSubscribe && ev.track.participant !== this.participant) {
          this.subscribe([ev.track.id]).catch((error) => this.emit('error', { error }));
        }
        break;
      case 'media.track_unpublished':
        this.published.delete(ev.track);
        if (this.remote.has(ev.track)) {
          this._dropRemote(ev.track);
          this.renegotiate().catch((error) => this.emit('error', { error }));
        }
        break;
      case 'media.track_muted': {
        const t = this.published.get(ev.track);
        if (t) t.muted = ev.muted;
        this.emit('track_muted', ev);
        break;
      }
      case 'media.speakers':
        this.speakers = ev.speakers;
        this.emit('speakers', ev);
        break;
      case 'media.quality':
        this.quality.set(ev.participant, ev.quality);
        this.emit('quality', ev);
        break;
      case 'media.viewers':
        this.viewers = ev.count;
        this.emit('viewers', ev);
        break;
      case 'media.recording': {
        // A join's answer may have told of it already (started) or never (stopped).
        const now = ev.state === 'started' ? ev.recording : null;
        if (now === this.recording || (now === null && ev.recording !== this.recording)) break;
        this.recording = now;
        this.emit('recording', ev);
        break;
      }
      case 'media.role':
        if (ev.participant !== this.participant) return;
        this.role = ev.role;
        if (ev.role === 'viewer') this._stopSending();
        this.emit('role', ev);
        break;
      case 'media.state':
        if (ev.state === 'closed' || ev.state === 'failed') this._ended(ev.state);
        return;
      default:
        return;
    }
    this._changed();
  }

  /** Our tracks were unpublished by the server (un-named co-host): stop sending them. */
  _stopSending() {
    for (const pub of this.local.values()) {
      pub.sender.replaceTrack(null).catch(() => {});
      pub.transceiver.direction = 'inactive';
      pub.track.stop();
    }
    this.local.clear();
  }

  _setState(state) {
    if (this._closed || state === this.state) return;
    this.state = state;
    this.emit('state', { state });
    this._changed();
  }

  _ended(state) {
    if (this._closed) return;
    this._setState(state);
    this._teardown();
    this._changed();
  }

  _teardown() {
    this._closed = true;
    for (const off of this._off) off();
    this._off = [];
    for (const pub of this.local.values()) pub.track.stop();
    for (const id of [...this.remote.keys()]) this._dropRemote(id);
    this._pc?.close();
  }

  _changed() {
    this.emit('change');
  }
}

/** Resolve once ICE gathering completes, or after `ms` (the rest is trickled). */
function gathered(pc, ms) {
  if (pc.iceGatheringState === 'complete') return Promise.resolve();
  return new Promise((resolve) => {
    const timer = setTimeout(done, ms);
    function done() {
      clearTimeout(timer);
      pc.removeEventListener('icegatheringstatechange', check);
      resolve();
    }
    function check() { if (pc.iceGatheringState === 'complete') done(); }
    pc.addEventListener('icegatheringstatechange', check);
  });
}
