// Two users chat in the web app (tests/test_web_client.py::test_two_users_chat).
// input: {http, alice: {id, token}, bob: {id, token}}
// Alice creates a room and adds Bob; they chat both ways, with typing, receipts, edit,
// reaction and delete; Bob reloads and sees the history; Alice sees an unread count; Alice
// sends a file and Bob downloads it.

import fs from 'node:fs';
import { scenario } from './harness.mjs';
import { connected, message, messageTexts, seeMessage, send, signIn, waitForTexts } from './web_ui.mjs';

await scenario(async (h) => {
  const { http, alice, bob } = h.input;
  const a = await h.newPage('alice');
  const b = await h.newPage('bob');
  await signIn(a, http, alice.token);
  await signIn(b, http, bob.token);
  const out = {};

  // Alice creates the room, then adds Bob from the room's header.
  await a.getByLabel('Room name').fill('Project X');
  await a.getByRole('button', { name: 'Create room' }).click();
  await a.getByRole('heading', { name: 'Project X' }).waitFor();
  await a.getByLabel('User id to add').fill(bob.id);
  await a.getByRole('button', { name: 'Add member' }).click();
  await a.getByLabel('User id to add').and(a.locator(':placeholder-shown')).waitFor();

  // Bob finds it in his list and opens it.
  await b.getByRole('button', { name: 'Refresh rooms' }).click();
  await b.getByRole('navigation', { name: 'Rooms' }).getByRole('link', { name: 'Project X' }).click();
  await b.getByRole('heading', { name: 'Project X' }).waitFor();
  out.roomUrl = b.url();

  // Typing: Alice types, Bob sees it; then she sends and Bob sees the message.
  await a.getByLabel('Message', { exact: true }).fill('hello bob');
  await b.getByRole('status', { name: 'Typing' }).filter({ hasText: `${alice.id} is typing` }).waitFor();
  out.typingShown = await b.getByRole('status', { name: 'Typing' }).textContent();
  await a.getByLabel('Message', { exact: true }).press('Enter');
  await seeMessage(b, 'hello bob');
  await b.getByRole('status', { name: 'Typing' }).filter({ hasText: /^$/ }).waitFor();

  // Bob answers; Alice sees it live.
  await send(b, 'hi alice');
  await seeMessage(a, 'hi alice');

  // Receipts: each has the other's message on screen, so each is "read by" the other.
  await message(a, 'hi alice').getByText(`Read by ${bob.id}`).waitFor();
  await message(b, 'hi alice').getByText(`Read by ${alice.id}`).waitFor();
  await h.shot(a, 'alice-chat');

  // Alice edits her message; Bob sees the new text, marked edited.
  await message(a, 'hello bob').getByRole('button', { name: 'Edit' }).click();
  await a.getByLabel('Edit message').fill('hello bob, welcome');
  await a.getByRole('button', { name: 'Save' }).click();
  await message(b, 'hello bob, welcome').getByText('(edited)').waitFor();

  // Bob reacts; Alice sees the count.
  await message(b, 'hello bob, welcome').getByRole('button', { name: 'React 👍' }).click();
  await message(a, 'hello bob, welcome').getByLabel('Reactions').getByText('👍 1').waitFor();

  // Alice sends a message and deletes it; Bob sees it deleted.
  await send(a, 'oops');
  await seeMessage(b, 'oops');
  await message(a, 'oops').getByRole('button', { name: 'Delete' }).click();
  await waitForTexts(b, (t) => t.at(-1) === '[deleted]', 'Bob sees the delete');
  out.bobLive = await messageTexts(b);
  await h.shot(b, 'bob-chat');

  // History after reload: Bob is still signed in (sessionStorage) and back in the room.
  await b.reload();
  await connected(b);
  await b.getByRole('heading', { name: 'Project X' }).waitFor();
  out.bobAfterReload = await waitForTexts(b, (t) => t.length >= 3, 'Bob sees the history');
  out.bobEditedAfterReload = await message(b, 'hello bob, welcome').getByText('(edited)').count();
  await h.shot(b, 'bob-after-reload');

  // Unread: Alice leaves the room's view; Bob writes twice; Alice's list shows 2 unread.
  await a.goto(`${http}/app/#/`);
  await a.getByRole('heading', { name: 'Welcome' }).waitFor();
  await send(b, 'are you there?');
  await seeMessage(b, 'are you there?');
  await send(b, 'ping');
  await seeMessage(b, 'ping');
  const link = a.getByRole('navigation', { name: 'Rooms' }).getByRole('link', { name: /Project X/ });
  await link.getByText('2 unread').waitFor();
  out.unreadShown = await link.textContent();
  await h.shot(a, 'alice-unread');
  await link.click();
  await seeMessage(a, 'ping');
  await link.getByText(/unread/).waitFor({ state: 'detached' });
  out.aliceFinal = await messageTexts(a);

  // Files: Alice attaches one (uploaded over HTTP, sent as a message); Bob downloads it.
  await a.getByLabel('Attach a file').setInputFiles({
    name: 'notes.txt', mimeType: 'text/plain', buffer: Buffer.from('file from alice\n'),
  });
  await seeMessage(b, 'notes.txt');
  const [download] = await Promise.all([
    b.waitForEvent('download'),
    message(b, 'notes.txt').getByRole('button', { name: 'Download notes.txt' }).click(),
  ]);
  out.downloadName = download.suggestedFilename();
  out.downloaded = fs.readFileSync(await download.path(), 'utf8');
  out.pageErrors = h.pageErrors;
  return out;
});
