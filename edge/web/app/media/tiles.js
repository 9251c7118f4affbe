// What the meeting grid and the live viewer share: the stylesheet, and one tile per
// participant holding a <video> per video track and a hidden <audio> per audio track.
//
// Rules: tiles are drawn from the MediaSession's state on each 'change' (media elements are
// kept across redraws, so playback never restarts); every element says what it shows through
// labels and data attributes (data-participant, data-user, data-track-id, data-source).

import { h } from '../dom.js';

let styled = false;

/** Load media.css once (the page's CSP allows the app's own stylesheets). */
export function useMediaStyles() {
  if (styled) return;
  styled = true;
  document.head.append(h('link', { rel: 'stylesheet', href: new URL('./media.css', import.meta.url).href }));
}

/** A <video>/<audio> for a track, reused across redraws (keyed by track id). */
export class Elements {
  constructor() {
    /** @type {Map<string, HTMLMediaElement>} */
    this.byTrack = new Map();
  }

  get(id, kind, stream, { muted = false, source = '' } = {}) {
    let el = this.byTrack.get(id);
    if (!el) {
      el = kind === 'video'
        ? h('video', { autoplay: true, playsinline: true, 'data-track-id': id, 'data-source': source })
        : h('audio', { autoplay: true, 'data-track-id': id, 'data-source': source, hidden: true });
      el.muted = muted;
      el.srcObject = stream;
      this.byTrack.set(id, el);
    }
    return el;
  }

  /** Forget elements whose track is gone. */
  keep(ids) {
    for (const [id, el] of this.byTrack) {
      if (!ids.has(id)) {
        el.srcObject = null;
        el.remove();
        this.byTrack.delete(id);
      }
    }
  }
}

/**
 * One participant's tile. `tracks`: [{id, kind, source, stream, muted}]; `label`: who.
 * @returns {HTMLElement}
 */
export function tile({ participant, user, label, tracks, speaking, quality, elements, local = false }) {
  const media = tracks.map((t) => {
    const el = elements.get(t.id, t.kind, t.stream, { muted: local, source: t.source });
    el.dataset.muted = String(Boolean(t.muted));
    el.setAttribute('aria-label', `${label} ${t.source}${t.muted ? ' (muted)' : ''}`);
    return el;
  });
  const mutedNote = tracks.filter((t) => t.muted).map((t) => `${t.source} muted`).join(', ');
  return h('li', {
    class: `tile${speaking ? ' speaking' : ''}`,
    'aria-label': `Participant ${label}`,
    'data-participant': participant,
    'data-user': user,
  },
  h('h3', {}, h('span', { text: label }),
    mutedNote ? h('span', { class: 'muted-note', text: mutedNote }) : null,
    quality ? h('span', { class: 'quality', text: `connection ${quality}` }) : null),
  ...media);
}
