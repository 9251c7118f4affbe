// Extension point: the meeting grid (issue 5). The media engineer replaces this view: join
// the room's media over the client WebSocket (ctx.client.request with the signaling ops of
// docs/protocol.md), publish camera/microphone/screen, render one tile per participant.
// `mount(el, ctx, [roomId])` returns an unmount function that must leave the media.
import { h } from '../dom.js';

export function mount(el, ctx, [roomId]) {
  el.append(
    h('section', { class: 'empty', 'aria-label': 'Meeting' },
      h('h2', { text: 'Meeting' }),
      h('p', { text: 'The meeting grid is not available yet.' }),
      h('a', { href: `#/rooms/${encodeURIComponent(roomId)}` }, 'Back to the chat')),
  );
  return () => {};
}
