// Organizations: the tree the credential reaches (side), and one organization (main): rename,
// child organizations, members (add, role, tokens, remove), instances (create).

import { MAX_ITEMS, seg } from '../api.js';
import { action, alertBox, field, h, onSubmit, replace, select, table } from '../dom.js';
import { forest, utc } from '../model.js';

const ORG_ROLES = ['owner', 'admin', 'member'];

/** Every org the credential sees: the roots it is shown, then their descendants (bounded). */
async function loadOrgs(api) {
  const orgs = await api.all('/v1/orgs');
  for (let i = 0; i < orgs.length && orgs.length < MAX_ITEMS; i++) {
    orgs.push(...await api.all(`/v1/orgs/${seg(orgs[i].id)}/children`));
  }
  return orgs.slice(0, MAX_ITEMS);
}

function treeList(nodes, selected) {
  return h('ul', {}, nodes.map((n) => h('li', {},
    h('a', { href: `#/orgs/${seg(n.org.id)}`, 'aria-current': n.org.id === selected ? 'page' : null }, n.org.name),
    n.children.length ? treeList(n.children, selected) : null)));
}

/** "Delete organization", which reveals "Confirm delete" (no modal dialogs: they block tests
 * and assistive tools alike); the server refuses an org with children or live instances. */
function deleteButtons(alert, remove) {
  const confirm = action('Confirm delete', alert, remove, { class: 'danger', hidden: true });
  const ask = h('button', {
    type: 'button', class: 'danger',
    onclick: () => { ask.hidden = true; confirm.hidden = false; confirm.focus(); },
  }, 'Delete organization');
  return [ask, confirm];
}

export async function orgsView(ctx, view, selected) {
  const { api } = ctx;
  let orgs = [];
  let refusal = null;
  try {
    orgs = await loadOrgs(api);
  } catch (err) {
    if (err.code !== 'forbidden') throw err;
    refusal = err; // an instance-scoped key, say: the other sections may still serve it
  }
  if (!ctx.current()) return;
  const alert = alertBox();
  const name = h('input', { name: 'name', required: true, maxlength: 200 });
  const side = h('aside', { class: 'side' },
    h('nav', { 'aria-label': 'Organization tree' },
      h('h2', {}, 'Organizations'),
      orgs.length ? treeList(forest(orgs), selected)
        : h('p', { class: 'muted' }, refusal ? `${refusal.code}: ${refusal.message}. ` : 'No organizations. ',
          'See ', h('a', { href: '#/instances' }, 'Instances'), '.')),
    ctx.me.kind !== 'operator' ? null : h('form', { // roots are the operator's
      class: 'stack', 'aria-label': 'New root organization',
      onsubmit: onSubmit(alert, async () => {
        const org = await api.post('/v1/orgs', { name: name.value.trim() });
        ctx.go(`#/orgs/${seg(org.id)}`);
      }),
    },
    h('h3', {}, 'New root organization'),
    field('Organization name', name),
    h('button', { type: 'submit' }, 'Create organization'),
    alert.el));
  const main = h('section', { class: 'main' });
  replace(view, h('div', { class: 'layout' }, side, main));
  if (selected) await orgDetail(ctx, main, selected);
  else replace(main, h('p', { class: 'muted' }, 'Choose an organization.'));
}

async function orgDetail(ctx, main, id) {
  const { api } = ctx;
  const base = `/v1/orgs/${seg(id)}`;
  const [org, members, instances, plans] = await Promise.all([
    api.get(base), api.all(`${base}/members`), api.all(`${base}/instances`), api.all('/v1/plans'),
  ]);
  if (!ctx.current()) return;
  const keys = h('section', { 'aria-labelledby': 'keys-title' });

  // rename, child
  const renameAlert = alertBox();
  const newName = h('input', { name: 'name', required: true, maxlength: 200, value: org.name });
  const childAlert = alertBox();
  const childName = h('input', { name: 'name', required: true, maxlength: 200 });

  // members
  const memberAlert = alertBox();
  const memberName = h('input', { name: 'name', required: true, maxlength: 200 });
  const memberRole = select({ name: 'role' }, ORG_ROLES, 'member');
  const tokenOut = h('output', { 'aria-label': 'Issued member token', class: 'secret' });
  const can = ctx.can;
  const memberRows = members.map((m) => [
    m.name,
    !can('org.members') ? m.role : select({
      'aria-label': `Role of ${m.name}`,
      onchange: async (ev) => {
        memberAlert.clear();
        try {
          await api.patch(`${base}/members/${seg(m.id)}`, { role: ev.target.value });
        } catch (err) {
          memberAlert.show(err);
          ev.target.value = m.role;
        }
      },
    }, ORG_ROLES, m.role),
    utc(Date.parse(m.created_at)),
    !can('org.members') ? '' : h('span', { class: 'actions' },
      action('Issue token', memberAlert, async () => {
        const t = await api.post(`${base}/members/${seg(m.id)}/tokens`, {});
        tokenOut.textContent = `${m.name}: ${t.token}`;
      }, { 'aria-label': `Issue a token for ${m.name}` }),
      action('Remove', memberAlert, async () => {
        await api.delete(`${base}/members/${seg(m.id)}`);
        ctx.refresh();
      }, { 'aria-label': `Remove ${m.name}` })),
  ]);

  // instances
  const instAlert = alertBox();
  const instName = h('input', { name: 'name', required: true, maxlength: 200 });
  const instPlan = select({ name: 'plan' }, plans.map((p) => p.name), 'free');
  const instRegion = h('input', { name: 'region', maxlength: 64, placeholder: 'the node\'s' });
  const instRows = instances.map((i) => [
    h('a', { href: `#/instances/${seg(i.id)}` }, i.name), i.plan, i.region,
    h('span', { class: `badge status-${i.status}` }, i.status),
  ]);

  replace(main,
    h('h2', {}, org.name),
    h('p', { class: 'muted' }, `Organization ${org.id}`,
      org.parent ? [' · parent ', h('a', { href: `#/orgs/${seg(org.parent)}` }, org.parent)] : ' · root',
      ` · created ${utc(Date.parse(org.created_at))}`),
    !can('org.write') ? null : h('div', { class: 'row' },
      h('form', {
        class: 'stack', 'aria-label': 'Rename organization',
        onsubmit: onSubmit(renameAlert, async () => {
          await api.patch(base, { name: newName.value.trim() });
          ctx.refresh();
        }),
      }, field('New name', newName), h('button', { type: 'submit' }, 'Rename'), renameAlert.el),
      h('form', {
        class: 'stack', 'aria-label': 'New child organization',
        onsubmit: onSubmit(childAlert, async () => {
          const child = await api.post('/v1/orgs', { name: childName.value.trim(), parent: id });
          ctx.go(`#/orgs/${seg(child.id)}`);
        }),
      }, field('Child organization name', childName), h('button', { type: 'submit' }, 'Create child organization'), childAlert.el),
      h('div', { class: 'stack' }, deleteButtons(renameAlert, async () => {
        await api.delete(base);
        ctx.go(org.parent ? `#/orgs/${seg(org.parent)}` : '#/orgs');
      }))),

    h('section', { 'aria-labelledby': 'members-title' },
      h('h3', { id: 'members-title' }, 'Members'),
      table('Members', ['Name', 'Role', 'Created', 'Actions'], memberRows, 'No members.'),
      tokenOut,
      !can('org.members') ? null : h('form', {
        class: 'inline', 'aria-label': 'Add member',
        onsubmit: onSubmit(memberAlert, async () => {
          await api.post(`${base}/members`, { name: memberName.value.trim(), role: memberRole.value });
          ctx.refresh();
        }),
      }, field('Member name', memberName), field('Member role', memberRole), h('button', { type: 'submit' }, 'Add member')),
      memberAlert.el),

    h('section', { 'aria-labelledby': 'instances-title' },
      h('h3', { id: 'instances-title' }, 'Instances'),
      table('Instances', ['Name', 'Plan', 'Region', 'Status'], instRows, 'No instances.'),
      !can('instance.create') ? null : h('form', {
        class: 'inline', 'aria-label': 'New instance',
        onsubmit: onSubmit(instAlert, async () => {
          const inst = await api.post(`${base}/instances`, {
            name: instName.value.trim(), plan: instPlan.value, region: instRegion.value.trim() || null,
          });
          ctx.go(`#/instances/${seg(inst.id)}`);
        }),
      }, field('Instance name', instName), field('Plan', instPlan), field('Region', instRegion),
      h('button', { type: 'submit' }, 'Create instance')),
      instAlert.el),
    keys);
  try {
    await apiKeys(ctx, keys, base, instances);
  } catch (err) {
    const alert = alertBox();
    alert.show(err);
    replace(keys, h('h3', { id: 'keys-title' }, 'API keys'), alert.el);
  }
}

/** The permissions an API key may hold, as the API document declares them (one source). */
async function keyPermissions(api) {
  const doc = await api.get('/openapi.json');
  const body = doc.paths['/v1/orgs/{org}/api_keys'].post.requestBody.content['application/json'].schema;
  return [...body.properties.permissions.items.enum].sort();
}

async function apiKeys(ctx, el, base, instances) {
  const { api } = ctx;
  const [list, permissions] = await Promise.all([api.all(`${base}/api_keys`), keyPermissions(api)]);
  const alert = alertBox();
  const secret = h('output', { 'aria-label': 'New API key', class: 'secret' });
  const name = h('input', { name: 'name', required: true, maxlength: 200 });
  const scope = select({ name: 'instance' },
    [['', 'the whole organization'], ...instances.map((i) => [i.id, i.name])], '');
  const boxes = permissions.map((p) => h('input', { type: 'checkbox', name: 'permission', value: p }));
  const rows = list.map((k) => [
    k.name,
    k.instance ? (instances.find((i) => i.id === k.instance)?.name ?? k.instance) : 'organization',
    k.permissions.join(', '),
    k.expires_at ? utc(Date.parse(k.expires_at)) : 'never',
    k.revoked ? 'revoked' : 'active',
    k.revoked || !ctx.can('apikey.write') ? '' : action('Revoke', alert, async () => {
      await api.delete(`${base}/api_keys/${seg(k.id)}`);
      await apiKeys(ctx, el, base, instances);
    }, { 'aria-label': `Revoke ${k.name}` }),
  ]);
  replace(el,
    h('h3', { id: 'keys-title' }, 'API keys'),
    table('API keys', ['Name', 'Scope', 'Permissions', 'Expires', 'State', 'Actions'], rows, 'No API keys.'),
    secret,
    !ctx.can('apikey.write') ? null : h('form', {
      class: 'stack wide', 'aria-label': 'New API key',
      onsubmit: onSubmit(alert, async () => {
        const chosen = boxes.filter((b) => b.checked).map((b) => b.value);
        const key = await api.post(`${base}/api_keys`, { name: name.value.trim(), permissions: chosen, instance: scope.value || null });
        await apiKeys(ctx, el, base, instances);
        el.querySelector('output').textContent = key.secret; // shown once: the server keeps a digest
      }),
    },
    h('div', { class: 'inline' }, field('Key name', name), field('Key scope', scope)),
    h('fieldset', { class: 'perms' }, h('legend', {}, 'Permissions'),
      boxes.map((b) => h('label', { class: 'check' }, b, b.value))),
    h('button', { type: 'submit' }, 'Create API key')),
    alert.el);
}
