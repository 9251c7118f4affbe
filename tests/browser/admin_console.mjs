// The admin console driven like an operator would: sign in, create an organization, an instance
// on a priced plan and a user (and a member who signs in with their own token), then, after the
// Python test has sent messages with the user's token, read quotas, usage and the invoice
// preview, suspend the instance and find all of it in the audit log.
//
// input: {http, admin_token, other_org}; emits {step: 'user', token, instance, user} and waits
// for a command before reading usage.

import { scenario } from './harness.mjs';
import { quota, rows, settled, signIn } from './admin_ui.mjs';

await scenario(async (h) => {
  const { http, admin_token: adminToken } = h.input;
  const page = await h.newPage('operator');

  // A wrong credential is refused on the sign-in form, nothing else shown.
  await page.goto(`${http}/admin/`);
  await page.getByLabel('Admin credential').fill('not-a-token');
  await page.getByRole('button', { name: 'Sign in' }).click();
  const refused = await page.getByRole('alert').filter({ hasText: 'unauthorized' }).textContent();

  await signIn(page, http, adminToken);
  const who = await page.getByRole('status', { name: 'Signed in as' }).textContent();

  // Organization (root), then an instance on the plan `team`, then a user with a token.
  await page.getByLabel('Organization name').fill('Acme');
  await page.getByRole('button', { name: 'Create organization' }).click();
  await page.getByRole('heading', { name: 'Acme', level: 2 }).waitFor();
  await settled(page);
  const tree = await page.getByRole('navigation', { name: 'Organization tree' }).getByRole('link').allTextContents();

  await page.getByLabel('Member name').fill('bob');
  await page.getByLabel('Member role').selectOption('admin');
  await page.getByRole('button', { name: 'Add member' }).click();
  await page.getByRole('button', { name: 'Issue a token for bob' }).click();
  await page.locator('output[aria-label="Issued member token"]', { hasText: 'gb6o_' }).waitFor();
  const bobToken = (await page.locator('output[aria-label="Issued member token"]').textContent()).replace(/^bob: /, '');
  await h.shot(page, 'organization');

  await page.getByLabel('Instance name').fill('acme-prod');
  await page.getByLabel('Plan').selectOption('team');
  await page.getByRole('button', { name: 'Create instance' }).click();
  await page.getByRole('heading', { name: 'acme-prod', level: 2 }).waitFor();
  await settled(page);
  const instance = page.url().split('#/instances/')[1];

  await page.getByLabel('User name').fill('alice');
  await page.getByRole('button', { name: 'Create user' }).click();
  await page.getByRole('button', { name: 'Issue a token for alice' }).click();
  const out = page.locator('output[aria-label="Issued user token"]', { hasText: 'gb6u_' });
  await out.waitFor();
  const token = await out.textContent();
  const users = await rows(page, 'Users');
  h.emit({ step: 'user', token, instance, user: users[0][2] });

  // The test has sent messages as alice: read quotas, usage and the invoice preview.
  await h.command();
  await page.reload();
  await page.getByRole('heading', { name: 'acme-prod', level: 2 }).waitFor();
  await settled(page);
  const quotas = {
    users: await quota(page, 'users'),
    messages: await quota(page, 'messages'),
    rooms: await quota(page, 'rooms'),
  };
  const usage = Object.fromEntries((await rows(page, 'Usage')).map(([k, v]) => [k, v]));
  const preview = await rows(page, 'Invoice preview');
  const total = await page.getByRole('region', { name: 'Invoice preview' }).getByTestId('invoice-total').textContent();

  // Closing the running month is refused, and the page says why.
  const month = (await page.getByRole('heading', { name: /^Preview of / }).textContent()).match(/\d{4}-\d{2}/)[0];
  await page.getByLabel('Month (YYYY-MM)').fill(month);
  await page.getByRole('button', { name: 'Close period' }).click();
  const closeError = await page.getByRole('region', { name: 'Invoices', exact: true })
    .getByRole('alert').filter({ hasText: 'conflict' }).textContent();

  // Suspend.
  await page.getByRole('button', { name: 'Suspend instance' }).click();
  await page.getByTestId('instance-status').filter({ hasText: 'suspended' }).waitFor();
  await settled(page);
  const status = await page.getByTestId('instance-status').textContent();
  const resumeShown = await page.getByRole('button', { name: 'Resume instance' }).isVisible();
  await h.shot(page, 'instance');

  // The audit log: everything, then filtered to the suspension.
  await page.getByRole('navigation', { name: 'Sections' }).getByRole('link', { name: 'Audit log' }).click();
  await page.getByRole('heading', { name: 'Audit log' }).waitFor();
  await settled(page);
  const audit = await rows(page, 'Audit records, newest first');
  await page.getByLabel('Action').fill('admin.suspend_instance');
  await page.getByRole('button', { name: 'Apply filters' }).click();
  await page.getByRole('status', { name: 'Audit records shown' }).filter({ hasText: '1 record' }).waitFor();
  const filtered = await rows(page, 'Audit records, newest first');
  await h.shot(page, 'audit');

  // Page through the whole audit log ten records at a time (the smallest page offered).
  // Each click changes the location hash, and the view is replaced on the `hashchange` that
  // follows it: `settled` right after a click can still see the view before. Wait for the new
  // one by what it shows (unfiltered; then a page of ten, with more older).
  await page.getByRole('link', { name: 'Clear filters' }).click();
  await page.waitForFunction(() => document.querySelector('#root > .view:not([aria-busy]) input[name="action"]')?.value === '');
  await page.getByLabel('Page size').selectOption('10');
  await page.getByRole('button', { name: 'Apply filters' }).click();
  await page.getByRole('status', { name: 'Audit records shown' }).filter({ hasText: /^10 records, more older$/ }).waitFor();
  const firstPage = (await rows(page, 'Audit records, newest first')).length;
  let pages = 1;
  while (await page.getByRole('button', { name: 'Older records' }).isVisible()) {
    const before = (await rows(page, 'Audit records, newest first')).length;
    await page.getByRole('button', { name: 'Older records' }).click();
    await page.waitForFunction((n) => document.querySelectorAll('tbody tr[data-seq]').length > n, before);
    pages += 1;
  }
  const allSeqs = await page.locator('tbody tr[data-seq]').evaluateAll((trs) => trs.map((tr) => Number(tr.dataset.seq)));

  // Bob, an admin of Acme, signs in with his own token: he sees Acme and nothing else.
  const bobPage = await h.newPage('bob');
  await signIn(bobPage, http, bobToken);
  await settled(bobPage);
  const bobWho = await bobPage.getByRole('status', { name: 'Signed in as' }).textContent();
  const bobSections = await bobPage.getByRole('navigation', { name: 'Sections' }).getByRole('link').allTextContents();
  const bobTree = await bobPage.getByRole('navigation', { name: 'Organization tree' }).getByRole('link').allTextContents();
  await bobPage.goto(`${http}/admin/#/orgs/${h.input.other_org}`);
  await bobPage.getByRole('heading', { name: 'Could not load this view' }).waitFor();
  const bobOther = await bobPage.getByRole('alert').first().textContent();

  // Bob adds Mia, a plain member, and issues her a token: she reads Acme and is offered no
  // change (GET /v1/me: org.read and the like, no org.write, org.members, instance.create).
  await bobPage.goto(`${http}/admin/#/orgs`);
  await bobPage.getByRole('navigation', { name: 'Organization tree' }).getByRole('link', { name: 'Acme' }).click();
  await bobPage.getByRole('heading', { name: 'Acme', level: 2 }).waitFor();
  await settled(bobPage);
  await bobPage.getByLabel('Member name').fill('mia');
  await bobPage.getByRole('button', { name: 'Add member' }).click();
  await bobPage.getByRole('button', { name: 'Issue a token for mia' }).click();
  const miaOut = bobPage.locator('output[aria-label="Issued member token"]', { hasText: 'gb6o_' });
  await miaOut.waitFor();
  const miaToken = (await miaOut.textContent()).replace(/^mia: /, '');
  const miaPage = await h.newPage('mia');
  await signIn(miaPage, http, miaToken);
  await settled(miaPage);
  const miaSections = await miaPage.getByRole('navigation', { name: 'Sections' }).getByRole('link').allTextContents();
  await miaPage.getByRole('navigation', { name: 'Organization tree' }).getByRole('link', { name: 'Acme' }).click();
  await miaPage.getByRole('heading', { name: 'Acme', level: 2 }).waitFor();
  await settled(miaPage);
  const miaMembers = (await rows(miaPage, 'Members')).map((r) => [r[0], r[1]]);
  const miaButtons = {};
  for (const name of ['Rename', 'Create child organization', 'Delete organization', 'Add member', 'Issue a token for bob', 'Create instance', 'Create organization']) {
    miaButtons[name] = await miaPage.getByRole('button', { name, exact: true }).count();
  }

  // An API key for the instance, made in the console: it reads the instance, not its users,
  // and is offered no action it may not take.
  await page.getByRole('navigation', { name: 'Sections' }).getByRole('link', { name: 'Organizations' }).click();
  await page.getByRole('navigation', { name: 'Organization tree' }).getByRole('link', { name: 'Acme' }).click();
  await page.getByRole('heading', { name: 'Acme', level: 2 }).waitFor();
  await settled(page);
  await page.getByLabel('Key name').fill('reader');
  await page.getByLabel('Key scope').selectOption({ label: 'acme-prod' });
  for (const p of ['instance.read', 'quota.read', 'audit.read']) await page.getByRole('checkbox', { name: p }).check();
  await page.getByRole('button', { name: 'Create API key' }).click();
  const keyOut = page.locator('output[aria-label="New API key"]', { hasText: 'gb6k_' });
  await keyOut.waitFor();
  const key = await keyOut.textContent();
  const keys = await rows(page, 'API keys');

  const keyPage = await h.newPage('key');
  await signIn(keyPage, http, key);
  await settled(keyPage);
  const keyWho = await keyPage.getByRole('status', { name: 'Signed in as' }).textContent();
  // Its first section is shown first; Organizations (no org.read) is not offered, and opened
  // by its address it is refused.
  const keySections = await keyPage.getByRole('navigation', { name: 'Sections' }).getByRole('link').allTextContents();
  const keyFirst = await keyPage.locator('#root h2').first().textContent();
  // A reload keeps the tab signed in (the credential is asked `GET /v1/me` again).
  await keyPage.reload();
  await keyPage.getByRole('navigation', { name: 'Sections' }).waitFor();
  const keyReloaded = await keyPage.getByRole('navigation', { name: 'Sections' }).getByRole('link').allTextContents();
  await keyPage.goto(`${http}/admin/#/orgs`);
  await keyPage.getByRole('navigation', { name: 'Organization tree' }).waitFor();
  const keyOrgs = await keyPage.getByRole('navigation', { name: 'Organization tree' }).textContent();
  await keyPage.getByRole('navigation', { name: 'Sections' }).getByRole('link', { name: 'Instances' }).click();
  await keyPage.getByRole('heading', { name: 'Instances', level: 2 }).waitFor();
  await settled(keyPage);
  const keyInstances = await rows(keyPage, 'Instances');
  await keyPage.getByRole('link', { name: 'acme-prod' }).click();
  await keyPage.getByRole('heading', { name: 'acme-prod', level: 2 }).waitFor();
  await settled(keyPage);
  const keyUsers = await keyPage.getByRole('region', { name: 'Users', exact: true }).getByRole('alert').textContent();
  const keyQuota = await quota(keyPage, 'users');
  // Actions it may not take are not offered (the API refuses them anyway: test_admin_api).
  const keyResume = await keyPage.getByRole('button', { name: 'Resume instance' }).count();
  const keyOverride = await keyPage.getByRole('button', { name: 'Set the users override' }).count();
  await h.shot(keyPage, 'api-key');

  return {
    keys, keyWho, miaSections, miaMembers, miaButtons, keySections, keyFirst, keyReloaded, bobSections, keyOrgs, keyInstances, keyUsers, keyQuota, keyResume, keyOverride,
    refused, who, tree, instance, users, quotas, usage, preview, total, month, closeError, status,
    resumeShown, audit, filtered, firstPage, pages, allSeqs, bobWho, bobTree, bobOther,
    pageErrors: h.pageErrors,
  };
});
