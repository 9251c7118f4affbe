// The meeting grid (`#/meeting/<room>`): join the room's media with camera and microphone,
// one tile per participant with their camera, screen share and audio, mute and unmute, share
// the screen, the active speaker outlined, connection quality, and the room's chat beside it.
// `mount(el, ctx, [roomId])` returns the unmount function, which leaves the media.
//
// Rules: the view draws the SDK's MediaSession state (sdk/media.js) on each 'change'; what it
// shows is named for people and tests alike: tiles are list items labelled "Participant
// <user>", media elements carry data-track-id and data-source. The session is reachable from
// the section element as `.gb6Media` (for diagnostics: stats()).

import { MediaSession } from '/sdk/media.js';
import { h, replace } from '../dom.js';
import { Elements, tile, useMediaStyles } from './tiles.js';

export async function mount(el, ctx, [roomId]) {
  useMediaStyles();
  const { client, rooms } = ctx;
  const me = client.user.id;
  const info = rooms.get(roomId) ?? { id: roomId, name: roomId, kind: 'meeting' };
  const media = new MediaSession(client, roomId);
  const elements = new Elements();
  const status = h('p', { role: 'status', 'aria-label': 'Media status', text: 'Joining…' });
  const alert = h('p', { role: 'alert' });
  const grid = h('ul', { class: 'grid', 'aria-label': 'Participants' });
  const camera = h('button', { type: 'button', text: 'Mute camera', 'aria-pressed': 'false', disabled: true });
  const mic = h('button', { type: 'button', text: 'Mute microphone', 'aria-pressed': 'false', disabled: true });
  const screen = h('button', { type: 'button', text: 'Share screen', disabled: true });
  const leave = h('button', { type: 'button', text: 'Leave the meeting' });
  const chat = h('aside', { class: 'media-chat view', 'aria-label': 'Meeting chat' });
  const section = h('section', { class: 'media-view', 'aria-label': 'Meeting', 'data-media-session': roomId },
    h('div', { class: 'media-main' },
      h('header', { class: 'media-head' }, h('h2', { text: `Meeting: ${info.name}` }), status),
      h('div', { class: 'media-controls', role: 'toolbar', 'aria-label': 'Media controls' }, camera, mic, screen, leave),
      alert, grid),
    chat);
  section.gb6Media = media;
  el.append(section);
  const fail = (what) => (err) => { alert.textContent = `${what}: ${err?.message ?? err} (${err?.code ?? 'error'})`; };
  let cam = null;
  let microphone = null;
  let share = null;

  function draw() {
    status.textContent = media.state === 'closed' ? 'Left the meeting'
      : media.state === 'failed' ? 'Media connection failed' : media.participant ? `In the meeting (${media.state})` : 'Joining…';
    const speaking = new Set(media.speakers.map((s) => s.participant));
    const byParticipant = new Map();
    for (const [pid, p] of media.participants) byParticipant.set(pid, { ...p, tracks: [] });
    for (const r of media.remote.values()) {
      const pid = r.info.participant;
      if (!byParticipant.has(pid)) byParticipant.set(pid, { participant: pid, user: r.info.user ?? pid, tracks: [] });
      const pub = media.published.get(r.info.id) ?? r.info;
      byParticipant.get(pid).tracks.push({ id: r.info.id, kind: r.track.kind, source: pub.source ?? '', stream: r.stream, muted: Boolean(pub.muted) });
    }
    const mine = [...media.local.values()].map((p) => ({
      id: p.id, kind: p.track.kind, source: p.source, stream: new MediaStream([p.track]), muted: Boolean(p.muted),
    }));
    const tiles = [];
    if (media.participant) {
      tiles.push(tile({ participant: media.participant, user: me, label: 'You', tracks: mine, speaking: speaking.has(media.participant), quality: media.quality.get(media.participant), elements, local: true }));
    }
    for (const p of byParticipant.values()) {
      tiles.push(tile({ participant: p.participant, user: p.user, label: p.user, tracks: p.tracks, speaking: speaking.has(p.participant), quality: media.quality.get(p.participant), elements }));
    }
    elements.keep(new Set([...mine.map((t) => t.id), ...[...byParticipant.values()].flatMap((p) => p.tracks.map((t) => t.id))]));
    replace(grid, ...tiles);
    camera.textContent = cam?.muted ? 'Unmute camera' : 'Mute camera';
    camera.setAttribute('aria-pressed', String(Boolean(cam?.muted)));
    mic.textContent = microphone?.muted ? 'Unmute microphone' : 'Mute microphone';
    mic.setAttribute('aria-pressed', String(Boolean(microphone?.muted)));
    screen.textContent = share ? 'Stop sharing' : 'Share screen';
    const live = media.participant && media.state !== 'closed' && media.state !== 'failed';
    for (const b of [camera, mic, screen]) b.disabled = !live;
    camera.disabled ||= !cam;
    mic.disabled ||= !microphone;
  }
  media.on('change', draw);
  media.on('error', ({ error }) => fail('Media')(error));

  camera.addEventListener('click', () => { if (cam) media.mute(cam.id, !cam.muted).catch(fail('Camera')); });
  mic.addEventListener('click', () => { if (microphone) media.mute(microphone.id, !microphone.muted).catch(fail('Microphone')); });
  screen.addEventListener('click', async () => {
    try {
      if (share) {
        const id = share.id;
        share = null;
        await media.unpublish(id);
      } else {
        share = await media.publishScreen();
        share.track.addEventListener('ended', () => { share = null; draw(); });
      }
    } catch (err) {
      share = null;
      fail('Screen share')(err);
    }
    draw();
  });
  leave.addEventListener('click', async () => {
    await media.leave();
    location.hash = `#/rooms/${encodeURIComponent(roomId)}`;
  });

  let unmountChat = null;
  import('../views/chat.js')
    .then(async (view) => { unmountChat = await view.mount(chat, ctx, [roomId]); })
    .catch(fail('Chat'));

  (async () => {
    await media.join();
    cam = await media.publishCamera().catch((err) => { fail('Camera')(err); return null; });
    microphone = await media.publishMicrophone().catch((err) => { fail('Microphone')(err); return null; });
    draw();
  })().catch(fail('Could not join the meeting'));

  return () => {
    media.leave().catch(() => {});
    if (typeof unmountChat === 'function') unmountChat();
  };
}
