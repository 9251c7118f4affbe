// DOM helpers of the admin console: the node's shared `h` and `replace`
// (node/web/elements.js), and the console's own forms, tables and alerts.

import { h } from './elements.js';

export { h, replace } from './elements.js';

/** A labelled form control: `<label>text <control></label>` (the label names the control). */
export function field(text, control) {
  return h('label', { class: 'field' }, h('span', {}, text), control);
}

/** `<select>` of `options` (strings or [value, text]) with `selected` chosen. */
export function select(attrs, options, selected) {
  return h('select', attrs, options.map((o) => {
    const [value, text] = Array.isArray(o) ? o : [o, o];
    return h('option', { value, selected: value === selected }, text);
  }));
}

/** A table with a caption (its accessible name), a header row and `rows` (arrays of cells). */
export function table(caption, headers, rows, empty = 'None') {
  return h('table', {},
    h('caption', {}, caption),
    h('thead', {}, h('tr', {}, headers.map((t) => h('th', { scope: 'col' }, t)))),
    h('tbody', {}, rows.length
      ? rows.map((cells) => h('tr', {}, cells.map((c) => h('td', {}, c))))
      : h('tr', {}, h('td', { colspan: headers.length, class: 'muted' }, empty))));
}

/** An alert region for a section's errors; `show(err)` fills it, `clear()` empties it. */
export function alertBox() {
  const el = h('p', { role: 'alert', class: 'error' });
  return {
    el,
    show(err) { el.textContent = err?.code ? `${err.code}: ${err.message}` : String(err?.message ?? err); },
    clear() { el.textContent = ''; },
  };
}

/**
 * Run `fn` for a form's submit (no page load) with its button disabled meanwhile; errors go to
 * `alert` (an `alertBox`). Returns the listener.
 */
export function onSubmit(alert, fn) {
  return async (ev) => {
    ev.preventDefault();
    const form = ev.currentTarget;
    const buttons = [...form.querySelectorAll('button')];
    buttons.forEach((b) => { b.disabled = true; });
    alert.clear();
    try {
      await fn(form);
    } catch (err) {
      alert.show(err);
    } finally {
      buttons.forEach((b) => { b.disabled = false; });
    }
  };
}

/** A button that runs `fn` with itself disabled meanwhile; errors go to `alert`. */
export function action(text, alert, fn, attrs = {}) {
  const button = h('button', { type: 'button', ...attrs }, text);
  button.addEventListener('click', async () => {
    button.disabled = true;
    alert.clear();
    try {
      await fn();
    } catch (err) {
      alert.show(err);
    } finally {
      button.disabled = false;
    }
  });
  return button;
}
