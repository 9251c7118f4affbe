// Extension point: the live viewer (issue 5). The media engineer replaces this view: subscribe
// to the host's tracks (or play over WHEP), show the viewer count, comments and reactions
// through the room's messages. `mount(el, ctx, [roomId])` returns an unmount function.
import { h } from '../dom.js';

export function mount(el, ctx, [roomId]) {
  el.append(
    h('section', { class: 'empty', 'aria-label': 'Live stream' },
      h('h2', { text: 'Live stream' }),
      h('p', { text: 'The live viewer is not available yet.' }),
      h('a', { href: `#/rooms/${encodeURIComponent(roomId)}` }, 'Back to the chat')),
  );
  return () => {};
}
