// The app's routes, first match wins. Media views live in media/ (meeting grid, live viewer):
// the media engineer fills them in and adds routes here (e.g. a WHEP viewer).

export const routes = [
  { pattern: /^\/rooms\/([^/]+)$/, view: () => import('./views/chat.js') },
  { pattern: /^\/meeting\/([^/]+)$/, view: () => import('./media/meeting.js') },
  { pattern: /^\/live\/([^/]+)$/, view: () => import('./media/live.js') },
  { pattern: /^\/?$/, view: () => import('./views/home.js') },
  { pattern: /.*/, view: () => import('./views/notfound.js') },
];
