// Browser viewers of a live stream (tests/test_live.py). The host publishes over WHIP and many
// headless viewers watch from Python; this script adds browser viewers.
// input: {http, room, host, viewers: [{id, token, name}], expectViewers}
// Each page opens the live viewer, receives the host's video and audio (decoding), and shows
// the viewer count reaching `expectViewers`; the first sends a comment and a reaction, the
// second sees both.

import { scenario } from './harness.mjs';
import { seeMessage, signIn } from './web_ui.mjs';
import { openView, trackIdsOf, untilDecoding } from './media_ui.mjs';

await scenario(async (h) => {
  const { http, room, host, viewers, expectViewers } = h.input;
  const pages = [];
  for (const v of viewers) {
    const page = await h.newPage(v.name);
    await signIn(page, http, v.token);
    await openView(page, 'live', room);
    pages.push(page);
  }
  const out = { decoding: [], counts: [] };
  for (const page of pages) {
    const tile = page.locator(`li[data-user="${host}"]`);
    await tile.locator('video[data-source="camera"]').waitFor({ timeout: 20_000 });
    await tile.locator('audio').waitFor({ state: 'attached', timeout: 20_000 });
    const ids = await trackIdsOf(page, host);
    out.decoding.push(await untilDecoding(page, ids));
    // Viewers are counted, not shown: no go-live control, no tile of their own.
    out.goLiveHidden = await page.getByRole('button', { name: 'Go live' }).isHidden();
  }
  for (const page of pages) {
    const count = page.getByRole('status', { name: 'Viewers' });
    await count.filter({ hasText: `${expectViewers} watching` }).waitFor({ timeout: 20_000 });
    out.counts.push(await count.textContent());
  }
  await h.shot(pages[0], 'viewer');

  // Comments and reactions are the room's messages.
  await pages[0].getByLabel('Message', { exact: true }).fill('great stream!');
  await pages[0].getByLabel('Message', { exact: true }).press('Enter');
  await pages[0].getByRole('button', { name: 'Send ❤️' }).click();
  await seeMessage(pages[1], 'great stream!');
  await pages[1].getByRole('status', { name: 'Reactions' }).filter({ hasText: '❤️ 1' }).waitFor();
  out.reactions = await pages[1].getByRole('status', { name: 'Reactions' }).textContent();
  out.pageErrors = h.pageErrors;
  return out;
});
