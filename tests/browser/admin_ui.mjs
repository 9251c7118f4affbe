// Steps on the GB6 admin console (/admin/) that scenarios share: sign in, find a section, read a
// quota bar or a table. Everything goes through what a user sees: roles, labels and text.

/** Open the console and sign in with `credential`; resolves once the sections are shown. */
export async function signIn(page, http, credential) {
  await page.goto(`${http}/admin/`);
  await page.getByLabel('Admin credential').fill(credential);
  await page.getByRole('button', { name: 'Sign in' }).click();
  await page.getByRole('navigation', { name: 'Sections' }).waitFor();
}

/** Wait until the view has finished loading (the router marks it busy meanwhile). */
export async function settled(page) {
  await page.locator('#root > .view:not([aria-busy])').waitFor();
}

/** The text rows of the table named `caption` (cells trimmed). */
export async function rows(page, caption) {
  const tbl = page.getByRole('table', { name: caption, exact: true });
  await tbl.waitFor();
  return tbl.locator('tbody tr').evaluateAll((trs) =>
    trs.map((tr) => [...tr.querySelectorAll('td')].map((td) => td.textContent.trim())));
}

/** A quota bar: `{level, text}`. */
export async function quota(page, resource) {
  const bar = page.getByRole('meter', { name: `${resource} quota` });
  return { level: await bar.getAttribute('data-level'), text: await bar.getAttribute('aria-valuetext') };
}
