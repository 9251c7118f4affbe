import { h } from '../dom.js';

export function mount(el) {
  el.append(h('section', { class: 'empty' }, h('h2', { text: 'Not found' }), h('a', { href: '#/' }, 'Back to your rooms')));
  return () => {};
}
