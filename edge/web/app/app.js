// The GB6 web app: sign in with a token (kept in sessionStorage for this tab), the room list,
// and the view router (routes.js) for the main pane.

import { connect } from '/sdk/index.js';
import { h, replace } from './dom.js';
import { Router } from './router.js';
import { RoomList } from './rooms.js';

const TOKEN_KEY = 'gb6.token';
const root = document.getElementById('root');
const statusEl = document.getElementById('status');
const meEl = document.getElementById('me');
const signoutEl = document.getElementById('signout');

const STATUS_TEXT = {
  connecting: 'Connecting…',
  ready: 'Connected',
  reconnecting: 'Reconnecting…',
  closed: 'Disconnected',
  signedout: 'Signed out',
};

function setStatus(status) {
  statusEl.dataset.status = status;
  statusEl.textContent = STATUS_TEXT[status] ?? status;
}

function showSignIn(error = '') {
  setStatus('signedout');
  meEl.textContent = '';
  signoutEl.hidden = true;
  const input = h('input', { id: 'token', type: 'password', autocomplete: 'off', required: true });
  const form = h('form', { class: 'stack signin', 'aria-label': 'Sign in' },
    h('h2', { text: 'Sign in' }),
    h('label', { for: 'token', text: 'Access token' }),
    input,
    h('button', { type: 'submit', text: 'Sign in' }),
    error ? h('p', { role: 'alert', text: error }) : null,
  );
  form.addEventListener('submit', (e) => {
    e.preventDefault();
    const token = input.value.trim();
    if (!token) return;
    sessionStorage.setItem(TOKEN_KEY, token);
    start();
  });
  replace(root, form);
  input.focus();
}

async function start() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (!token) {
    showSignIn();
    return;
  }
  setStatus('connecting');
  replace(root, h('p', { class: 'empty', text: 'Connecting…' }));
  let client;
  try {
    client = await connect({ token });
  } catch (err) {
    if (err?.code === 'unauthorized' || err?.code === 'invalid' || err?.code === 'forbidden') {
      sessionStorage.removeItem(TOKEN_KEY);
      showSignIn(`That token was refused (${err.code}). Ask for a new one.`);
    } else {
      setStatus('closed');
      replace(root, h('section', { class: 'empty' },
        h('p', { role: 'alert', text: `Could not reach the server: ${err?.message ?? err}` }),
        h('button', { type: 'button', onclick: () => start(), text: 'Try again' })));
    }
    return;
  }
  signedIn(client);
}

function signedIn(client) {
  setStatus(client.status);
  client.on('status', ({ status, error }) => {
    setStatus(status);
    if (status === 'closed' && error?.code === 'unauthorized') {
      sessionStorage.removeItem(TOKEN_KEY);
      showSignIn('Your session ended: the token is no longer valid.');
    }
  });
  meEl.replaceChildren(`Signed in as ${client.user.name} `, h('code', { text: client.user.id }));
  signoutEl.hidden = false;
  signoutEl.onclick = () => {
    sessionStorage.removeItem(TOKEN_KEY);
    router.stop();
    rooms.stop();
    client.close();
    location.hash = '';
    showSignIn();
  };

  const rooms = new RoomList(client);
  const main = h('main', { class: 'view', id: 'main' });
  const side = h('nav', { class: 'side', 'aria-label': 'Rooms' });
  replace(root, h('div', { class: 'layout' }, side, main));
  const ctx = { client, rooms, router: null };
  const router = new Router(main, ctx);
  ctx.router = router;
  const updateSide = buildSide(side, ctx);
  rooms.on('change', updateSide);
  window.addEventListener('hashchange', updateSide);
  rooms.refresh().catch(() => {});
  router.start();
}

/** Build the side bar once; returns the function that redraws its room list. */
function buildSide(side, { client, rooms, router }) {
  const list = h('ul', { 'aria-label': 'Your rooms' });
  const update = () => {
    const current = router.path.match(/^\/rooms\/([^/]+)$/)?.[1];
    replace(list, rooms.list().map((r) => {
      const n = rooms.unread(r.id);
      return h('li', {},
        h('a', { href: `#/rooms/${encodeURIComponent(r.id)}`, 'aria-current': r.id === current ? 'page' : null },
          h('span', { text: r.name }),
          n > 0 && r.id !== current ? h('span', { class: 'unread', text: `${n} unread` }) : null));
    }));
  };
  const name = h('input', { id: 'new-room-name', required: true, maxlength: 200 });
  const members = h('input', { id: 'new-room-members', placeholder: 'usr_…, usr_…' });
  const kind = h('select', { id: 'new-room-kind' },
    h('option', { value: 'chat', text: 'Chat' }), h('option', { value: 'meeting', text: 'Meeting' }),
    h('option', { value: 'live', text: 'Live stream' }));
  const open = h('input', { id: 'new-room-open', type: 'checkbox' });
  const createError = h('p', { role: 'alert' });
  const create = h('form', { class: 'stack', 'aria-label': 'New room' },
    h('h2', { text: 'New room' }),
    h('label', { for: 'new-room-name', text: 'Room name' }), name,
    h('label', { for: 'new-room-members', text: 'Members (user ids, comma separated)' }), members,
    h('label', { for: 'new-room-kind', text: 'Kind' }), kind,
    h('span', {}, open, h('label', { for: 'new-room-open', text: ' Open to everyone in the instance' })),
    h('button', { type: 'submit', text: 'Create room' }), createError);
  create.addEventListener('submit', async (e) => {
    e.preventDefault();
    createError.textContent = '';
    const ids = members.value.split(/[\s,]+/).filter(Boolean);
    try {
      const room = await client.createRoom(name.value.trim(), { kind: kind.value, members: ids, open: open.checked });
      rooms.upsert(room);
      create.reset();
      router.navigate(`/rooms/${room.id}`);
    } catch (err) {
      createError.textContent = `Could not create the room: ${err.message} (${err.code})`;
    }
  });
  const joinId = h('input', { id: 'join-room-id', required: true });
  const joinError = h('p', { role: 'alert' });
  const join = h('form', { class: 'stack', 'aria-label': 'Join a room' },
    h('label', { for: 'join-room-id', text: 'Room id' }), joinId,
    h('button', { type: 'submit', text: 'Join room' }), joinError);
  join.addEventListener('submit', async (e) => {
    e.preventDefault();
    joinError.textContent = '';
    try {
      const room = await client.joinRoom(joinId.value.trim());
      rooms.upsert(room);
      join.reset();
      router.navigate(`/rooms/${room.id}`);
    } catch (err) {
      joinError.textContent = `Could not join: ${err.message} (${err.code})`;
    }
  });
  replace(side,
    h('h2', { text: 'Rooms' }), list,
    h('button', { type: 'button', text: 'Refresh rooms', onclick: () => rooms.refresh().catch(() => {}) }),
    create, join);
  update();
  return update;
}

start();
