// Drawing the heatmap, its legend and the history strip. Cells are plain
// elements (one string of HTML, parsed once) carrying their state in data
// attributes, so tests and people read the same thing; colours come from
// classes, as the page's Content-Security-Policy allows no inline styles.

import { formatValue, formatPercent, formatNanos } from './matrix.js';

export function esc(s) {
  return String(s).replace(/[&<>"']/g, (ch) => `&#${ch.charCodeAt(0)};`);
}

// Cell size: fit the width, and the height down to MIN_FIT px a cell (below
// that the grid scrolls in its frame instead), within readable bounds.
const MIN_FIT = 8;

function cellSize(grid, width, height) {
  const n = Math.max(grid.rows.length, grid.cols.length, 1);
  const byWidth = Math.floor(width / n) - 1;
  const byHeight = Math.max(MIN_FIT, Math.floor(height / n) - 1);
  return Math.max(5, Math.min(48, byWidth, byHeight));
}

// Longest axis label, in pixels of 11 px text, within limits.
function labelSpace(groups) {
  const longest = groups.reduce((m, g) => Math.max(m, g.short.length), 0);
  return Math.max(40, Math.min(180, Math.round(longest * 6.8) + 12));
}

// Every k-th label when cells are too small for each to be read (11 px text).
function labelStride(cell) {
  return cell >= 13 ? 1 : Math.ceil(13 / (cell + 1));
}

export function renderHeatmap(el, grid, available) {
  const labelW = labelSpace(grid.rows);
  const labelH = labelSpace(grid.cols);
  const cell = cellSize(grid, available.width - labelW, available.height - labelH);
  el.style.setProperty('--cell', `${cell}px`);
  el.style.setProperty('--rows', String(grid.rows.length));
  el.style.setProperty('--cols', String(grid.cols.length));
  el.style.setProperty('--label-w', `${labelW}px`);
  el.style.setProperty('--label-h', `${labelH}px`);
  const stride = labelStride(cell);
  const parts = ['<div class="corner">src ↓ dst →</div>'];
  grid.cols.forEach((g, c) => {
    const on = c % stride === 0;
    parts.push(`<div class="cl${on ? ' on' : ''}" title="${esc(g.label)}">${on ? esc(g.short) : ''}</div>`);
  });
  const width = grid.cols.length;
  grid.rows.forEach((g, r) => {
    const on = r % stride === 0;
    parts.push(`<div class="rl${on ? ' on' : ''}" title="${esc(g.label)}">${on ? esc(g.short) : ''}</div>`);
    for (let c = 0; c < width; c++) {
      const x = grid.cells[r * width + c];
      const names = grid.aggregated
        ? `data-group="${r},${c}"`
        : `data-src="${esc(g.label)}" data-dst="${esc(grid.cols[c].label)}"`;
      parts.push(`<div class="c ${x.bin}" data-i="${r * width + c}" ${names} data-state="${x.state}"></div>`);
    }
  });
  el.innerHTML = parts.join('');
  el.dataset.cells = String(grid.cells.length);
  el.dataset.aggregated = String(grid.aggregated);
  el.setAttribute('role', 'group');
  const failing = grid.cells.filter((x) => x.state === 'failing').length;
  el.setAttribute(
    'aria-label',
    `${grid.rows.length} by ${grid.cols.length} ToR heatmap, ${failing} cells beyond the SLA`,
  );
}

const LEGEND_BINS = ['h0', 'h1', 'h2', 'h3', 'f1', 'f2', 'f3', 'f4'];

export function renderLegend(el, metricKey, threshold) {
  const sla = metricKey === 'loss' ? formatPercent(threshold) : formatNanos(threshold);
  const swatches = LEGEND_BINS.map((b, i) => {
    const mark = i === 4 ? `<span class="txt">SLA ${esc(sla)} ▸</span>` : '';
    return `${mark}<span class="sw ${b}" title="${b.startsWith('f') ? 'beyond the SLA' : 'within the SLA'}"></span>`;
  });
  el.innerHTML = `<span class="txt">better</span>${swatches.join('')}<span class="txt">worse</span>`
    + '<span class="sw nd"></span><span class="txt">no data</span>';
}

export function cellTooltip(grid, x) {
  const row = grid.rows[x.row];
  const col = grid.cols[x.col];
  const lines = [`<b>${esc(row.label)} → ${esc(col.label)}</b>`];
  if (x.state === 'nodata') {
    lines.push('not probed in this window');
  } else {
    const metricName = grid.metric === 'loss' ? 'loss' : 'p99 network RTT';
    const worst = grid.aggregated ? 'worst pair ' : '';
    const value = x.value === null && x.unanswered ? 'no reply' : formatValue(grid.metric, x.value);
    lines.push(`${worst}${metricName}: ${esc(value)}`);
    const probes = x.ok + x.lost;
    const overall = probes > 0 ? formatPercent(x.lost / probes) : '–';
    lines.push(`${x.ok} answered, ${x.lost} lost (${overall}), ${x.invalid} invalid; ${x.paths} paths`);
    if (grid.aggregated) lines.push(`${x.pairs} of ${x.possiblePairs} ToR pairs probed, ${x.failingPairs} beyond the SLA`);
    if (!x.judged) lines.push('too few probes for the SLA to judge');
  }
  lines.push(grid.aggregated ? 'click to zoom in' : 'click for its paths');
  return lines.join('<br>');
}

// One bar per window kept: how many pairs broke the SLA (for the metric shown).
export function renderSpark(canvas, windows, selected, metricKey) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  if (width === 0) return;
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(height * ratio);
  const ctx = canvas.getContext('2d');
  ctx.scale(ratio, ratio);
  ctx.clearRect(0, 0, width, height);
  if (windows.length === 0) return;
  const css = getComputedStyle(document.documentElement);
  const key = metricKey === 'loss' ? 'failingLoss' : 'failingLatency';
  const most = Math.max(1, ...windows.map((w) => w[key]));
  const step = width / windows.length;
  windows.forEach((w, i) => {
    const n = w[key];
    const h = n === 0 ? 2 : 4 + ((height - 6) * Math.log1p(n)) / Math.log1p(most);
    ctx.fillStyle = css.getPropertyValue(n === 0 ? '--h2' : '--f3');
    ctx.fillRect(i * step, height - h, Math.max(1, step - (step > 3 ? 1 : 0)), h);
  });
  if (selected >= 0) {
    ctx.fillStyle = css.getPropertyValue('--ink');
    ctx.fillRect(selected * step + step / 2 - 1, 0, 2, height);
  }
}
