// Steps on the media views that the media scenarios share (meeting grid, live viewer).
// The session's stats come from getStats through the view's MediaSession (`gb6Media` on the
// view's section): per received track id, framesDecoded (video) or totalSamplesReceived (audio).

/** Open `#/<view>/<room>` in a signed-in page. */
export async function openView(page, view, room) {
  await page.evaluate(([v, r]) => { location.hash = `#/${v}/${encodeURIComponent(r)}`; }, [view, room]);
  await page.locator('[data-media-session]').waitFor();
}

export function stats(page) {
  return page.evaluate(() => document.querySelector('[data-media-session]').gb6Media.stats());
}

/** The decoded amount of a track's stats entry: frames for video, samples for audio. */
export function decoded(s) {
  return s ? (s.kind === 'video' ? s.framesDecoded : s.totalSamplesReceived) : 0;
}

/** How much each received track decoded over `ms`: {trackId: {kind, delta, total}}. */
export async function progress(page, ms) {
  const a = await stats(page);
  await page.waitForTimeout(ms);
  const b = await stats(page);
  const out = {};
  for (const [id, s] of Object.entries(b)) {
    out[id] = { kind: s.kind, delta: decoded(s) - decoded(a[id]), total: decoded(s), concealed: s.concealedSamples };
  }
  return out;
}

/** Wait until every track in `ids` decodes (rising over a short window); returns the last view. */
export async function untilDecoding(page, ids, timeoutMs = 20_000) {
  const deadline = Date.now() + timeoutMs;
  let last = {};
  while (Date.now() < deadline) {
    last = await progress(page, 700);
    if (ids.every((id) => last[id] && last[id].delta > 0)) return last;
  }
  throw new Error(`not decoding within ${timeoutMs} ms: ${JSON.stringify({ ids, last })}`);
}

/** The track ids shown in the tile of `user` (optionally of one source). */
export function trackIdsOf(page, user, source = null) {
  const sel = source ? `[data-source="${source}"]` : '[data-track-id]';
  return page.locator(`li[data-user="${user}"] ${sel}`).evaluateAll((els) => els.map((e) => e.dataset.trackId));
}
