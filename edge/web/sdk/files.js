// Files over HTTP (PROTOCOL.md "Files"): upload into a room, download by id, with the user's
// bearer token. `base` is the HTTP origin that serves the files API ('' = the page's own).

import { GB6Error } from './errors.js';

/** @param {Response} resp @returns {Promise<GB6Error>} */
async function httpError(resp) {
  let code = 'internal';
  let message = `HTTP ${resp.status}`;
  try {
    const body = await resp.json();
    if (body?.error?.code) code = body.error.code;
    if (body?.error?.message) message = body.error.message;
  } catch {
    // not a JSON error body: keep the status
  }
  const retry = Number(resp.headers.get('Retry-After'));
  return new GB6Error(code, message, Number.isFinite(retry) && retry > 0 ? retry * 1000 : null);
}

/**
 * Upload `data` into `room`. Resolves to `{id, size, type}`; rejects with GB6Error.
 * @param {string} base @param {string} token @param {string} room
 * @param {Blob|ArrayBuffer|Uint8Array} data @param {string} [type]
 * @returns {Promise<{id: string, size: number, type: string}>}
 */
export async function uploadFile(base, token, room, data, type) {
  const contentType = type || (data instanceof Blob ? data.type : '') || 'application/octet-stream';
  const resp = await fetch(`${base}/v1/rooms/${encodeURIComponent(room)}/files`, {
    method: 'POST',
    headers: { Authorization: `Bearer ${token}`, 'Content-Type': contentType },
    body: data,
  });
  if (resp.status !== 201) throw await httpError(resp);
  return resp.json();
}

/**
 * Download a file as a Blob (typed as it was uploaded). Rejects with GB6Error (`not_found` for
 * a file of a room the user is not in, exactly as for one that does not exist).
 * @param {string} base @param {string} token @param {string} fileId @returns {Promise<Blob>}
 */
export async function downloadFile(base, token, fileId) {
  const resp = await fetch(`${base}/v1/files/${encodeURIComponent(fileId)}`, {
    headers: { Authorization: `Bearer ${token}` },
  });
  if (!resp.ok) throw await httpError(resp);
  return resp.blob();
}
