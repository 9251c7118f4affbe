// Room lists follow membership without polling, and "Read by" starts from room.reads
// (tests/test_room_events.py::test_web_app_follows_membership_and_reads).
// input: {http, alice: {id, token}, bob: {id, token}}
// Alice (two tabs) creates a room and adds Bob: it appears in Bob's list and in Alice's other
// tab with nobody refreshing. Bob reads Alice's message and leaves the page; Alice reloads and
// still sees "Read by" Bob (no receipt event comes after her reload). Alice leaves the room in
// one tab: it disappears from the other.

import { scenario } from './harness.mjs';
import { message, seeMessage, send, signIn } from './web_ui.mjs';

await scenario(async (h) => {
  const { http, alice, bob } = h.input;
  const a = await h.newPage('alice');
  const a2 = await h.newPage('alice-2');
  const b = await h.newPage('bob');
  await signIn(a, http, alice.token);
  await signIn(a2, http, alice.token);
  await signIn(b, http, bob.token);
  const out = {};
  const link = (page) => page.getByRole('navigation', { name: 'Rooms' }).getByRole('link', { name: 'Room events' });

  await a.getByLabel('Room name').fill('Room events');
  await a.getByRole('button', { name: 'Create room' }).click();
  await a.getByRole('heading', { name: 'Room events' }).waitFor();
  await link(a2).waitFor(); // the creator's other tab: room.added
  await a.getByLabel('User id to add').fill(bob.id);
  await a.getByRole('button', { name: 'Add member' }).click();
  await link(b).waitFor(); // Bob's list: room.added, no refresh
  out.bobListed = true;

  await link(b).click();
  await b.getByRole('heading', { name: 'Room events' }).waitFor();
  await send(a, 'hello bob');
  await seeMessage(b, 'hello bob');
  await message(a, 'hello bob').getByText(`Read by ${bob.id}`).waitFor(); // the live receipt
  await b.close();

  await a.reload();
  await a.getByRole('heading', { name: 'Room events' }).waitFor();
  await seeMessage(a, 'hello bob');
  await message(a, 'hello bob').getByText(`Read by ${bob.id}`).waitFor(); // from room.reads
  out.readByAfterReload = true;
  await h.shot(a, 'alice-read-by-after-reload');

  await a.getByRole('button', { name: 'Leave room' }).click();
  await link(a2).waitFor({ state: 'detached' }); // room.removed in the other tab
  out.removedInOtherTab = true;
  out.pageErrors = h.pageErrors;
  return out;
});
