// The web view in a real headless Chromium against a live `pingmesh demo`
// (six agents over three ToRs on loopback UDP): the heatmap has a cell per
// ToR pair, a black-holed host turns exactly its ToR's row and column to the
// failing colour within two windows and they return once the fault clears,
// all without a reload; the slider shows the fault again from the history,
// and a cell drills down to its paths. Screenshots: see lib.mjs.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { launchChromium, startDemo, waitFor, heatmapState, palette, screenshots } from '../lib.mjs';

const WINDOW_MS = 2000;
// The demo's analyzer judges a window this long after it ends (probe timeout
// 500 ms + report grace 1.5 s); the page polls every 500 ms at this window.
const JUDGED_AFTER_MS = 2000;
const POLL_MS = 500;
const FAULT_FROM_S = 24;
const FAULT_TO_S = 44;
const TORS = ['tor-1', 'tor-2', 'tor-3'];
// node-3 sits under tor-3 (round robin): every pair from or to tor-3 crosses it.
const AFFECTED = new Set(['tor-3->tor-1', 'tor-3->tor-2', 'tor-3->tor-3', 'tor-1->tor-3', 'tor-2->tor-3']);

const windowStart = (ms) => Math.floor(ms / WINDOW_MS) * WINDOW_MS;

function failingSet(state) {
  return new Set(Object.entries(state.cells).filter(([, c]) => c.state === 'failing').map(([k]) => k));
}

function sameSet(a, b) {
  return a.size === b.size && [...a].every((x) => b.has(x));
}

test('a fault turns exactly its cells to the failing colour within two windows, and they return', { timeout: 150_000 }, async (t) => {
  const demo = await startDemo([
    '--window-ms', String(WINDOW_MS), '--duration', '120s',
    '--inject', `host:node-3@${FAULT_FROM_S}s-${FAULT_TO_S}s`,
  ]);
  t.after(() => demo.stop());
  const browser = await launchChromium();
  t.after(() => browser.close());
  const page = await browser.context.newPage();
  const errors = [];
  page.on('pageerror', (e) => errors.push(e.message));
  // The browser logs every failed request as a console error: requests are
  // checked on their own below (only /api/v1/services may be missing).
  page.on('console', (m) => {
    if (m.type() === 'error' && !m.text().startsWith('Failed to load resource')) errors.push(m.text());
  });
  const failed = [];
  page.on('response', (r) => { if (r.status() >= 400) failed.push(`${r.status()} ${new URL(r.url()).pathname}`); });
  page.on('requestfailed', (r) => failed.push(`${r.failure()?.errorText} ${r.url()}`));
  await page.goto(demo.url);
  // Survives only as long as the document does: proves there was no reload.
  await page.evaluate(() => { window.sameDocument = true; });

  const colours = await palette(page);
  const healthyColours = new Set(['h0', 'h1', 'h2', 'h3'].map((k) => colours[k]));
  const failingColours = new Set(['f1', 'f2', 'f3', 'f4'].map((k) => colours[k]));
  assert.equal(healthyColours.size, 4, 'four distinct healthy colours');
  assert.equal(failingColours.size, 4, 'four distinct failing colours');
  assert.ok([...failingColours].every((c) => !healthyColours.has(c)));

  // Every state seen, to check that nothing outside the affected cells ever failed.
  const seen = [];
  const sample = async () => {
    const s = await heatmapState(page);
    s.at = Date.now();
    seen.push(s);
    return s;
  };

  // Healthy: one cell per ToR pair, each probed and within the SLA, from a
  // window all six agents were up for.
  const healthy = await waitFor('a healthy 3 x 3 heatmap', 40_000, async () => {
    const s = await sample();
    const cells = Object.values(s.cells);
    return s.window > demo.readyAt && s.count === 9 && cells.length === 9
      && cells.every((c) => c.state === 'ok') && s;
  });
  for (const src of TORS) {
    for (const dst of TORS) {
      const cell = healthy.cells[`${src}->${dst}`];
      assert.ok(cell, `cell ${src}->${dst}`);
      assert.ok(healthyColours.has(cell.colour), `${src}->${dst} is ${cell.colour}`);
    }
  }
  assert.equal(await page.locator('#agents tr[data-connected="true"]').count(), 6);
  assert.match(await page.locator('#services').innerText(), /service/i);
  // A few more healthy windows in the history strip before the picture.
  const pictured = await waitFor('a few healthy windows', 30_000, async () => {
    const s = await sample();
    return Date.now() > demo.readyAt + (FAULT_FROM_S - 6) * 1000 && s;
  });
  assert.ok(Object.values(pictured.cells).every((c) => c.state === 'ok'));
  await page.mouse.move(0, 0);
  await page.screenshot({ path: join(screenshots, 'web-healthy.png') });

  // The fault starts FAULT_FROM_S after the demo's fabric was made: between
  // the spawn and the moment its banner was read.
  const faultLatest = demo.readyAt + FAULT_FROM_S * 1000;
  const faulty = await waitFor('exactly the affected cells failing', 60_000, async () => {
    const s = await sample();
    return sameSet(failingSet(s), AFFECTED) && s;
  });
  // Within two windows: the window the fault began in, or the next one.
  const secondWindow = windowStart(faultLatest) + WINDOW_MS;
  assert.ok(faulty.window <= secondWindow,
    `failing cells first shown for window ${faulty.window}, after the fault's second window ${secondWindow}`);
  // And on screen without delay: that window's judgement plus one poll.
  assert.ok(faulty.at <= secondWindow + WINDOW_MS + JUDGED_AFTER_MS + POLL_MS + 1500,
    `shown ${faulty.at - secondWindow - WINDOW_MS} ms after the second window closed`);
  for (const key of AFFECTED) {
    assert.ok(failingColours.has(faulty.cells[key].colour), `${key} is ${faulty.cells[key].colour}`);
  }
  for (const [key, cell] of Object.entries(faulty.cells)) {
    if (!AFFECTED.has(key)) assert.ok(healthyColours.has(cell.colour), `${key} stays healthy`);
  }

  // The root cause opens after two bad windows, with its SLA findings under it.
  await waitFor('host node-3 named as the root cause', 20_000, async () => {
    await sample();
    return (await page.locator('.cause[data-component="node-3"]').count()) === 1;
  });
  assert.match(await page.locator('.cause[data-component="node-3"]').innerText(), /SLA findings it explains/);
  // Pointing at the cause outlines its ToR's row and column.
  await page.locator('.cause[data-component="node-3"]').hover();
  const outlined = await page.locator('.c.hl').evaluateAll((els) => els.map((e) => `${e.dataset.src}->${e.dataset.dst}`));
  assert.deepEqual(new Set(outlined), AFFECTED);

  // Drill down: tor-1 -> tor-3 holds paths to node-3 (lossy) and node-6 (clean).
  await page.locator('.c[data-src="tor-1"][data-dst="tor-3"]').click();
  const rows = page.locator('#paths-table tbody tr');
  await waitFor('the paths of tor-1 -> tor-3', 10_000, async () => (await rows.count()) === 4);
  const table = await rows.allInnerTexts();
  assert.equal(table.filter((r) => r.includes('node-3/udp0')).length, 2, table.join('\n'));
  await page.screenshot({ path: join(screenshots, 'web-fault.png'), fullPage: true });

  // The fault clears FAULT_TO_S after the start; the next window is clean.
  const clearLatest = demo.readyAt + FAULT_TO_S * 1000;
  const recovered = await waitFor('every cell healthy again', 60_000, async () => {
    const s = await sample();
    return s.window > faulty.window && Object.values(s.cells).every((c) => c.state === 'ok') && s;
  });
  assert.ok(recovered.window <= windowStart(clearLatest) + WINDOW_MS,
    `healthy again only for window ${recovered.window}`);
  for (const s of seen) {
    for (const key of failingSet(s)) assert.ok(AFFECTED.has(key), `${key} failed in window ${s.window}`);
  }
  assert.equal(await page.evaluate(() => window.sameDocument), true, 'updated without a reload');

  // The history: the slider brings the fault back, Live returns to now.
  const index = await (await fetch(new URL('/api/v1/history', demo.url))).json();
  const at = index.windows.findIndex((w) => w.startMs === faulty.window);
  assert.ok(at >= 0, 'the faulty window is kept');
  await page.locator('#slider').evaluate((el, i) => {
    el.value = String(i);
    el.dispatchEvent(new Event('input', { bubbles: true }));
  }, at);
  const past = await waitFor('the faulty window from the history', 10_000, async () => {
    const s = await heatmapState(page);
    return s.window === faulty.window && s;
  });
  assert.ok(sameSet(failingSet(past), AFFECTED));
  assert.equal(await page.locator('#live').getAttribute('aria-pressed'), 'false');
  await page.locator('#live').click();
  await waitFor('live again', 10_000, async () => (await heatmapState(page)).window > faulty.window);

  // p99 network RTT: loopback stays far below the SLA's 500 µs.
  await page.locator('label:has(input[value="p99"])').click();
  const p99 = await heatmapState(page);
  assert.equal(p99.metric, 'p99');
  assert.equal(p99.count, 9);
  assert.ok(Object.values(p99.cells).every((c) => c.state === 'ok'), JSON.stringify(p99.cells));
  // The keyboard reaches every cell: from the first, down and right is
  // tor-2 -> tor-2; Enter opens it, Escape closes it.
  await page.locator('#drill [data-close]').click();
  await page.locator('#heatmap').focus();
  await page.keyboard.press('ArrowDown');
  await page.keyboard.press('ArrowRight');
  assert.match(await page.locator('#cell-status').innerText(), /tor-2 → tor-2/);
  await page.keyboard.press('Enter');
  await waitFor('the drill-down of tor-2 -> tor-2', 10_000, async () =>
    (await page.locator('#drill h3').innerText()).startsWith('tor-2 → tor-2'));
  await page.keyboard.press('Escape');
  assert.equal(await page.locator('#drill').isHidden(), true);
  assert.deepEqual(errors, [], 'no script errors');
  assert.deepEqual(failed.filter((f) => f !== '404 /api/v1/services'), [], 'no failed request');
});
