// The SDK resumes without gaps (tests/test_web_client.py::test_reconnect_resumes_without_gaps).
// input: {http, alice: {id, token}, room: {id, name}, backlog: n}
//
// Alice's page reaches the node through a WebSocket route of ours (page.routeWebSocket), so the
// test can cut her connection and hold her reconnects like a dead network would. Steps:
//   open     Alice scrolls back through the room's backlog (history paging)
//   cut      (command) her socket is closed and new ones are held; she sends a message offline
//   restore  (command) held sockets reach the node; what was missed and her offline message
//            appear, each once, in order
//   then     the `ok` of her next send is swallowed and the socket cut: the SDK resends under
//            the same cid and the message appears once.

import { scenario } from './harness.mjs';
import { connected, messageTexts, seeMessage, send, signIn, waitForTexts } from './web_ui.mjs';

await scenario(async (h) => {
  const { http, alice, room, backlog } = h.input;
  const a = await h.newPage('alice');
  const net = { blocked: false, held: [], live: [], swallowOk: false, swallowed: 0, connections: 0, sends: [] };

  const openToServer = (conn) => {
    conn.server = conn.ws.connectToServer();
    net.connections++;
    net.live.push(conn);
    conn.server.onMessage((m) => {
      if (net.swallowOk) {
        const f = JSON.parse(m);
        if (f.op === 'ok' && conn.sendIds.has(f.re)) {
          // The send is durable on the node, but its answer never reaches the page.
          net.swallowOk = false;
          net.swallowed++;
          cut(conn);
          return;
        }
      }
      conn.ws.send(m);
    });
    conn.server.onClose((code, reason) => conn.ws.close({ code, reason }));
    for (const m of conn.buf.splice(0)) upstream(conn, m);
  };
  const upstream = (conn, m) => {
    try {
      const f = JSON.parse(m);
      if (f.op === 'send') {
        net.sends.push({ cid: f.cid, text: f.body?.text });
        conn.sendIds.add(f.id);
      }
    } catch { /* not JSON: the node answers it */ }
    conn.server.send(m);
  };
  const cut = (conn) => {
    net.live = net.live.filter((c) => c !== conn);
    conn.ws.close({ code: 4000, reason: 'test: network cut' });
    conn.server?.close();
  };
  await a.routeWebSocket(/\/v1\/ws$/, (ws) => {
    const conn = { ws, server: null, buf: [], sendIds: new Set() };
    ws.onMessage((m) => (conn.server ? upstream(conn, m) : conn.buf.push(m)));
    ws.onClose(() => conn.server?.close());
    if (net.blocked) net.held.push(conn); // open for the page, but nothing reaches the node
    else openToServer(conn);
  });

  await signIn(a, http, alice.token);
  await a.getByRole('navigation', { name: 'Rooms' }).getByRole('link', { name: room.name }).click();
  await seeMessage(a, `m${backlog}`);
  const firstPage = await messageTexts(a);
  await a.getByRole('button', { name: 'Load older messages' }).click();
  const scrolledBack = await waitForTexts(a, (t) => t.length === backlog, 'the whole backlog');
  await a.getByRole('button', { name: 'Load older messages' }).waitFor({ state: 'hidden' });
  h.emit({ step: 'open' });

  const status = a.getByRole('status', { name: 'Connection status' });
  let cmd = await h.command();
  if (cmd.do !== 'cut') throw new Error(`expected cut, got ${JSON.stringify(cmd)}`);
  net.blocked = true;
  for (const conn of [...net.live]) cut(conn);
  await status.filter({ hasText: 'Reconnecting' }).waitFor();
  await send(a, 'sent while offline');
  await a.getByRole('log', { name: 'Messages' }).getByText('sending…').waitFor();
  await h.shot(a, 'offline');
  h.emit({ step: 'cut' });

  cmd = await h.command();
  if (cmd.do !== 'restore') throw new Error(`expected restore, got ${JSON.stringify(cmd)}`);
  net.blocked = false;
  for (const conn of net.held.splice(0)) openToServer(conn);
  await connected(a);
  await seeMessage(a, 'sent while offline');
  const afterResume = await waitForTexts(a, (t) => t.length >= backlog + cmd.missed + 1, 'the resume');
  await h.shot(a, 'resumed');

  // Lose the answer to a send: the SDK resends it under its cid after reconnecting.
  net.swallowOk = true;
  await send(a, 'ack lost');
  await seeMessage(a, 'ack lost');
  await connected(a);
  const final = await waitForTexts(a, (t) => t.at(-1) === 'ack lost', 'the resent message');
  await h.shot(a, 'final');
  return {
    firstPage, scrolledBack, afterResume, final,
    swallowed: net.swallowed,
    connections: net.connections,
    ackLostSends: net.sends.filter((s) => s.text === 'ack lost'),
    pageErrors: h.pageErrors,
  };
});
