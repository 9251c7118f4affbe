// Steps on the GB6 web app that scenarios share: sign in, open a room, read what a page shows.
// Everything goes through what a user sees: roles, labels and visible text.

/** Open the app and sign in with `token`; resolves once the status says Connected. */
export async function signIn(page, http, token) {
  await page.goto(`${http}/app/`);
  await page.getByLabel('Access token').fill(token);
  await page.getByRole('button', { name: 'Sign in' }).click();
  await connected(page);
}

export async function connected(page) {
  await page.getByRole('status', { name: 'Connection status' }).filter({ hasText: 'Connected' }).waitFor();
}

export function messages(page) {
  return page.getByRole('log', { name: 'Messages' }).getByRole('listitem');
}

/** The message item that shows `text`. */
export function message(page, text) {
  return messages(page).filter({ has: page.locator('p.text', { hasText: text }) });
}

/** Wait until a message with `text` is shown (and sent: not pending). */
export async function seeMessage(page, text) {
  await message(page, text).and(page.locator('li[data-seq]')).first().waitFor();
}

/** The texts of the shown messages, in order (`[deleted]` for a deleted one). */
export async function messageTexts(page) {
  return page.getByRole('log', { name: 'Messages' }).evaluate((log) =>
    [...log.querySelectorAll('li')].map((li) =>
      li.querySelector('.deleted') ? '[deleted]' : (li.querySelector('p.text')?.textContent ?? '')));
}

/** Wait until `fn(texts)` holds for the shown message texts; returns them. */
export async function waitForTexts(page, fn, what, timeoutMs = 10_000) {
  const deadline = Date.now() + timeoutMs;
  let texts = [];
  while (Date.now() < deadline) {
    texts = await messageTexts(page);
    if (fn(texts)) return texts;
    await page.waitForTimeout(50);
  }
  throw new Error(`${what}: the page shows ${JSON.stringify(texts)}`);
}

/** Type into the composer and send with Enter. */
export async function send(page, text) {
  await page.getByLabel('Message', { exact: true }).fill(text);
  await page.getByLabel('Message', { exact: true }).press('Enter');
}
