// Instances: the list the credential sees (filtered by status), and one instance: lifecycle
// (suspend, resume, delete), plan, users (create, role, tokens, delete), quotas and usage
// (bars at 80 % and 100 %, overrides), invoices (preview, close a period, issued ones).

import { seg } from '../api.js';
import { action, alertBox, field, h, onSubmit, replace, select, table } from '../dom.js';
import { barWidth, money, monthOf, previousMonth, quotaLevel, utc } from '../model.js';

const INSTANCE_ROLES = ['owner', 'admin', 'member', 'guest', 'bot'];
const STATUSES = ['active', 'suspended', 'deleted'];

export async function instancesView(ctx, view, query) {
  const status = query.get('status') ?? '';
  const items = await ctx.api.all('/v1/instances', { status });
  if (!ctx.current()) return;
  const filter = select({
    'aria-label': 'Status filter',
    onchange: (ev) => ctx.go(ev.target.value ? `#/instances?status=${ev.target.value}` : '#/instances'),
  }, [['', 'any'], ...STATUSES], status);
  replace(view, h('section', { class: 'main' },
    h('h2', {}, 'Instances'),
    field('Status', filter),
    table('Instances', ['Name', 'Organization', 'Plan', 'Region', 'Status'], items.map((i) => [
      h('a', { href: `#/instances/${seg(i.id)}` }, i.name),
      h('a', { href: `#/orgs/${seg(i.org)}` }, i.org), i.plan, i.region,
      h('span', { class: `badge status-${i.status}` }, i.status),
    ]), 'No instances.')));
}

export async function instanceView(ctx, view, id) {
  const { api } = ctx;
  const base = `/v1/instances/${seg(id)}`;
  const [inst, plans] = await Promise.all([api.get(base), api.all('/v1/plans')]);
  if (!ctx.current()) return;
  const sections = {
    users: h('section', { 'aria-labelledby': 'users-title' }),
    quotas: h('section', { 'aria-labelledby': 'quotas-title' }),
    usage: h('section', { 'aria-labelledby': 'usage-title' }),
    invoices: h('section', { 'aria-labelledby': 'invoices-title' }),
  };
  replace(view, h('section', { class: 'main' },
    header(ctx, inst, plans, base),
    sections.users, h('div', { class: 'row' }, sections.quotas, sections.usage), sections.invoices));
  // Each section loads on its own: one failing (say, billing refused to this key) leaves the others.
  await Promise.all([
    guarded(sections.users, 'users-title', 'Users', () => users(ctx, sections.users, base)),
    guarded(sections.quotas, 'quotas-title', 'Quotas', () => quotas(ctx, sections.quotas, base)),
    guarded(sections.usage, 'usage-title', 'Usage', () => usage(ctx, sections.usage, base)),
    guarded(sections.invoices, 'invoices-title', 'Invoices', () => invoices(ctx, sections.invoices, base)),
  ]);
}

async function guarded(el, titleId, title, load) {
  try {
    await load();
  } catch (err) {
    const alert = alertBox();
    alert.show(err);
    replace(el, h('h3', { id: titleId }, title), alert.el);
  }
}

function header(ctx, inst, plans, base) {
  const { api } = ctx;
  const alert = alertBox();
  const plan = select({ name: 'plan' }, plans.map((p) => p.name), inst.plan);
  const confirmDelete = action('Confirm delete', alert, async () => {
    await api.delete(base);
    ctx.refresh();
  }, { class: 'danger', hidden: true });
  const live = inst.status !== 'deleted';
  const lifecycle = ctx.can('instance.lifecycle');
  return h('header', { class: 'instance-head' },
    h('h2', {}, inst.name),
    h('dl', { class: 'facts', 'aria-label': 'Instance' },
      h('dt', {}, 'Status'), h('dd', {}, h('span', { class: `badge status-${inst.status}`, 'data-testid': 'instance-status' }, inst.status)),
      h('dt', {}, 'Plan'), h('dd', {}, inst.plan),
      h('dt', {}, 'Region'), h('dd', {}, inst.region),
      h('dt', {}, 'Organization'), h('dd', {}, h('a', { href: `#/orgs/${seg(inst.org)}` }, inst.org)),
      h('dt', {}, 'Id'), h('dd', {}, inst.id),
      h('dt', {}, 'Created'), h('dd', {}, utc(Date.parse(inst.created_at)))),
    h('div', { class: 'actions' },
      lifecycle && inst.status === 'active' ? action('Suspend instance', alert, async () => {
        await api.post(`${base}/suspend`);
        ctx.refresh();
      }) : null,
      lifecycle && inst.status === 'suspended' ? action('Resume instance', alert, async () => {
        await api.post(`${base}/resume`);
        ctx.refresh();
      }) : null,
      lifecycle && live ? h('button', {
        type: 'button', class: 'danger',
        onclick: (ev) => { ev.currentTarget.hidden = true; confirmDelete.hidden = false; confirmDelete.focus(); },
      }, 'Delete instance') : null,
      confirmDelete,
      h('a', { href: `#/audit?instance=${seg(inst.id)}` }, 'Audit of this instance')),
    live && ctx.can('instance.write') ? h('form', {
      class: 'inline', 'aria-label': 'Change plan',
      onsubmit: onSubmit(alert, async () => {
        await api.patch(base, { plan: plan.value });
        ctx.refresh();
      }),
    }, field('Plan', plan), h('button', { type: 'submit' }, 'Change plan')) : null,
    alert.el);
}

async function users(ctx, el, base) {
  const { api } = ctx;
  const list = await api.all(`${base}/users`);
  const alert = alertBox();
  const tokenOut = h('output', { 'aria-label': 'Issued user token', class: 'secret' });
  const name = h('input', { name: 'name', required: true, maxlength: 200 });
  const role = select({ name: 'role' }, INSTANCE_ROLES, 'member');
  const write = ctx.can('user.write');
  const rows = list.map((u) => [
    u.name,
    !write ? u.role : select({
      'aria-label': `Role of ${u.name}`,
      onchange: async (ev) => {
        alert.clear();
        try {
          await api.patch(`${base}/users/${seg(u.id)}`, { role: ev.target.value });
          ctx.refresh();
        } catch (err) {
          alert.show(err);
          ev.target.value = u.role;
        }
      },
    }, INSTANCE_ROLES, u.role),
    u.id,
    utc(Date.parse(u.created_at)),
    h('span', { class: 'actions' },
      !ctx.can('token.issue') ? null : action('Issue token', alert, async () => {
        const t = await api.post(`${base}/users/${seg(u.id)}/tokens`, {});
        tokenOut.textContent = t.token;
        tokenOut.dataset.user = u.name;
        tokenOut.title = `Token for ${u.name}, expires ${t.expires_at} (shown once)`;
      }, { 'aria-label': `Issue a token for ${u.name}` }),
      !write ? null : action('Delete', alert, async () => {
        await api.delete(`${base}/users/${seg(u.id)}`);
        ctx.refresh();
      }, { 'aria-label': `Delete ${u.name}`, class: 'danger' })),
  ]);
  replace(el,
    h('h3', { id: 'users-title' }, 'Users'),
    table('Users', ['Name', 'Role', 'Id', 'Created', 'Actions'], rows, 'No users.'),
    tokenOut,
    !write ? null : h('form', {
      class: 'inline', 'aria-label': 'New user',
      onsubmit: onSubmit(alert, async () => {
        await api.post(`${base}/users`, { name: name.value.trim(), role: role.value });
        ctx.refresh();
      }),
    }, field('User name', name), field('User role', role), h('button', { type: 'submit' }, 'Create user')),
    alert.el);
}

function bar(resource, used, limit) {
  const { level, percent } = quotaLevel(used, limit);
  const text = limit === null ? `${used} (unlimited)` : `${used} of ${limit} (${percent} %)`;
  const fill = h('span', { class: 'fill' });
  fill.style.width = `${barWidth(used, limit)}%`; // CSSOM, not a style attribute: the CSP allows it
  return h('div', {
    role: 'meter', class: `bar level-${level}`, 'data-level': level,
    'aria-label': `${resource} quota`, 'aria-valuemin': 0, 'aria-valuemax': limit ?? used,
    'aria-valuenow': used, 'aria-valuetext': text,
  }, fill, h('span', { class: 'bar-text' }, text, level === 'warn' ? ' · over 80 %' : level === 'full' ? ' · at the limit' : ''));
}

async function quotas(ctx, el, base) {
  const { api } = ctx;
  const q = await api.get(`${base}/quotas`);
  const alert = alertBox();
  const rows = q.usage.map((u) => {
    const override = Object.hasOwn(q.overrides, u.resource);
    if (!ctx.can('quota.write')) return [u.resource, bar(u.resource, u.used, u.limit), u.period ?? '—', override ? `${q.overrides[u.resource] ?? 'unlimited'}` : '—'];
    const input = h('input', { type: 'number', min: 0, step: 1, class: 'narrow', 'aria-label': `Limit override for ${u.resource}` });
    return [
      u.resource, bar(u.resource, u.used, u.limit), u.period ?? '—',
      h('form', {
        class: 'inline',
        onsubmit: onSubmit(alert, async () => {
          await api.put(`${base}/quotas/${seg(u.resource)}`, { limit: input.value === '' ? null : Number(input.value) });
          ctx.refresh();
        }),
      }, input, h('button', { type: 'submit', 'aria-label': `Set the ${u.resource} override` }, 'Set'),
      override ? action('Clear', alert, async () => {
        await api.delete(`${base}/quotas/${seg(u.resource)}`);
        ctx.refresh();
      }, { 'aria-label': `Clear the ${u.resource} override` }) : null),
    ];
  });
  replace(el,
    h('h3', { id: 'quotas-title' }, `Quotas (plan ${q.plan})`),
    table('Quotas', ['Resource', 'Used', 'Period', 'Override (empty: unlimited)'], rows),
    alert.el);
}

async function usage(ctx, el, base, period = monthOf(Date.now())) {
  const { api } = ctx;
  const u = await api.get(`${base}/usage`, { period });
  const alert = alertBox();
  const input = h('input', { name: 'period', value: period, pattern: '[0-9]{4}-[0-9]{2}(-[0-9]{2})?', required: true, class: 'narrow' });
  const metrics = Object.entries(u.usage).sort(([a], [b]) => a.localeCompare(b));
  replace(el,
    h('h3', { id: 'usage-title' }, `Usage ${u.period}`),
    h('form', {
      class: 'inline', 'aria-label': 'Usage period',
      onsubmit: onSubmit(alert, async () => usage(ctx, el, base, input.value.trim())),
    }, field('Period (YYYY-MM or YYYY-MM-DD)', input), h('button', { type: 'submit' }, 'Show usage')),
    table('Usage', ['Metric', 'Quantity'], metrics.map(([k, v]) => [k, String(v)]), 'No usage in this period.'),
    alert.el);
}

function invoiceTable(caption, inv) {
  return table(caption, ['Line', 'Model', 'Metric', 'Quantity', 'Amount'],
    [...inv.lines.map((l) => [l.name, l.model, l.metric ?? '—', String(l.quantity), money(l.amount, inv.currency)]),
      [h('strong', {}, 'Total'), '', '', '', h('strong', { 'data-testid': 'invoice-total' }, money(inv.total, inv.currency))]]);
}

async function invoices(ctx, el, base, note = null) {
  const { api } = ctx;
  const [preview, issued] = await Promise.all([api.get(`${base}/invoices/preview`), api.all(`${base}/invoices`)]);
  const alert = alertBox();
  const closed = h('p', { role: 'status', 'aria-label': 'Closed invoice' }, note ?? '');
  const period = h('input', { name: 'period', value: previousMonth(preview.period), pattern: '[0-9]{4}-[0-9]{2}', required: true, class: 'narrow' });
  replace(el,
    h('h3', { id: 'invoices-title' }, 'Invoices'),
    h('div', { class: 'row' },
      h('div', { 'aria-label': 'Invoice preview', role: 'region' },
        h('h4', {}, `Preview of ${preview.period} (running)`),
        invoiceTable('Invoice preview', preview)),
      h('div', {},
        h('h4', {}, 'Close a period'),
        !ctx.can('billing.close') ? h('p', { class: 'muted' }, 'Closing a period is not allowed for this credential.') : h('form', {
          class: 'inline', 'aria-label': 'Close a period',
          onsubmit: onSubmit(alert, async () => {
            const inv = await api.post(`${base}/invoices`, { period: period.value.trim() });
            await invoices(ctx, el, base, `Invoice ${inv.number} issued for ${inv.period}: ${money(inv.total, inv.currency)}`);
          }),
        }, field('Month (YYYY-MM)', period), h('button', { type: 'submit' }, 'Close period')),
        alert.el, closed)),
    table('Issued invoices', ['Number', 'Period', 'Total', 'Closed'], issued.map((i) =>
      [String(i.number), i.period, money(i.total, i.currency), utc(Date.parse(i.closed_at))]), 'No invoices issued.'));
}
