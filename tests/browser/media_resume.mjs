// The SDK's MediaSession rejoins after its socket reconnects (tests/test_media_resume.py).
// input: {http, room, alice: {id, token, name}, bob: {id, token, name}}
//
// Alice and Bob open the meeting grid (Chromium's fake camera and microphone). Alice's page
// reaches the node through a WebSocket route of ours (page.routeWebSocket), so the test cuts
// her connection like a network would; the server ends her participant with the socket. Her
// SDK reconnects, joins the media again, republishes the same camera and microphone and
// resubscribes: both see the other's video decoding again. The room is being recorded from
// before Alice joins: her session knows it from each join's answer (no event told her).

import { scenario } from './harness.mjs';
import { signIn } from './web_ui.mjs';
import { openView, trackIdsOf, untilDecoding } from './media_ui.mjs';

await scenario(async (h) => {
  const { http, room, alice, bob } = h.input;
  const a = await h.newPage('alice');
  const b = await h.newPage('bob');
  const net = { live: [], connections: 0 };
  await a.routeWebSocket(/\/v1\/ws$/, (ws) => {
    const server = ws.connectToServer();
    const conn = { ws, server };
    net.connections++;
    net.live.push(conn);
    ws.onClose(() => server.close());
    server.onClose((code, reason) => ws.close({ code, reason }));
  });
  for (const [page, u] of [[a, alice], [b, bob]]) {
    await signIn(page, http, u.token);
    await openView(page, 'meeting', room);
  }
  const camera = async (page, user) => {
    const tile = page.locator(`li[data-user="${user.id}"]`);
    await tile.locator('video[data-source="camera"]').waitFor({ timeout: 20_000 });
    const [id] = await trackIdsOf(page, user.id, 'camera');
    return { id, progress: (await untilDecoding(page, [id]))[id] };
  };
  const session = (page) => page.evaluate(() => {
    const m = document.querySelector('[data-media-session]').gb6Media;
    return {
      participant: m.participant, state: m.state, local: [...m.local.keys()], recording: m.recording,
    };
  });
  const before = {
    aliceSees: await camera(a, bob), bobSees: await camera(b, alice), alice: await session(a),
  };
  await h.shot(a, 'before');

  // Cut Alice's socket: the node ends her media; the SDK reconnects at once.
  const states = a.evaluate(() => new Promise((resolve) => {
    const m = document.querySelector('[data-media-session]').gb6Media;
    const seen = [];
    const off = m.on('state', ({ state }) => {
      seen.push(state);
      if (state === 'connected' && seen.includes('reconnecting')) { off(); resolve(seen); }
    });
  }));
  for (const conn of net.live.splice(0)) {
    conn.ws.close({ code: 4000, reason: 'test: network cut' });
    conn.server.close();
  }
  // Bob sees Alice's old participant go, then her republished camera, decoding.
  await b.locator(`video[data-track-id="${before.bobSees.id}"]`).waitFor({ state: 'detached', timeout: 15_000 });
  const after = {
    states: await states, bobSees: await camera(b, alice), aliceSees: await camera(a, bob), alice: await session(a),
  };
  await h.shot(a, 'after');
  return { before, after, connections: net.connections, pageErrors: h.pageErrors };
});
