// The view router: `#/<path>` picks a view from `routes` (routes.js); one view is mounted at a
// time. A view module exports `mount(container, ctx, params)` returning an unmount function
// (or a promise of one); `params` are the pattern's captures.

import { routes } from './routes.js';

export class Router {
  /** @param {HTMLElement} container @param {Record<string, any>} ctx */
  constructor(container, ctx) {
    this.container = container;
    this.ctx = ctx;
    this._unmount = null;
    this._seq = 0;
    this._onHash = () => this.render();
  }

  start() {
    window.addEventListener('hashchange', this._onHash);
    return this.render();
  }

  stop() {
    window.removeEventListener('hashchange', this._onHash);
    this._teardown();
  }

  /** The current path (`/rooms/ID`), from the hash. */
  get path() {
    return decodeURIComponent(location.hash.replace(/^#/, '')) || '/';
  }

  navigate(path) {
    location.hash = '#' + path;
  }

  _teardown() {
    const un = this._unmount;
    this._unmount = null;
    if (typeof un === 'function') un();
    this.container.replaceChildren();
  }

  async render() {
    const seq = ++this._seq;
    this._teardown();
    for (const route of routes) {
      const m = route.pattern.exec(this.path);
      if (!m) continue;
      const view = await route.view();
      if (seq !== this._seq) return; // navigated again meanwhile
      const un = await view.mount(this.container, this.ctx, m.slice(1));
      if (seq !== this._seq) { if (typeof un === 'function') un(); return; }
      this._unmount = un;
      return;
    }
  }
}
