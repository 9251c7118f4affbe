// The chat view of one room: messages with history paging (scroll back or "Load older
// messages"), send/edit/delete/react, receipts ("Read by"), typing, members.
//
// Rules: the view renders the SDK's Room model on each 'change' (room.js folds the events);
// while the page is visible it sends a receipt for the newest event it shows; typing signals
// go out at most every TYPING_EVERY_MS while the user types in the composer.

import { Room } from '/sdk/index.js';
import { h, replace, time } from '../dom.js';

const TYPING_EVERY_MS = 2_000;
const REACTIONS = ['👍', '❤️', '😂'];

/** The files a message body refers to (`files`: [{id, name, type, size}]), well-formed ones only. */
function filesOf(body) {
  const files = Array.isArray(body?.files) ? body.files : [];
  return files
    .filter((f) => f && typeof f.id === 'string' && f.id)
    .slice(0, 20)
    .map((f) => ({ id: f.id, name: typeof f.name === 'string' && f.name ? f.name : f.id }));
}

export async function mount(el, ctx, [roomId]) {
  const { client, rooms } = ctx;
  const me = client.user.id;
  const info = rooms.get(roomId) ?? { id: roomId, name: roomId, kind: 'chat' };
  const room = new Room(client, info);
  let editing = 0; // the seq being edited
  let draft = ''; // its text so far (the list is redrawn on every change)
  let lastTyping = 0;

  const who = (user) => (user === me ? 'You' : user);
  const alert = h('p', { role: 'alert' });
  const fail = (what) => (err) => { alert.textContent = `${what}: ${err.message} (${err.code ?? 'error'})`; };

  const list = h('ol', { class: 'messages', role: 'log', 'aria-label': 'Messages' });
  const older = h('button', { type: 'button', text: 'Load older messages', hidden: true });
  const typing = h('p', { class: 'typing', role: 'status', 'aria-label': 'Typing' });
  const text = h('textarea', { id: 'composer', rows: 2, maxlength: 20000 });
  const attach = h('input', { id: 'attach', type: 'file', class: 'visually-hidden' });
  const composer = h('form', { class: 'composer', 'aria-label': 'Send a message' },
    h('label', { for: 'composer', class: 'visually-hidden', text: 'Message' }), text,
    client.http === null ? null : h('label', { for: 'attach', class: 'attach', text: 'Attach a file' }),
    client.http === null ? null : attach,
    h('button', { type: 'submit', text: 'Send' }));
  const addId = h('input', { id: 'add-member', placeholder: 'usr_…', required: true });
  const add = h('form', { 'aria-label': 'Add a member' },
    h('label', { for: 'add-member', text: 'User id to add ' }), addId,
    h('button', { type: 'submit', text: 'Add member' }));
  const media = info.kind === 'meeting'
    ? h('a', { href: `#/meeting/${encodeURIComponent(roomId)}`, text: 'Join the meeting' })
    : info.kind === 'live' ? h('a', { href: `#/live/${encodeURIComponent(roomId)}`, text: 'Watch live' }) : null;
  const leave = h('button', { type: 'button', text: 'Leave room' });
  const title = h('h2', { text: info.name });
  el.append(
    h('header', { class: 'chat-head' }, title, h('code', { text: roomId }), media, add, leave),
    alert, older, list, typing, composer,
  );

  older.addEventListener('click', () => loadOlder());
  list.addEventListener('scroll', () => { if (list.scrollTop === 0 && room.hasOlder) loadOlder(); });
  async function loadOlder() {
    const before = list.scrollHeight - list.scrollTop;
    await room.loadOlder().catch(fail('Could not load older messages'));
    list.scrollTop = list.scrollHeight - before; // keep what the user was looking at in place
  }

  composer.addEventListener('submit', (e) => {
    e.preventDefault();
    const body = text.value.trim();
    if (!body) return;
    text.value = '';
    room.send(body).catch(fail('Not sent'));
  });
  attach.addEventListener('change', async () => {
    const files = [...attach.files];
    attach.value = '';
    for (const file of files) {
      try {
        const rec = await client.uploadFile(roomId, file);
        // Messages refer to files by id; the name and type are for display.
        await room.send({ text: file.name, files: [{ id: rec.id, name: file.name, type: rec.type, size: rec.size }] });
      } catch (err) {
        fail(`Could not send ${file.name}`)(err);
      }
    }
  });
  text.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey) {
      e.preventDefault();
      composer.requestSubmit();
    }
  });
  text.addEventListener('input', () => {
    const now = Date.now();
    if (text.value && now - lastTyping > TYPING_EVERY_MS) {
      lastTyping = now;
      room.typing().catch(() => {});
    }
  });
  add.addEventListener('submit', (e) => {
    e.preventDefault();
    const ids = addId.value.split(/[\s,]+/).filter(Boolean);
    client.addMembers(roomId, ids).then(() => { addId.value = ''; alert.textContent = ''; }, fail('Could not add'));
  });
  leave.addEventListener('click', () => {
    client.leaveRoom(roomId).then(() => { rooms.remove(roomId); ctx.router.navigate('/'); }, fail('Could not leave'));
  });

  function messageItem(m, readers) {
    const mine = m.sender === me;
    const item = h('li', { 'data-seq': m.seq || null, class: m.pending ? 'pending' : null },
      h('span', { class: 'who', text: who(m.sender) }),
      h('span', { class: 'when', text: m.pending ? (m.failed ? 'not sent' : 'sending…') : time(m.ts) }));
    if (m.deleted) {
      item.append(h('p', { class: 'deleted', text: 'This message was deleted' }));
    } else if (editing === m.seq) {
      const input = h('input', { 'aria-label': 'Edit message', value: draft, oninput: (e) => { draft = e.target.value; } });
      const form = h('form', { 'aria-label': 'Edit' }, input,
        h('button', { type: 'submit', text: 'Save' }),
        h('button', { type: 'button', text: 'Cancel', onclick: () => { editing = 0; render(); } }));
      form.addEventListener('submit', (e) => {
        e.preventDefault();
        const t = input.value.trim();
        editing = 0;
        if (t && t !== m.text) room.edit(m.seq, t).catch(fail('Could not edit'));
        render();
      });
      item.append(form);
      queueMicrotask(() => { if (document.activeElement !== input) input.focus(); });
    } else {
      item.append(h('p', { class: 'text', text: m.text }));
      if (m.edited) item.append(h('span', { class: 'edited', text: '(edited)' }));
      for (const f of filesOf(m.body)) {
        item.append(h('button', { type: 'button', class: 'file', text: `Download ${f.name}`, onclick: () => download(f) }));
      }
    }
    if (m.reactions.size) {
      item.append(h('div', { class: 'reactions', 'aria-label': 'Reactions' },
        [...m.reactions].map(([emoji, users]) => h('span', { text: `${emoji} ${users.size}`, title: [...users].map(who).join(', ') }))));
    }
    if (!m.pending && !m.deleted && editing !== m.seq) {
      item.append(h('div', { class: 'actions' },
        mine ? h('button', { type: 'button', text: 'Edit', onclick: () => { editing = m.seq; draft = m.text; render(); } }) : null,
        mine ? h('button', { type: 'button', text: 'Delete', onclick: () => room.delete(m.seq).catch(fail('Could not delete')) }) : null,
        REACTIONS.map((emoji) => h('button', {
          type: 'button', text: emoji, 'aria-label': `React ${emoji}`,
          onclick: () => room.react(m.seq, emoji).catch(fail('Could not react')),
        }))));
    }
    if (readers?.length) item.append(h('p', { class: 'readby', text: `Read by ${readers.map(who).join(', ')}` }));
    return item;
  }

  async function download(f) {
    try {
      const blob = await client.downloadFile(f.id);
      const url = URL.createObjectURL(blob);
      const a = h('a', { href: url, download: f.name, hidden: true });
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60_000);
    } catch (err) {
      fail(`Could not download ${f.name}`)(err);
    }
  }

  function render() {
    const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
    const messages = room.messages();
    // Each reader is shown once, under the newest message their receipt reached.
    const readersAt = new Map();
    for (const [user, read] of room.readers) {
      if (user === me) continue;
      let at = 0;
      for (const m of messages) if (m.seq && m.seq <= read) at = m.seq;
      if (at) readersAt.set(at, [...(readersAt.get(at) ?? []), user]);
    }
    replace(list, messages.map((m) => messageItem(m, readersAt.get(m.seq))));
    older.hidden = !room.hasOlder;
    const users = room.typingUsers();
    typing.textContent = users.length ? `${users.map(who).join(', ')} ${users.length > 1 ? 'are' : 'is'} typing…` : '';
    if (atBottom) list.scrollTop = list.scrollHeight;
    markRead();
  }

  function markRead() {
    if (document.visibilityState === 'hidden' || !room.newest) return;
    const seq = room.newest;
    rooms.markRead(roomId, seq);
    room.markRead(seq).catch(() => {});
  }

  const offs = [
    room.on('change', render),
    rooms.on('change', () => { const r = rooms.get(roomId); if (r) title.textContent = r.name; }),
  ];
  const onVisible = () => markRead();
  document.addEventListener('visibilitychange', onVisible);
  try {
    await room.open();
  } catch (err) {
    fail('Could not open the room')(err);
  }
  render();
  text.focus();
  return () => {
    for (const off of offs) off();
    document.removeEventListener('visibilitychange', onVisible);
    room.close();
  };
}
