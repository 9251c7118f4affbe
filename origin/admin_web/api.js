// The admin HTTP API as the console calls it: same origin, `Authorization: Bearer <credential>`,
// JSON bodies, errors in the protocol's shape ({"error": {"code", "message"}}) raised as
// `ApiError`. The credential never goes into a URL.

/** Every list is read a page at a time; a listing stops after this many items (a bound). */
export const MAX_ITEMS = 1000;
export const PAGE = 200; // the API's largest page

export class ApiError extends Error {
  /** @param {number} status @param {string} code @param {string} message */
  constructor(status, code, message) {
    super(message);
    this.name = 'ApiError';
    this.status = status;
    this.code = code;
  }
}

/** `path` with the query parameters that are set (empty strings and nulls are left out). */
export function withQuery(path, query = {}) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(query)) {
    if (v !== undefined && v !== null && v !== '') q.set(k, String(v));
  }
  const s = q.toString();
  return s ? `${path}?${s}` : path;
}

/** A path segment (ids are plain, but nothing from a page goes into a path unescaped). */
export const seg = encodeURIComponent;

export class Api {
  /** @param {string} credential the operator's token, a `gb6o_…` token or a `gb6k_…` key */
  constructor(credential) {
    this.credential = credential;
    /** Called with the error when the credential is refused (401): the app signs out. */
    this.onUnauthorized = null;
  }

  async call(method, path, body) {
    const init = { method, headers: { Authorization: `Bearer ${this.credential}` }, cache: 'no-store' };
    if (body !== undefined) {
      init.headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    let resp;
    try {
      resp = await fetch(path, init);
    } catch {
      throw new ApiError(0, 'unavailable', 'the node did not answer');
    }
    if (resp.status === 204) return null;
    let data = null;
    try {
      data = await resp.json();
    } catch {
      data = null;
    }
    if (!resp.ok) {
      const e = data?.error ?? {};
      const err = new ApiError(resp.status, e.code ?? 'internal', e.message ?? resp.statusText);
      if (resp.status === 401 && this.onUnauthorized) this.onUnauthorized(err);
      throw err;
    }
    return data;
  }

  get(path, query) { return this.call('GET', withQuery(path, query)); }
  post(path, body = {}) { return this.call('POST', path, body); }
  patch(path, body) { return this.call('PATCH', path, body); }
  put(path, body) { return this.call('PUT', path, body); }
  delete(path) { return this.call('DELETE', path); }

  /** Every item of a paginated list (`{items, next}`), at most `MAX_ITEMS`. */
  async all(path, query = {}) {
    const items = [];
    let after = null;
    do {
      const page = await this.get(path, { ...query, limit: PAGE, after });
      items.push(...page.items);
      after = page.next;
    } while (after && items.length < MAX_ITEMS);
    return items.slice(0, MAX_ITEMS);
  }
}
