// The page's state and its conversation with the controller: it polls the
// history index for new windows, follows the newest one while "Live" is on,
// and redraws only what changed. Read-only: every request is a GET.

import { buildGrid, METRICS } from './matrix.js';
import { renderHeatmap, renderLegend, renderSpark, cellTooltip, esc } from './heatmap.js';
import { renderFindings, renderServices, renderAgents, renderDrill, formatTime } from './panels.js';

const $ = (id) => document.getElementById(id);

const state = {
  metric: 'loss',
  live: true,
  windowMs: 5000,
  maxAgeMs: 3600000,
  windows: [], // the history index, oldest first
  shown: null, // the matrix on screen
  grid: null,
  zoom: null, // {rows, cols, label}: the ToRs of one aggregated cell
  cursor: 0, // the cell the keyboard is on
  selected: null, // {source, target}: the pair drilled into
  pollFailures: 0,
  panelsShown: false,
  firstRender: true,
};

class HttpError extends Error {
  constructor(status, text) {
    super(`${status}: ${text}`);
    this.status = status;
  }
}

// In a cluster the JSON API wants a bearer token whose user may get
// PingMeshes (docs/security.md). The page asks for one when the API answers
// 401 or 403 and keeps it in sessionStorage: for this tab, until it closes.
const TOKEN_KEY = 'pingmesh.token';
let tokenAsked = null; // the open prompt, shared by every request waiting on it

function storedToken() {
  try {
    return sessionStorage.getItem(TOKEN_KEY) ?? '';
  } catch {
    return ''; // storage disabled: ask every time
  }
}

function keepToken(token) {
  try {
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
  } catch {
    // storage disabled: the token lives as long as the prompt's answer
  }
}

// Shows the token form and resolves with what the user pastes.
function askForToken(status, hadToken) {
  if (!tokenAsked) {
    tokenAsked = new Promise((resolve) => {
      const form = $('token-form');
      $('token-message').textContent = status === 403
        ? "This token's user may not read PingMeshes here: paste another token."
        : hadToken
          ? 'The token was not accepted (expired?): paste a new one.'
          : "The controller's API needs a bearer token (kubectl create token …): paste it.";
      const connection = $('connection');
      connection.textContent = 'waiting for a token';
      connection.classList.add('down');
      form.hidden = false;
      $('token').focus();
      form.onsubmit = (event) => {
        event.preventDefault();
        const token = $('token').value.trim();
        if (!token) return;
        $('token').value = '';
        form.hidden = true;
        tokenAsked = null;
        resolve(token);
      };
    });
  }
  return tokenAsked;
}

async function getJSON(url) {
  let token = storedToken();
  for (;;) {
    const headers = { accept: 'application/json' };
    if (token) headers.authorization = `Bearer ${token}`;
    const response = await fetch(url, { headers });
    if (response.status === 401 || response.status === 403) {
      // Another request may have been given a new token meanwhile.
      const newer = storedToken();
      if (newer && newer !== token) {
        token = newer;
        continue;
      }
      keepToken('');
      token = await askForToken(response.status, Boolean(token));
      keepToken(token);
      continue;
    }
    if (!response.ok) throw new HttpError(response.status, await response.text());
    return response.json();
  }
}

function setConnection(ok, message) {
  const el = $('connection');
  el.textContent = ok ? message : `controller unreachable (${message}); retrying`;
  el.classList.toggle('down', !ok);
}

function selectedIndex() {
  if (!state.shown) return -1;
  return state.windows.findIndex((w) => w.startMs === state.shown.startMs);
}

// Room for the grid: the section's width, and the viewport's height less the
// header, the section's title and the history strip below the grid.
function available() {
  const wrap = $('heatmap-wrap');
  const width = wrap.clientWidth || 800;
  const height = Math.max(300, window.innerHeight - 240);
  return { width, height };
}

function draw() {
  const matrix = state.shown;
  const heatmap = $('heatmap');
  $('heatmap-empty').hidden = Boolean(matrix);
  if (!matrix) return;
  if (state.firstRender) performance.mark('pingmesh:first-draw-start');
  state.grid = buildGrid(matrix, state.metric, zoomIndices(matrix));
  renderHeatmap(heatmap, state.grid, available());
  renderLegend($('legend'), state.metric, state.grid.threshold);
  const zoom = $('zoom');
  zoom.hidden = !state.zoom && !state.grid.aggregated;
  zoom.innerHTML = state.zoom
    ? `<button type="button" data-unzoom>All ToRs</button> › ${esc(state.zoom.label)}`
    : state.grid.aggregated
      ? `${matrix.tors.length} ToRs in groups of ${state.grid.rows[0].members.length}: click a cell to zoom in`
      : '';
  markSelected();
  state.cursor = Math.min(state.cursor, state.grid.cells.length - 1);
  markCursor(false);
  const end = matrix.startMs + matrix.windowMs;
  $('window-label').textContent = `window ${formatTime(matrix.startMs)}–${formatTime(end)} (${matrix.windowMs / 1000} s)`;
  heatmap.dataset.window = String(matrix.startMs);
  heatmap.dataset.metric = state.metric;
  if (state.firstRender) {
    // For hack/web-bench.sh: the heatmap's DOM is built, then (after the
    // next frame) painted.
    state.firstRender = false;
    performance.measure('pingmesh:first-draw', 'pingmesh:first-draw-start');
    performance.mark('pingmesh:first-heatmap');
    requestAnimationFrame(() => setTimeout(() => performance.mark('pingmesh:first-heatmap-painted')));
  }
  document.body.dataset.rendered = String(matrix.startMs);
}

// The zoomed ToRs (kept by name: another window may list other ToRs) as
// indices into this window's list.
function zoomIndices(matrix) {
  if (!state.zoom) return null;
  const at = new Map(matrix.tors.map((t, i) => [t, i]));
  const pick = (names) => names.map((n) => at.get(n)).filter((i) => i !== undefined);
  return { rows: pick(state.zoom.rows), cols: pick(state.zoom.cols) };
}

function markSelected() {
  const heatmap = $('heatmap');
  heatmap.querySelector('.c.sel')?.classList.remove('sel');
  if (!state.selected || state.grid?.aggregated) return;
  const { source, target } = state.selected;
  for (const el of heatmap.querySelectorAll('.c')) {
    if (el.dataset.src === source && el.dataset.dst === target) el.classList.add('sel');
  }
}

// The keyboard's cell: outlined while the heatmap has focus; `announce`
// also shows its tooltip and reads it out.
function markCursor(announce) {
  const heatmap = $('heatmap');
  heatmap.querySelector('.c.kb')?.classList.remove('kb');
  const el = heatmap.querySelector(`.c[data-i="${state.cursor}"]`);
  if (!el || !state.grid) return;
  el.classList.add('kb');
  if (!announce) return;
  const html = cellTooltip(state.grid, state.grid.cells[state.cursor]);
  const tooltip = $('tooltip');
  tooltip.innerHTML = html;
  tooltip.hidden = false;
  const box = el.getBoundingClientRect();
  tooltip.style.left = `${Math.min(box.right + 8, window.innerWidth - tooltip.offsetWidth - 8)}px`;
  tooltip.style.top = `${box.bottom + 8}px`;
  $('cell-status').textContent = tooltip.innerText;
}

function openCell(el) {
  if (!el || !state.grid) return;
  const cell = state.grid.cells[Number(el.dataset.i)];
  if (state.grid.aggregated) {
    const rows = state.grid.rows[cell.row];
    const cols = state.grid.cols[cell.col];
    const names = (g) => g.members.map((t) => state.shown.tors[t]);
    state.zoom = { rows: names(rows), cols: names(cols), label: `${rows.label} → ${cols.label}` };
    state.cursor = 0;
    draw();
    return;
  }
  state.selected = { source: el.dataset.src, target: el.dataset.dst };
  markSelected();
  refreshDrill().catch((err) => setConnection(false, err.message));
}

function goBack() {
  if (state.selected) {
    state.selected = null;
    markSelected();
    $('drill').hidden = true;
  } else if (state.zoom) {
    state.zoom = null;
    draw();
  }
}

function highlightTor(tor) {
  const heatmap = $('heatmap');
  for (const el of heatmap.querySelectorAll('.c.hl')) el.classList.remove('hl');
  if (!tor || !state.grid || !state.shown) return;
  const index = state.shown.tors.indexOf(tor);
  const holds = (g) => (state.grid.aggregated ? g.members.includes(index) : g.label === tor);
  const row = state.grid.rows.findIndex(holds);
  const col = state.grid.cols.findIndex(holds);
  const width = state.grid.cols.length;
  for (const el of heatmap.querySelectorAll('.c')) {
    const i = Number(el.dataset.i);
    if (Math.floor(i / width) === row || i % width === col) el.classList.add('hl');
  }
}

function drawHistory() {
  const slider = $('slider');
  const n = state.windows.length;
  slider.max = String(Math.max(0, n - 1));
  const at = selectedIndex();
  slider.value = String(at >= 0 ? at : n - 1);
  slider.disabled = n < 2;
  $('live').setAttribute('aria-pressed', String(state.live));
  renderSpark($('spark'), state.windows, at, state.metric);
  const oldest = state.windows[0];
  $('history-label').textContent = n
    ? `${n} windows kept, since ${formatTime(oldest.startMs)}; bars: ToR pairs beyond the SLA`
    : '';
}

async function showWindow(startMs) {
  try {
    state.shown = await getJSON(`/api/v1/history/${startMs}`);
  } catch (e) {
    if (e instanceof HttpError && e.status === 404) {
      // Left the history meanwhile: start over from what the controller holds.
      state.windows = [];
      return;
    }
    throw e;
  }
  draw();
  drawHistory();
  await refreshDrill();
}

async function refreshDrill() {
  const drill = $('drill');
  if (!state.selected || !state.shown) {
    drill.hidden = true;
    return;
  }
  const { source, target } = state.selected;
  const pair = pairNumbers(source, target);
  const query = `sourceTor=${encodeURIComponent(source)}&targetTor=${encodeURIComponent(target)}`;
  let paths;
  try {
    paths = (await getJSON(`/api/v1/history/${state.shown.startMs}/paths?${query}`)).paths;
  } catch (e) {
    if (!(e instanceof HttpError)) throw e;
    paths = e.status === 410
      ? 'The paths of this window are no longer kept: the controller keeps path detail for the newest windows only.'
      : `Paths unavailable (${e.message}).`;
  }
  renderDrill(drill, pair, state.shown.startMs, paths);
}

function pairNumbers(source, target) {
  const m = state.shown;
  const s = m.tors.indexOf(source);
  const t = m.tors.indexOf(target);
  const out = { source, target, pairs: 0, ok: 0, lost: 0, invalid: 0, paths: 0, p99: null };
  for (let i = 0; i < m.cells.source.length; i++) {
    if (m.cells.source[i] === s && m.cells.target[i] === t) {
      Object.assign(out, {
        pairs: 1,
        ok: m.cells.ok[i],
        lost: m.cells.lost[i],
        invalid: m.cells.invalid[i],
        paths: m.cells.paths[i],
        p99: m.cells.p99NetworkRttNs[i],
      });
    }
  }
  return out;
}

async function refreshPanels() {
  const [findings, agents, services] = await Promise.all([
    getJSON('/api/v1/findings'),
    getJSON('/api/v1/agents'),
    // Absent until service awareness is served: say so instead of failing.
    getJSON('/api/v1/services').catch((e) => {
      if (e instanceof HttpError && (e.status === 404 || e.status === 501)) return null;
      throw e;
    }),
  ]);
  renderFindings($('causes'), $('findings'), { causes: $('causes-count'), findings: $('findings-count') }, findings);
  renderAgents($('agents'), $('agents-count'), agents);
  const up = Array.isArray(agents) ? agents.filter((a) => a.connected).length : 0;
  $('agents-label').textContent = `agents ${up}/${Array.isArray(agents) ? agents.length : 0}`;
  renderServices($('services'), services);
}

// Keeps the index within the controller's horizon.
function prune() {
  const newest = state.windows.at(-1)?.startMs ?? 0;
  const oldest = newest - state.maxAgeMs;
  const drop = state.windows.findIndex((w) => w.startMs >= oldest);
  if (drop > 0) state.windows.splice(0, drop);
}

async function poll() {
  const last = state.windows.at(-1)?.startMs;
  const index = await getJSON(`/api/v1/history${last === undefined ? '' : `?after=${last}`}`);
  state.windowMs = index.windowMs;
  state.maxAgeMs = index.maxAgeMs;
  const fresh = index.windows.length > 0;
  if (fresh) {
    state.windows.push(...index.windows);
    prune();
  }
  if (state.windows.length === 0) {
    // Nothing closed yet: the agents and findings may already be there.
    if (!state.panelsShown) await refreshPanels();
    state.panelsShown = true;
    return;
  }
  if (fresh || !state.shown) {
    if (state.live || !state.shown) await showWindow(state.windows.at(-1).startMs);
    else drawHistory();
    await refreshPanels();
  }
}

async function loop() {
  try {
    await poll();
    state.pollFailures = 0;
    setConnection(true, state.live ? 'live' : 'paused on a past window');
  } catch (e) {
    state.pollFailures += 1;
    setConnection(false, e.message ?? String(e));
  }
  // A few polls per window: a closed window shows within a second or two.
  const every = Math.min(2000, Math.max(500, state.windowMs / 5));
  setTimeout(loop, state.pollFailures ? Math.min(10000, every * 2 ** state.pollFailures) : every);
}

function wire() {
  $('metric').addEventListener('change', (e) => {
    if (!METRICS[e.target.value]) return;
    state.metric = e.target.value;
    draw();
    drawHistory();
  });
  $('slider').addEventListener('input', (e) => {
    const w = state.windows[Number(e.target.value)];
    if (!w) return;
    state.live = w === state.windows.at(-1);
    showWindow(w.startMs).catch((err) => setConnection(false, err.message));
  });
  $('live').addEventListener('click', () => {
    state.live = true;
    const newest = state.windows.at(-1);
    if (newest) showWindow(newest.startMs).catch((err) => setConnection(false, err.message));
  });
  const heatmap = $('heatmap');
  heatmap.addEventListener('click', (e) => openCell(e.target.closest('.c')));
  heatmap.addEventListener('keydown', (e) => {
    if (!state.grid) return;
    const width = state.grid.cols.length;
    const steps = { ArrowRight: 1, ArrowLeft: -1, ArrowDown: width, ArrowUp: -width };
    if (e.key in steps) {
      const next = state.cursor + steps[e.key];
      const sameRow = Math.floor(next / width) === Math.floor(state.cursor / width);
      if (next >= 0 && next < state.grid.cells.length && (Math.abs(steps[e.key]) > 1 || sameRow)) {
        state.cursor = next;
      }
      markCursor(true);
    } else if (e.key === 'Enter' || e.key === ' ') {
      openCell(heatmap.querySelector(`.c[data-i="${state.cursor}"]`));
    } else if (e.key === 'Escape') {
      goBack();
    } else {
      return;
    }
    e.preventDefault();
  });
  heatmap.addEventListener('focus', () => markCursor(true));
  heatmap.addEventListener('blur', () => { $('tooltip').hidden = true; });
  const tooltip = $('tooltip');
  heatmap.addEventListener('mouseover', (e) => {
    const el = e.target.closest('.c');
    if (!el || !state.grid) return;
    tooltip.innerHTML = cellTooltip(state.grid, state.grid.cells[Number(el.dataset.i)]);
    tooltip.hidden = false;
  });
  heatmap.addEventListener('mousemove', (e) => {
    tooltip.style.left = `${Math.min(e.clientX + 14, window.innerWidth - tooltip.offsetWidth - 8)}px`;
    tooltip.style.top = `${e.clientY + 14}px`;
  });
  heatmap.addEventListener('mouseleave', () => { tooltip.hidden = true; });
  $('zoom').addEventListener('click', (e) => {
    if (!e.target.closest('[data-unzoom]')) return;
    state.zoom = null;
    draw();
  });
  $('drill').addEventListener('click', (e) => {
    if (e.target.closest('[data-close]')) goBack();
  });
  // Hovering a root cause outlines the cells of its ToR (or of the group
  // holding it), tying the list to the map.
  const causes = $('causes');
  causes.addEventListener('mouseover', (e) => {
    const tor = e.target.closest('.cause')?.dataset.tor;
    if (tor) highlightTor(tor);
  });
  causes.addEventListener('mouseleave', () => highlightTor(null));
  let resize;
  window.addEventListener('resize', () => {
    clearTimeout(resize);
    resize = setTimeout(() => { draw(); drawHistory(); }, 150);
  });
}

wire();
loop();
