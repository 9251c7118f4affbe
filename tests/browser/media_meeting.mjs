// Three people in a meeting (tests/test_media_browser.py).
// input: {http, room, users: [{id, token, name} x 3]}
// Each opens the meeting grid (camera and microphone from Chromium's fake devices); each must
// receive the other two's video and audio with frames decoding; the first mutes the camera
// (frames stop at the others, then resume on unmute), shares the screen (a new video appears
// at the others and decodes); the third leaves (its tile and tracks go at the others).

import { scenario } from './harness.mjs';
import { signIn } from './web_ui.mjs';
import { openView, progress, trackIdsOf, untilDecoding } from './media_ui.mjs';

await scenario(async (h) => {
  const { http, room, users } = h.input;
  const [alice, bob, carol] = users;
  const pages = {};
  for (const u of users) {
    pages[u.id] = await h.newPage(u.name);
    await signIn(pages[u.id], http, u.token);
    await openView(pages[u.id], 'meeting', room);
  }
  const out = { received: {}, muted: {}, unmuted: {}, screen: {}, afterLeave: {} };

  // Everyone gets the other two's camera and microphone, decoding.
  for (const u of users) {
    const page = pages[u.id];
    const ids = [];
    for (const o of users.filter((x) => x !== u)) {
      const tile = page.locator(`li[data-user="${o.id}"]`);
      await tile.locator('video[data-source="camera"]').waitFor({ timeout: 20_000 });
      await tile.locator('audio[data-source="microphone"]').waitFor({ state: 'attached', timeout: 20_000 });
      ids.push(...(await trackIdsOf(page, o.id)));
    }
    out.received[u.name] = { ids, progress: await untilDecoding(page, ids) };
  }
  await h.shot(pages[alice.id], 'alice-grid');

  // Alice mutes her camera: Bob and Carol see it muted, and its frames stop.
  const aliceCam = (await trackIdsOf(pages[bob.id], alice.id, 'camera'))[0];
  await pages[alice.id].getByRole('button', { name: 'Mute camera' }).click();
  for (const u of [bob, carol]) {
    const page = pages[u.id];
    await page.locator(`li[data-user="${alice.id}"] video[data-muted="true"]`).waitFor();
    await page.waitForTimeout(600); // what was in flight when the SFU stopped forwarding
    const p = await progress(page, 1_500);
    out.muted[u.name] = { camera: p[aliceCam], others: p };
  }
  await pages[alice.id].getByRole('button', { name: 'Unmute camera' }).click();
  for (const u of [bob, carol]) {
    const page = pages[u.id];
    await page.locator(`li[data-user="${alice.id}"] video[data-muted="false"][data-source="camera"]`).waitFor();
    out.unmuted[u.name] = (await untilDecoding(page, [aliceCam]))[aliceCam];
  }

  // Alice shares her screen (Chromium's fake capture): a screen video appears and decodes.
  await pages[alice.id].getByRole('button', { name: 'Share screen' }).click();
  for (const u of [bob, carol]) {
    const page = pages[u.id];
    await page.locator(`li[data-user="${alice.id}"] video[data-source="screen"]`).waitFor({ timeout: 20_000 });
    const [screenId] = await trackIdsOf(page, alice.id, 'screen');
    out.screen[u.name] = { id: screenId, progress: (await untilDecoding(page, [screenId]))[screenId] };
  }
  await h.shot(pages[bob.id], 'bob-sees-screen');

  // Carol leaves: her tile and tracks go at Alice and Bob.
  const carolTracks = await trackIdsOf(pages[alice.id], carol.id);
  await pages[carol.id].getByRole('button', { name: 'Leave the meeting' }).click();
  for (const u of [alice, bob]) {
    const page = pages[u.id];
    await page.locator(`li[data-user="${carol.id}"]`).waitFor({ state: 'detached', timeout: 15_000 });
    const p = await progress(page, 500);
    out.afterLeave[u.name] = { carolTracks, stillReceived: carolTracks.filter((id) => id in p), tracks: Object.keys(p).length };
  }
  out.pageErrors = h.pageErrors;
  return out;
});
