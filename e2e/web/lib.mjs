// Shared by the browser tests and the measurement: start the project's own
// binaries (the demo, the web fixture) and Debian's Chromium, and wait on
// conditions with a deadline.

import { spawn } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const here = dirname(fileURLToPath(import.meta.url));
export const repo = resolve(here, '../..');

// Where screenshots go: a scratch folder, or docs/images when refreshing the
// docs' pictures (PINGMESH_SCREENSHOTS=docs/images hack/web-test.sh).
export const screenshots = resolve(repo, process.env.PINGMESH_SCREENSHOTS ?? 'target/web-test');
mkdirSync(screenshots, { recursive: true });

// Where cargo put the binaries (hack/web-test.sh builds them).
export const binDir = process.env.PINGMESH_BIN_DIR ?? join(repo, 'target/debug');

export function binary(relative) {
  const path = join(binDir, relative);
  if (!existsSync(path)) {
    throw new Error(`${path} is missing: run hack/web-test.sh, which builds it`);
  }
  return path;
}

// Chromium as this machine runs it: Debian's build, headless, with nothing
// reaching for the network (a closed network makes it retry noisily) and a
// fresh profile every launch.
export const CHROMIUM = process.env.PINGMESH_CHROMIUM ?? '/usr/bin/chromium';
const FLAGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];

export async function launchChromium() {
  if (!existsSync(CHROMIUM)) {
    throw new Error(`${CHROMIUM} is missing: apt-get install chromium (or set PINGMESH_CHROMIUM)`);
  }
  const profile = mkdtempSync(join(tmpdir(), 'pingmesh-chromium-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: FLAGS,
    viewport: { width: 1366, height: 768 },
  });
  const close = async () => {
    await context.close();
    rmSync(profile, { recursive: true, force: true });
  };
  return { context, close };
}

// Starts a process of ours and resolves once a line of its output matches
// `ready` (a RegExp with one group: the web view's URL).
export function startProcess(path, args, ready, timeoutMs = 60_000) {
  const spawnedAt = Date.now();
  const child = spawn(path, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  const output = [];
  return new Promise((resolvePromise, reject) => {
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`${path} did not print ${ready} in ${timeoutMs} ms:\n${output.join('')}`));
    }, timeoutMs);
    const onData = (chunk) => {
      const text = chunk.toString();
      output.push(text);
      const m = output.join('').match(ready);
      if (m) {
        clearTimeout(timer);
        child.stdout.off('data', onData);
        child.stderr.off('data', onData);
        // Keep draining so the pipe never fills up and blocks the child.
        child.stdout.resume();
        child.stderr.resume();
        resolvePromise({
          child,
          url: m[1],
          spawnedAt,
          readyAt: Date.now(),
          output,
          stop: () => new Promise((done) => {
            if (child.exitCode !== null) return done();
            child.once('exit', done);
            child.kill('SIGTERM');
          }),
        });
      }
    };
    child.stdout.on('data', onData);
    child.stderr.on('data', onData);
    child.on('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`${path} exited (${code}) before it was ready:\n${output.join('')}`));
    });
  });
}

// `pingmesh demo` with its web view on a free port.
export function startDemo(args) {
  return startProcess(binary('pingmesh'), ['demo', '--http-addr', '127.0.0.1:0', ...args],
    /web view\s+(http:\/\/\S+\/)/);
}

// The real controller fed by synthetic agents (operator/examples/web_fixture.rs).
export function startFixture(args) {
  return startProcess(binary('examples/web_fixture'), args, /web view (http:\/\/\S+\/)/);
}

export async function waitFor(what, timeoutMs, check, everyMs = 200) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    last = await check();
    if (last) return last;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

// What the heatmap shows now, read from the page: the window, and every cell
// by "source->target" with its state and computed colour.
export async function heatmapState(page) {
  return page.evaluate(() => {
    const map = document.getElementById('heatmap');
    const cells = {};
    for (const el of map.querySelectorAll('.c')) {
      const key = el.dataset.src ? `${el.dataset.src}->${el.dataset.dst}` : `group ${el.dataset.group}`;
      cells[key] = { state: el.dataset.state, colour: getComputedStyle(el).backgroundColor };
    }
    return {
      window: Number(map.dataset.window ?? 0),
      count: Number(map.dataset.cells ?? 0),
      aggregated: map.dataset.aggregated === 'true',
      metric: map.dataset.metric,
      cells,
    };
  });
}

// The palette's colours as the browser computes them, by class.
export async function palette(page) {
  return page.evaluate(() => {
    const probe = document.createElement('div');
    document.body.append(probe);
    const out = {};
    for (const name of ['h0', 'h1', 'h2', 'h3', 'f1', 'f2', 'f3', 'f4', 'nd']) {
      probe.className = name;
      out[name] = getComputedStyle(probe).backgroundColor;
    }
    probe.remove();
    return out;
  });
}
