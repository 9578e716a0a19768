// Page weight and time to first render of the web view, measured in Debian's
// headless Chromium against a real controller fed by synthetic agents
// (operator/examples/web_fixture.rs), at several mesh sizes. Prints a
// Markdown table (docs/benchmarks.md, "Web view"). Run by hack/web-bench.sh.
//
// For each size: wait for a complete window, then load the page LOADS times,
// each in a fresh tab with the cache disabled, and read the page's own
// performance marks and the Resource Timing of everything its first load
// fetched (the heatmap and the side panels).

import { launchChromium, startFixture, waitFor } from './lib.mjs';

const LOADS = Number(process.env.LOADS ?? 10);
const SIZES = [
  { label: '1,024 pairs (32 ToRs x 2 nodes)', args: ['--tors', '32', '--nodes-per-tor', '2'], pairs: 1024 },
  { label: '9,900 pairs (100 ToRs x 1 node)', args: ['--tors', '100', '--nodes-per-tor', '1'], pairs: 9900 },
  { label: '22,350 pairs (150 ToRs, aggregated)', args: ['--tors', '150', '--nodes-per-tor', '1'], pairs: 22350 },
];

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  const m = Math.floor(s.length / 2);
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
};
const kb = (bytes) => `${(bytes / 1024).toFixed(1)} KB`;
const ms = (x) => `${x.toFixed(0)} ms`;

async function loadOnce(context, url) {
  const page = await context.newPage();
  const cdp = await context.newCDPSession(page);
  await cdp.send('Network.setCacheDisabled', { cacheDisabled: true });
  await page.goto(url);
  await page.waitForFunction(() => performance.getEntriesByName('pingmesh:first-heatmap-painted').length > 0,
    null, { timeout: 30_000 });
  // The whole first load: the side panels too.
  await page.waitForFunction(() => document.querySelector('#agents table') !== null, null, { timeout: 30_000 });
  const m = await page.evaluate(() => {
    const painted = performance.getEntriesByName('pingmesh:first-heatmap-painted')[0].startTime;
    const nav = performance.getEntriesByType('navigation')[0];
    const before = performance.getEntriesByType('resource');
    const sum = (list, key) => list.reduce((n, r) => n + r[key], 0);
    const assets = before.filter((r) => r.initiatorType !== 'fetch');
    const data = before.filter((r) => r.initiatorType === 'fetch');
    const map = document.getElementById('heatmap');
    return {
      painted,
      built: performance.getEntriesByName('pingmesh:first-heatmap')[0].startTime,
      draw: performance.getEntriesByName('pingmesh:first-draw')[0].duration,
      pageBytes: nav.transferSize + sum(assets, 'transferSize'),
      dataBytes: sum(data, 'transferSize'),
      requests: before.length + 1,
      matrixBytes: data.filter((r) => r.name.includes('/api/v1/history/')).reduce((n, r) => n + r.transferSize, 0),
      cells: Number(map.dataset.cells),
      withData: map.querySelectorAll('.c:not([data-state="nodata"])').length,
      domNodes: document.getElementsByTagName('*').length,
    };
  });
  await page.close();
  return m;
}

async function measure(browser, size) {
  const fixture = await startFixture([...size.args, '--window-ms', '5000']);
  try {
    const index = new URL('/api/v1/history', fixture.url);
    await waitFor(`a complete window of ${size.pairs} pairs`, 90_000, async () => {
      const h = await (await fetch(index)).json();
      return h.windows.some((w) => w.pairs === size.pairs);
    }, 500);
    const runs = [];
    for (let i = 0; i < LOADS; i++) runs.push(await loadOnce(browser.context, fixture.url));
    return runs;
  } finally {
    await fixture.stop();
  }
}

const browser = await launchChromium();
const rows = [];
try {
  for (const size of SIZES) {
    const runs = await measure(browser, size);
    const pick = (k) => runs.map((r) => r[k]);
    const range = (k, f) => `${f(median(pick(k)))} (${f(Math.min(...pick(k)))}–${f(Math.max(...pick(k)))})`;
    rows.push(`| ${size.label} | ${runs[0].cells} | ${kb(median(pick('pageBytes')))} | ${kb(median(pick('dataBytes')))} `
      + `(matrix ${kb(median(pick('matrixBytes')))}) | ${median(pick('requests'))} | ${range('painted', ms)} | `
      + `${range('draw', ms)} | ${median(pick('domNodes'))} |`);
    process.stderr.write(`${size.label}: ${JSON.stringify(runs[0])}\n`);
  }
} finally {
  await browser.close();
}
console.log(`Median of ${LOADS} loads (min–max), each in a fresh tab with the cache disabled, 1366 x 768 viewport.\n`);
console.log('| mesh | heatmap cells | page (HTML, JS, CSS) | data (JSON) | requests | first heatmap painted | of which drawing it | DOM nodes |');
console.log('|---|---|---|---|---|---|---|---|');
for (const row of rows) console.log(row);
