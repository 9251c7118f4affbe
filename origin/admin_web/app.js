// The admin console: sign in with an admin credential, then views routed by the location hash:
//   #/orgs, #/orgs/<org>          the organization tree; an organization (members, instances)
//   #/instances, #/instances/<i>  instances; an instance (lifecycle, plan, users, quotas and
//                                 usage, invoices)
//   #/audit?actor=…&instance=…    the audit log, filtered, a page at a time
// The credential lives in this tab's sessionStorage only. Every view reads what it shows from
// the API when it opens (nothing is cached across views), so what a view shows is what the
// server says now; a 401 anywhere signs out. `GET /v1/me` at sign-in says what the credential
// may do: sections it may not read are not offered (views get `ctx.can(permission)`).

import { Api } from './api.js';
import { alertBox, field, h, onSubmit, replace } from './dom.js';
import { credentialKind } from './model.js';
import { auditView } from './views/audit.js';
import { instanceView, instancesView } from './views/instances.js';
import { orgsView } from './views/orgs.js';

const KEY = 'gb6.admin.credential';
const root = document.getElementById('root');
const who = document.getElementById('who');
const nav = document.getElementById('sections');
const signout = document.getElementById('signout');

// [hash, title, the permission that reads it]
const SECTIONS = [
  ['orgs', 'Organizations', 'org.read'],
  ['instances', 'Instances', 'instance.read'],
  ['audit', 'Audit log', 'audit.read'],
];

let api = null;
let me = null; // GET /v1/me of the signed-in credential
let rendering = 0; // the newest render wins: an older one finishing late is dropped

function signIn(message) {
  api = null;
  sessionStorage.removeItem(KEY);
  nav.hidden = true;
  signout.hidden = true;
  who.textContent = '';
  const alert = alertBox();
  if (message) alert.show(message);
  const input = h('input', { type: 'password', name: 'credential', autocomplete: 'off', required: true, maxlength: 4096 });
  replace(root, h('section', { class: 'signin', 'aria-labelledby': 'signin-title' },
    h('h2', { id: 'signin-title' }, 'Sign in'),
    h('p', { class: 'muted' }, 'The operator\'s admin token, an organization member\'s token (gb6o_…) or an API key (gb6k_…).'),
    h('form', {
      class: 'stack',
      onsubmit: onSubmit(alert, async () => {
        const candidate = new Api(input.value.trim());
        const who = await candidate.get('/v1/me'); // any admin credential: 401 if not one
        sessionStorage.setItem(KEY, candidate.credential);
        start(candidate, who);
      }),
    },
    field('Admin credential', input),
    h('button', { type: 'submit' }, 'Sign in'),
    alert.el)));
  input.focus();
}

function sections() {
  return SECTIONS.filter(([, , permission]) => me.permissions.includes(permission));
}

function start(client, whoami) {
  api = client;
  me = whoami;
  api.onUnauthorized = (err) => signIn(`Signed out: ${err.message}`);
  who.textContent = `Signed in (${credentialKind(api.credential)})`;
  nav.hidden = false;
  signout.hidden = false;
  const first = sections()[0];
  if (!location.hash) location.hash = `#/${first ? first[0] : 'orgs'}`;
  else route();
}

async function resume(client) {
  // A reload: the saved credential may have been revoked meanwhile.
  let whoami;
  try {
    whoami = await client.get('/v1/me');
  } catch (err) {
    signIn(`Signed out: ${err.message}`);
    return;
  }
  start(client, whoami);
}

function parseHash() {
  const [path, query = ''] = location.hash.replace(/^#\/?/, '').split('?');
  const parts = path.split('/').filter(Boolean).map(decodeURIComponent);
  return { parts, query: new URLSearchParams(query) };
}

async function route() {
  if (!api) return;
  const mine = ++rendering;
  const { parts, query } = parseHash();
  const section = parts[0] || 'orgs';
  replace(nav, sections().map(([id, text]) =>
    h('a', { href: `#/${id}`, 'aria-current': id === section ? 'page' : null }, text)));
  const ctx = {
    api,
    me,
    can: (permission) => me.permissions.includes(permission),
    go: (hash) => { if (location.hash === hash) route(); else location.hash = hash; },
    refresh: () => route(),
    current: () => mine === rendering,
  };
  const view = h('div', { class: 'view', 'aria-busy': 'true' });
  replace(root, view);
  try {
    if (section === 'orgs') await orgsView(ctx, view, parts[1] ?? null);
    else if (section === 'instances' && parts[1]) await instanceView(ctx, view, parts[1]);
    else if (section === 'instances') await instancesView(ctx, view, query);
    else if (section === 'audit') await auditView(ctx, view, query);
    else replace(view, h('h2', {}, 'Not found'), h('p', {}, h('a', { href: '#/orgs' }, 'Organizations')));
  } catch (err) {
    if (mine !== rendering || !api) return;
    const alert = alertBox();
    alert.show(err);
    replace(view, h('h2', {}, 'Could not load this view'), alert.el);
  } finally {
    view.removeAttribute('aria-busy');
  }
}

signout.addEventListener('click', () => { signIn(); history.replaceState(null, '', location.pathname); });
window.addEventListener('hashchange', route);

const saved = sessionStorage.getItem(KEY);
if (saved) resume(new Api(saved));
else signIn();
