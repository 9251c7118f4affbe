// The admin console's pure helpers (origin/admin_web/model.js) under `node --test`.
import assert from 'node:assert/strict';
import test from 'node:test';
import { barWidth, credentialKind, forest, money, previousMonth, quotaLevel } from '../../origin/admin_web/model.js';

test('quota levels change at 80 % and 100 %', () => {
  assert.deepEqual(quotaLevel(79, 100), { level: 'ok', percent: 79 });
  assert.deepEqual(quotaLevel(4, 5), { level: 'warn', percent: 80 });
  assert.deepEqual(quotaLevel(1, 1), { level: 'full', percent: 100 });
  assert.deepEqual(quotaLevel(7, 5), { level: 'full', percent: 140 });
  assert.deepEqual(quotaLevel(0, 0), { level: 'full', percent: 100 });
  assert.deepEqual(quotaLevel(12, null), { level: 'unlimited', percent: null });
  assert.equal(barWidth(7, 5), 100);
  assert.equal(barWidth(1, 4), 25);
});

test('money is exact minor units in the currency', () => {
  assert.equal(money(4901, 'EUR'), 'EUR 49.01');
  assert.equal(money(5, 'EUR'), 'EUR 0.05');
  assert.equal(money(-5, 'USD'), 'USD -0.05');
  assert.equal(money(123456789, 'EUR'), 'EUR 1,234,567.89');
  assert.equal(money(500, 'JPY'), 'JPY 500');
  assert.equal(money(0, 'EUR'), 'EUR 0.00');
});

test('months and credentials', () => {
  assert.equal(previousMonth('2026-01'), '2025-12');
  assert.equal(previousMonth('2026-11'), '2026-10');
  assert.equal(credentialKind('gb6o_x'), 'organization member');
  assert.equal(credentialKind('gb6k_x'), 'API key');
  assert.equal(credentialKind('abc'), 'operator');
});

test('the org tree nests children under parents, roots being those without a shown parent', () => {
  const orgs = [
    { id: 'o3', name: 'b-child', parent: 'o1' },
    { id: 'o1', name: 'root', parent: null },
    { id: 'o2', name: 'a-child', parent: 'o1' },
    { id: 'o9', name: 'sub', parent: 'o_unseen' },
  ];
  const tree = forest(orgs);
  assert.deepEqual(tree.map((n) => n.org.id), ['o1', 'o9']);
  assert.deepEqual(tree[0].children.map((n) => n.org.name), ['a-child', 'b-child']);
});
