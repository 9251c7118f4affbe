// Elements for the node's pages (the web app and the admin console serve this one file as
// `elements.js` beside their own modules; node/static.py). Text always goes in as text nodes,
// never HTML: what the pages show (messages, names, audit details, errors) is other people's
// input.

/**
 * Create an element: `h('button', {type: 'button', onclick: fn, 'aria-label': 'x'}, 'text')`.
 * Attributes starting with `on` are listeners; `text` and `value` set properties; `true` makes
 * a boolean attribute; null, undefined and false leave the attribute out.
 * @param {string} tag @param {Record<string, any>} [attrs]
 * @param {...(Node|string|number|null|undefined|false|Array<any>)} children
 * @returns {HTMLElement}
 */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (k === 'text') el.textContent = String(v);
    else if (k === 'value') el.value = v;
    else if (v === true) el.setAttribute(k, '');
    else el.setAttribute(k, String(v));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

/** Replace the children of `el`. */
export function replace(el, ...children) {
  el.replaceChildren();
  append(el, children);
}
