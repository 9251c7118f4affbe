// The browser side of tests/browser_harness.py: every scenario script imports `scenario` from
// here and gets a launched browser, pages with their console captured, screenshots and a JSON
// conversation with the Python test.
//
// Wire (one JSON object per line):
//   stdin, first line   {"chromium": path, "artifacts": dir, "input": {...}} from the harness
//   stdin, later lines  commands from the test (`await h.command()` reads the next one)
//   stdout              {"emit": {...}} for each `h.emit(...)`, then {"result": ...} or
//                       {"error": {"message", "stack"}} last
//   stderr              the script's and the pages' logs (the harness saves them as artifacts)
//
// Rules: the browser only reaches loopback (all other traffic goes to a dead proxy and host
// names other than localhost do not resolve); media comes from Chromium's fake devices with the
// permission prompt answered yes; WebRTC may use loopback host candidates without mDNS names.
// Whatever happens, the browser is closed before the script exits; on failure every open page
// is screenshot as `fail-<label>.png` first.

import fs from 'node:fs';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { chromium } from 'playwright-core';

export const CHROMIUM_ARGS = [
  // Media tests: fake camera/microphone, no permission prompt, loopback ICE, no mDNS names.
  '--use-fake-ui-for-media-stream',
  '--use-fake-device-for-media-stream',
  '--allow-loopback-in-peer-connection',
  '--disable-features=WebRtcHideLocalIpsWithMdns',
  '--autoplay-policy=no-user-gesture-required',
  // Nothing but loopback: Chromium's own background traffic off, names other than localhost
  // unresolvable (IP literals are caught by the dead proxy below).
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-domain-reliability',
  '--disable-sync',
  '--no-pings',
  '--no-first-run',
  '--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1, EXCLUDE [::1]',
];

// Everything but loopback goes to port 9 of loopback, where nothing listens, and fails there
// (Playwright would proxy loopback too unless it is listed).
const DEAD_PROXY = { server: 'http://127.0.0.1:9', bypass: '127.0.0.0/8,localhost,[::1]' };

function out(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

function log(...args) {
  process.stderr.write(args.map(String).join(' ') + '\n');
}

class Harness {
  constructor(setup, lines) {
    this.input = setup.input ?? {};
    this.artifacts = setup.artifacts;
    this.chromium = setup.chromium;
    this._lines = lines;
    this.browser = null;
    this.pages = new Map(); // label -> page
    this.pageErrors = []; // uncaught errors of any page: a scenario usually asserts none
    this.started = Date.now();
  }

  async launch() {
    this.browser = await chromium.launch({
      executablePath: this.chromium,
      headless: true,
      args: CHROMIUM_ARGS,
      proxy: DEAD_PROXY,
      timeout: 20_000,
    });
    return this.browser;
  }

  /** A page in a context of its own (its own sessionStorage and cookies: one user each). */
  async newPage(label, contextOptions = {}) {
    const context = await this.browser.newContext({ viewport: { width: 1100, height: 800 }, ...contextOptions });
    context.setDefaultTimeout(10_000);
    const page = await context.newPage();
    page.on('console', (msg) => log(`[${label}] console.${msg.type()}: ${msg.text()}`));
    page.on('pageerror', (err) => {
      this.pageErrors.push(`${label}: ${err.message}`);
      log(`[${label}] pageerror: ${err.stack || err.message}`);
    });
    page.on('requestfailed', (req) => log(`[${label}] request failed: ${req.url()} ${req.failure()?.errorText}`));
    this.pages.set(label, page);
    return page;
  }

  /** Save a screenshot of `page` as <artifacts>/<name>.png. */
  async shot(page, name) {
    log(`[${((Date.now() - this.started) / 1000).toFixed(2)} s] screenshot ${name}`);
    fs.mkdirSync(this.artifacts, { recursive: true });
    const file = path.join(this.artifacts, `${name}.png`);
    await page.screenshot({ path: file, fullPage: true });
    return file;
  }

  /** Tell the Python test something (it waits with `Scenario.next_emit`). */
  emit(obj) {
    out({ emit: obj });
  }

  /** The next command line from the Python test (`Scenario.send`). */
  async command() {
    const { value, done } = await this._lines.next();
    if (done) throw new Error('the harness closed stdin');
    return JSON.parse(value);
  }

  log(...args) {
    log(...args);
  }

  async close() {
    if (this.browser) await this.browser.close().catch((e) => log('browser close failed:', e));
    this.browser = null;
  }
}

/** Run `body(h)` as a scenario: its return value is the result sent back to Python. */
export async function scenario(body) {
  const lines = createInterface({ input: process.stdin, crlfDelay: Infinity })[Symbol.asyncIterator]();
  const first = await lines.next();
  const h = new Harness(JSON.parse(first.value), lines);
  let code = 0;
  try {
    await h.launch();
    log(`[${((Date.now() - h.started) / 1000).toFixed(2)} s] browser launched`);
    const result = await body(h);
    log(`[${((Date.now() - h.started) / 1000).toFixed(2)} s] scenario done`);
    out({ result: result ?? null });
  } catch (err) {
    code = 1;
    for (const [label, page] of h.pages) {
      await h.shot(page, `fail-${label}`).catch((e) => log('screenshot failed:', e));
    }
    out({ error: { message: String(err?.message ?? err), stack: String(err?.stack ?? '') } });
  } finally {
    await h.close();
  }
  process.exit(code);
}
