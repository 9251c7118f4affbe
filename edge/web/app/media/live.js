// The live viewer (`#/live/<room>`): the hosts' stream, the viewer count, and comments and
// reactions through the room's messages. A host (the room's creator, an owner or admin, or a
// co-host) gets "Go live" (camera and microphone); everyone else watches, receive-only.
// `mount(el, ctx, [roomId])` returns the unmount function, which leaves the media.
//
// Rules: reactions are messages whose body is {text: <emoji>, reaction: true}, so they are
// durable and ordered like comments; the view counts those that arrive while it is open. The
// viewer count is the server's (`media.viewers`, viewers on this edge). The session is
// reachable from the section element as `.gb6Media` (for diagnostics: stats()).

import { MediaSession } from '/sdk/media.js';
import { h, replace } from '../dom.js';
import { Elements, tile, useMediaStyles } from './tiles.js';

const REACTIONS = ['❤️', '👏', '🔥'];

export async function mount(el, ctx, [roomId]) {
  useMediaStyles();
  const { client, rooms } = ctx;
  const info = rooms.get(roomId) ?? { id: roomId, name: roomId, kind: 'live' };
  const media = new MediaSession(client, roomId);
  const elements = new Elements();
  const status = h('p', { role: 'status', 'aria-label': 'Media status', text: 'Joining…' });
  const viewers = h('span', { role: 'status', 'aria-label': 'Viewers', text: '' });
  const reactionsShown = h('span', { role: 'status', 'aria-label': 'Reactions', class: 'reaction-burst' });
  const alert = h('p', { role: 'alert' });
  const stage = h('ul', { class: 'grid live-stage', 'aria-label': 'Stream' });
  const goLive = h('button', { type: 'button', text: 'Go live', hidden: true });
  const react = REACTIONS.map((emoji) => h('button', { type: 'button', text: `Send ${emoji}`, 'data-emoji': emoji }));
  const chat = h('aside', { class: 'media-chat view', 'aria-label': 'Comments' });
  const section = h('section', { class: 'media-view', 'aria-label': 'Live stream', 'data-media-session': roomId },
    h('div', { class: 'media-main' },
      h('header', { class: 'media-head' }, h('h2', { text: `Live: ${info.name}` }), status),
      h('div', { class: 'live-facts' }, viewers, reactionsShown),
      h('div', { class: 'media-controls', role: 'toolbar', 'aria-label': 'Live controls' }, goLive, ...react),
      alert, stage),
    chat);
  section.gb6Media = media;
  el.append(section);
  const fail = (what) => (err) => { alert.textContent = `${what}: ${err?.message ?? err} (${err?.code ?? 'error'})`; };
  const counts = new Map();

  function draw() {
    status.textContent = media.state === 'closed' ? 'Left the stream'
      : media.state === 'failed' ? 'Media connection failed'
        : media.role === 'host' ? `Hosting (${media.state})` : media.participant ? `Watching (${media.state})` : 'Joining…';
    viewers.textContent = media.viewers == null ? '' : `${media.viewers} watching`;
    goLive.hidden = media.role !== 'host' || media.local.size > 0;
    const hosts = new Map();
    for (const r of media.remote.values()) {
      const pid = r.info.participant;
      if (!hosts.has(pid)) hosts.set(pid, { participant: pid, user: r.info.user ?? pid, tracks: [] });
      const pub = media.published.get(r.info.id) ?? r.info;
      hosts.get(pid).tracks.push({ id: r.info.id, kind: r.track.kind, source: pub.source ?? '', stream: r.stream, muted: Boolean(pub.muted) });
    }
    const mine = [...media.local.values()].map((p) => ({ id: p.id, kind: p.track.kind, source: p.source, stream: new MediaStream([p.track]) }));
    const tiles = [...hosts.values()].map((p) => tile({ ...p, label: p.user, elements }));
    if (mine.length) tiles.unshift(tile({ participant: media.participant, user: client.user.id, label: 'You (live)', tracks: mine, elements, local: true }));
    elements.keep(new Set([...mine.map((t) => t.id), ...[...hosts.values()].flatMap((p) => p.tracks.map((t) => t.id))]));
    replace(stage, ...tiles);
    reactionsShown.textContent = [...counts].map(([emoji, n]) => `${emoji} ${n}`).join('  ');
  }
  media.on('change', draw);
  media.on('error', ({ error }) => fail('Media')(error));

  const offMessage = client.on('message', (ev) => {
    if (ev.room !== roomId || ev.body?.reaction !== true || typeof ev.body.text !== 'string') return;
    counts.set(ev.body.text, (counts.get(ev.body.text) ?? 0) + 1);
    draw();
  });
  for (const b of react) {
    b.addEventListener('click', () => {
      client.send(roomId, { text: b.dataset.emoji, reaction: true }).catch(fail('Reaction not sent'));
    });
  }
  goLive.addEventListener('click', async () => {
    goLive.disabled = true;
    try {
      await media.publishCamera();
      await media.publishMicrophone();
    } catch (err) {
      fail('Could not go live')(err);
    }
    goLive.disabled = false;
    draw();
  });

  let unmountChat = null;
  import('../views/chat.js')
    .then(async (view) => { unmountChat = await view.mount(chat, ctx, [roomId]); })
    .catch(fail('Comments'));
  media.join().then(draw, fail('Could not join the stream'));

  return () => {
    offMessage();
    media.leave().catch(() => {});
    if (typeof unmountChat === 'function') unmountChat();
  };
}
