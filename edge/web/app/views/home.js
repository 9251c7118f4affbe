// The landing view of a signed-in user: pick or create a room.
import { h } from '../dom.js';

export function mount(el, ctx) {
  el.append(
    h('section', { class: 'empty' },
      h('h2', { text: 'Welcome' }),
      h('p', { text: 'Pick a room on the left, or create one.' }),
      h('p', {}, 'Your user id: ', h('code', { text: ctx.client.user.id }))),
  );
  return () => {};
}
