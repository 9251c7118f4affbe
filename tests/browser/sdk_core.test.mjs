// The SDK's pure protocol core (edge/web/sdk/core.js) driven with strings, no socket:
// `node --test tests/browser/sdk_core.test.mjs` (tests/test_web_client.py runs it).

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Core, SUBSCRIPTION_LOST } from '../../edge/web/sdk/core.js';

function ready(core) {
  const hello = JSON.parse(core.connectionMade());
  assert.equal(hello.op, 'hello');
  const out = core.receive(JSON.stringify({
    op: 'ok', re: hello.id, user: { id: 'u1', name: 'al' }, session: 's', heartbeat_ms: 1000,
  }));
  assert.equal(out.type, 'hello');
  return out;
}

function drain(core) {
  const frames = [];
  for (let f = core.nextOutgoing(); f !== null; f = core.nextOutgoing()) frames.push(JSON.parse(f));
  return frames;
}

function ev(room, seq, extra = {}) {
  return JSON.stringify({ op: 'event', type: 'message', room, seq, ts: 1, sender: 'u2', cid: `c${seq}`, ...extra });
}

test('resume subscribes after the last delivered seq and drops what was seen', () => {
  const core = new Core('tok');
  ready(core);
  core.request('subscribe', { room: 'r', after: 0 });
  const [sub] = drain(core);
  assert.equal(core.receive(JSON.stringify({ op: 'ok', re: sub.id, room: 'r', head: 2 })).type, 'reply');
  for (const seq of [1, 2]) {
    const out = core.receive(ev('r', seq));
    assert.equal(out.seq, seq);
    core.delivered(out);
  }
  core.connectionLost();
  ready(core);
  const [resub] = drain(core);
  assert.deepEqual([resub.op, resub.room, resub.after], ['subscribe', 'r', 2]);
  assert.equal(core.receive(ev('r', 2)), null); // a repeat is dropped
  assert.equal(core.receive(ev('r', 3)).seq, 3);
  assert.equal(core.receive(ev('other', 9)), null); // not subscribed
});

test('an unanswered send is written again with the same cid; a once op fails', async () => {
  const core = new Core('tok');
  ready(core);
  const sendId = core.request('send', { room: 'r', body: { text: 'x' } });
  const createId = core.request('room.create', { name: 'n', kind: 'chat', members: [] });
  const first = drain(core);
  assert.equal(first.length, 2);
  const lost = core.connectionLost();
  assert.deepEqual(lost.map((o) => [o.type, o.id, o.error?.code]), [['failure', createId, 'unavailable']]);
  ready(core);
  const again = drain(core);
  assert.equal(again.length, 1);
  assert.equal(again[0].id, sendId);
  assert.equal(again[0].cid, first[0].cid);
  const ok = core.receive(JSON.stringify({ op: 'ok', re: sendId, room: 'r', seq: 5, ts: 1 }));
  assert.deepEqual([ok.type, ok.fields.seq], ['reply', 5]);
});

test('errors reject with their code; requests wait while disconnected', () => {
  const core = new Core('tok');
  const id = core.request('rooms', {});
  assert.equal(core.nextOutgoing(), null); // not connected yet
  ready(core);
  const [frame] = drain(core);
  assert.equal(frame.id, id);
  const out = core.receive(JSON.stringify({ op: 'error', re: id, code: 'rate_limited', message: 'slow', retry_after_ms: 20 }));
  assert.deepEqual([out.type, out.error.code, out.error.retryAfterMs], ['failure', 'rate_limited', 20]);
});

test('a refused hello, a drain, a lost resume subscription, a closed core', () => {
  const core = new Core('bad');
  const hello = JSON.parse(core.connectionMade());
  const out = core.receive(JSON.stringify({ op: 'error', re: hello.id, code: 'unauthorized', message: 'no' }));
  assert.deepEqual([out.type, out.error.code], ['hello_failed', 'unauthorized']);

  const c2 = new Core('tok');
  ready(c2);
  c2.request('subscribe', { room: 'r', after: 0 });
  const [sub] = drain(c2);
  c2.receive(JSON.stringify({ op: 'ok', re: sub.id, room: 'r', head: 0 }));
  assert.equal(c2.receive(JSON.stringify({ op: 'event', type: 'reconnect', reason: 'draining' })).type, 'drain');
  c2.request('rooms', {});
  assert.equal(c2.nextOutgoing(), null); // draining writes nothing
  c2.connectionLost();
  ready(c2);
  const frames = drain(c2);
  assert.deepEqual(frames.map((f) => f.op), ['subscribe', 'rooms']);
  const lostSub = c2.receive(JSON.stringify({ op: 'error', re: frames[0].id, code: 'not_found', message: 'gone' }));
  assert.deepEqual([lostSub.type, lostSub.event.type, lostSub.event.code], ['deliver', SUBSCRIPTION_LOST, 'not_found']);

  const failures = c2.close({ code: 'unavailable', message: 'closed' });
  assert.equal(failures.length, 1);
  assert.throws(() => c2.request('rooms', {}), /closed/);
  assert.throws(() => c2.request('send', { room: 'r', body: { text: 'x'.repeat(2 << 20) } }), /closed/);
  assert.throws(() => new Core('t').request('send', { room: 'r', body: { text: 'x'.repeat(2 << 20) } }), /over/);
});
