// Pure helpers of the console (no DOM, no network): quota levels, money, periods, the org tree.
// Tested under `node --test` (tests/browser/admin_model.test.mjs).

/** Quota bars change at these fractions of the limit. */
export const WARN_AT = 0.8;
export const FULL_AT = 1.0;

/**
 * How full a quota is: `{level, percent}`; level is `unlimited` (no limit), `ok`, `warn`
 * (at or past 80 %) or `full` (at or past 100 %). A limit of 0 is full from the start.
 * @param {number} used @param {number|null} limit
 */
export function quotaLevel(used, limit) {
  if (limit === null || limit === undefined) return { level: 'unlimited', percent: null };
  const ratio = limit === 0 ? 1 : used / limit;
  const percent = Math.floor(ratio * 100);
  const level = ratio >= FULL_AT ? 'full' : ratio >= WARN_AT ? 'warn' : 'ok';
  return { level, percent };
}

/** The bar's width in percent (0-100). */
export function barWidth(used, limit) {
  if (limit === null || limit === undefined) return 0;
  if (limit === 0) return 100;
  return Math.max(0, Math.min(100, (used / limit) * 100));
}

/** Fraction digits of a currency's minor unit (EUR 2, JPY 0); 2 when unknown. */
export function minorDigits(currency) {
  try {
    return new Intl.NumberFormat('en', { style: 'currency', currency }).resolvedOptions().maximumFractionDigits;
  } catch {
    return 2;
  }
}

/**
 * An integer amount of minor units as text, exactly (no floating point): `money(202, 'EUR')`
 * is `EUR 2.02`, `money(-5, 'EUR')` is `EUR -0.05`.
 */
export function money(minor, currency) {
  const digits = minorDigits(currency);
  const sign = minor < 0 ? '-' : '';
  const s = String(Math.abs(Math.trunc(minor))).padStart(digits + 1, '0');
  const whole = s.slice(0, s.length - digits);
  const frac = digits ? `.${s.slice(s.length - digits)}` : '';
  return `${currency} ${sign}${whole.replace(/\B(?=(\d{3})+(?!\d))/g, ',')}${frac}`;
}

/** The UTC month (`YYYY-MM`) of a time in ms. */
export function monthOf(ms) {
  return new Date(ms).toISOString().slice(0, 7);
}

/** The month before `YYYY-MM`. */
export function previousMonth(month) {
  const [y, m] = month.split('-').map(Number);
  return m === 1 ? `${y - 1}-12` : `${y}-${String(m - 1).padStart(2, '0')}`;
}

/** A UTC time for a table: `2026-11-26 00:31:07`. */
export function utc(ms) {
  return new Date(ms).toISOString().replace('T', ' ').slice(0, 19);
}

/** What kind of credential this looks like (for the header; the server decides anyway). */
export function credentialKind(credential) {
  if (credential.startsWith('gb6o_')) return 'organization member';
  if (credential.startsWith('gb6k_')) return 'API key';
  return 'operator';
}

/**
 * Nest `orgs` (`{id, parent}`) as a forest: `[{org, children: [...]}]`, roots being the orgs
 * whose parent is not among them; siblings in name order, then id.
 */
export function forest(orgs) {
  const byId = new Map(orgs.map((o) => [o.id, { org: o, children: [] }]));
  const roots = [];
  for (const node of byId.values()) {
    const parent = node.org.parent ? byId.get(node.org.parent) : undefined;
    (parent ? parent.children : roots).push(node);
  }
  const order = (a, b) => a.org.name.localeCompare(b.org.name) || a.org.id.localeCompare(b.org.id);
  const sort = (nodes) => { nodes.sort(order); nodes.forEach((n) => sort(n.children)); return nodes; };
  return sort(roots);
}
