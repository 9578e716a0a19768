// Beyond 100 ToRs the heatmap groups consecutive ToRs: a real controller fed
// by synthetic agents (operator/examples/web_fixture.rs) with 120 ToRs, one of
// them lossy and another slow. The lossy ToR's group row and column fail in
// the loss view and only there, the slow one's in the p99 view, and a click
// zooms into one aggregated cell's ToRs. The agents also report service
// flows (a ring of TCP connections): the lossy ToR's root cause names the
// services whose connections cross it.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { launchChromium, startFixture, waitFor, heatmapState, screenshots } from '../lib.mjs';

const TORS = 120; // groups of 2: 60 x 60 cells
const GROUPS = 60;
const LOSSY = 'tor-077'; // index 76: group 38
const SLOW = 'tor-010'; // index 9: group 4

// The cells of one group's row and column.
function cross(group) {
  const keys = new Set();
  for (let i = 0; i < GROUPS; i++) {
    keys.add(`group ${group},${i}`);
    keys.add(`group ${i},${group}`);
  }
  return keys;
}

function failing(state) {
  return new Set(Object.entries(state.cells).filter(([, c]) => c.state === 'failing').map(([k]) => k));
}

const same = (a, b) => a.size === b.size && [...a].every((x) => b.has(x));

test('beyond 100 ToRs the heatmap aggregates without hiding a failing ToR', { timeout: 120_000 }, async (t) => {
  const fixture = await startFixture([
    '--tors', String(TORS), '--nodes-per-tor', '1', '--window-ms', '2000',
    '--lossy-tor', LOSSY, '--slow-tor', SLOW, '--duration-secs', '100', '--service-flows',
  ]);
  t.after(() => fixture.stop());
  const browser = await launchChromium();
  t.after(() => browser.close());
  const page = await browser.context.newPage();
  const errors = [];
  page.on('pageerror', (e) => errors.push(e.message));
  await page.goto(fixture.url);

  const lossCross = cross(38);
  const seen = [];
  const loss = await waitFor('the lossy group row and column', 60_000, async () => {
    const s = await heatmapState(page);
    seen.push(s);
    return s.count === GROUPS * GROUPS && same(failing(s), lossCross) && s;
  });
  assert.equal(loss.aggregated, true);
  for (const s of seen) {
    for (const key of failing(s)) assert.ok(lossCross.has(key), `${key} failed`);
  }
  assert.match(await page.locator('#zoom').innerText(), /120 ToRs in groups of 2/);

  await page.locator('label:has(input[value="p99"])').click();
  const p99 = await waitFor('the slow group row and column in the p99 view', 20_000, async () => {
    const s = await heatmapState(page);
    return s.metric === 'p99' && same(failing(s), cross(4)) && s;
  });
  assert.equal(p99.count, GROUPS * GROUPS);

  // Zoom into (tor-077, tor-078) -> (tor-001, tor-002): the lossy ToR's row fails.
  await page.locator('label:has(input[value="loss"])').click();
  await page.locator('.c[data-group="38,0"]').click();
  const zoomed = await waitFor('the zoomed cell', 10_000, async () => {
    const s = await heatmapState(page);
    return s.count === 4 && Object.values(s.cells).every((c) => c.state !== 'nodata') && s;
  });
  assert.equal(zoomed.aggregated, false);
  assert.deepEqual(Object.keys(zoomed.cells).sort(), [
    'tor-077->tor-001', 'tor-077->tor-002', 'tor-078->tor-001', 'tor-078->tor-002',
  ]);
  assert.deepEqual([...failing(zoomed)].sort(), ['tor-077->tor-001', 'tor-077->tor-002']);
  await page.locator('[data-unzoom]').click();
  assert.equal((await heatmapState(page)).count, GROUPS * GROUPS);

  // The ring's connections into and out of tor-077 belong to the services of
  // tor-076 (index 75: allreduce) and tor-077 (index 76: parameter-server).
  const card = page.locator(`.cause[data-tor="${LOSSY}"]`).first();
  const chips = await waitFor('the services the lossy ToR\'s root cause hits', 30_000, async () => {
    if ((await card.count()) === 0) return false;
    const names = await card.locator(':scope > .chips .chip').allInnerTexts();
    return names.length > 0 && names;
  });
  assert.deepEqual(chips.sort(), ['Process/allreduce', 'Process/parameter-server']);
  const listed = await page.locator('#services li[data-service]').evaluateAll((els) => els.map((e) => e.dataset.service));
  assert.ok(listed.includes('Process/allreduce') && listed.includes('Process/parameter-server'), listed.join(', '));
  await page.screenshot({ path: join(screenshots, 'web-aggregated.png') });
  assert.deepEqual(errors, []);
});
