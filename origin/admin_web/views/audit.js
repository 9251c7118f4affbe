// The audit log: newest first, filtered by actor, action, organization, instance and time, a page
// at a time ("Older records" follows the API's cursor). Filters live in the location hash
// (#/audit?instance=…), so a link can open a filtered view; records outside the credential's
// reach are never in the answer (the server scopes it).

import { action, alertBox, field, h, onSubmit, replace, select, table } from '../dom.js';
import { utc } from '../model.js';

const FILTERS = [
  ['actor', 'Actor'],
  ['action', 'Action'],
  ['org', 'Organization id'],
  ['instance', 'Instance id'],
  ['since', 'Since (ISO 8601)'],
  ['until', 'Until (ISO 8601)'],
];
const SIZES = ['10', '50', '200'];

function row(r) {
  const details = Object.entries(r.details ?? {}).map(([k, v]) => `${k}=${typeof v === 'string' ? v : JSON.stringify(v)}`).join(' ');
  return [String(r.seq), h('span', { class: 'nowrap' }, utc(r.ts)), r.actor, r.action, r.org ?? '', r.instance ?? '', r.target ?? '',
    h('span', { class: `badge outcome-${r.outcome}` }, r.outcome), details];
}

export async function auditView(ctx, view, query) {
  const { api } = ctx;
  const limit = SIZES.includes(query.get('limit')) ? query.get('limit') : '50';
  const filters = Object.fromEntries(FILTERS.map(([k]) => [k, query.get(k) ?? '']));
  const first = await api.get('/v1/audit', { ...filters, limit });
  if (!ctx.current()) return;
  const alert = alertBox();
  const inputs = Object.fromEntries(FILTERS.map(([k]) => [k, h('input', { name: k, value: filters[k], maxlength: 200 })]));
  const size = select({ name: 'limit' }, SIZES, limit);
  const tbody = h('tbody');
  const count = h('p', { role: 'status', 'aria-label': 'Audit records shown' });
  let next = first.next;
  let shown = 0;
  const more = action('Older records', alert, async () => {
    const page = await api.get('/v1/audit', { ...filters, limit, after: next });
    add(page);
  }, { hidden: true });
  function add(page) {
    for (const r of page.items) tbody.append(h('tr', { 'data-seq': r.seq }, row(r).map((c) => h('td', {}, c))));
    shown += page.items.length;
    next = page.next;
    more.hidden = !next;
    count.textContent = shown ? `${shown} record${shown === 1 ? '' : 's'}${next ? ', more older' : ''}` : 'No records match.';
  }
  replace(view, h('section', { class: 'main' },
    h('h2', {}, 'Audit log'),
    h('form', {
      class: 'filters', 'aria-label': 'Audit filters',
      onsubmit: onSubmit(alert, async () => {
        const q = new URLSearchParams();
        for (const [k] of FILTERS) if (inputs[k].value.trim()) q.set(k, inputs[k].value.trim());
        if (size.value !== '50') q.set('limit', size.value);
        ctx.go(`#/audit${q.size ? `?${q}` : ''}`);
      }),
    }, FILTERS.map(([k, text]) => field(text, inputs[k])), field('Page size', size),
    h('button', { type: 'submit' }, 'Apply filters'),
    h('a', { href: '#/audit' }, 'Clear filters')),
    alert.el,
    h('table', {},
      h('caption', {}, 'Audit records, newest first'),
      h('thead', {}, h('tr', {}, ['Seq', 'Time (UTC)', 'Actor', 'Action', 'Organization', 'Instance', 'Target', 'Outcome', 'Details'].map((t) => h('th', { scope: 'col' }, t)))),
      tbody),
    count, more));
  add(first);
}
