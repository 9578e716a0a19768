// The heatmap's model, free of the DOM (node --test runs it): from one
// window's columnar ToR-pair matrix (GET /api/v1/history/{window}) to the
// grid shown, aggregating ToRs into groups beyond MAX_AXIS so a large fabric
// stays readable, and binning values into the palette's classes.

// More ToRs than this on an axis and they are shown in groups of consecutive
// names: 100 x 100 cells still fit a laptop screen at ~6 px a cell.
export const MAX_AXIS = 100;

// Bits of the `failing` column (operator/src/mesh/history).
export const FAILING_LOSS = 1;
export const FAILING_LATENCY = 2;

export const METRICS = {
  loss: {
    key: 'loss',
    label: 'Loss',
    bit: FAILING_LOSS,
    threshold: (sla) => sla.maxLossRatio,
    value: (cols, i) => cols.lossRatio[i],
  },
  p99: {
    key: 'p99',
    label: 'p99 network RTT',
    bit: FAILING_LATENCY,
    threshold: (sla) => sla.maxP99NetworkRttNs,
    value: (cols, i) => cols.p99NetworkRttNs[i],
  },
};

// ToRs into at most maxAxis groups of consecutive names (ToR names are sorted
// by the server): a group of one is the ToR itself.
export function axisGroups(tors, maxAxis = MAX_AXIS) {
  const size = Math.max(1, Math.ceil(tors.length / maxAxis));
  const groups = [];
  for (let first = 0; first < tors.length; first += size) {
    const last = Math.min(tors.length, first + size) - 1;
    const members = [];
    for (let t = first; t <= last; t++) members.push(t);
    groups.push({
      members,
      label: first === last ? tors[first] : `${tors[first]} … ${tors[last]}`,
      // What fits on an axis: the group's first ToR.
      short: first === last ? tors[first] : `${tors[first]}…`,
    });
  }
  return groups;
}

// Position of every ToR index on an axis of groups (-1: not on this axis).
function positions(torCount, groups) {
  const at = new Int32Array(torCount).fill(-1);
  groups.forEach((g, i) => g.members.forEach((t) => { at[t] = i; }));
  return at;
}

function emptyCell(row, col) {
  return {
    row, col, pairs: 0, failingPairs: 0, value: null, unanswered: false,
    ok: 0, lost: 0, invalid: 0, paths: 0, judged: false, first: -1,
  };
}

// Worse of two values of a metric (null: nothing measured).
function worse(a, b) {
  if (a === null || a === undefined) return b ?? null;
  if (b === null || b === undefined) return a;
  return Math.max(a, b);
}

// The grid for `metric` ('loss' | 'p99'). `zoom` (optional) is
// {rows: [torIndex], cols: [torIndex]}: the ToRs of one aggregated cell,
// shown one by one. Each cell holds its member pairs' sums and the worst
// member's value, so aggregation never hides a failing pair.
export function buildGrid(matrix, metricKey, zoom = null, maxAxis = MAX_AXIS) {
  const metric = METRICS[metricKey];
  const { tors, cells: cols } = matrix;
  const single = (list) => list.map((t) => ({ members: [t], label: tors[t], short: tors[t] }));
  const rows = zoom ? single(zoom.rows) : axisGroups(tors, maxAxis);
  const columns = zoom ? single(zoom.cols) : rows;
  const rowAt = positions(tors.length, rows);
  const colAt = positions(tors.length, columns);
  const grid = new Array(rows.length * columns.length);
  for (let r = 0; r < rows.length; r++) {
    for (let c = 0; c < columns.length; c++) grid[r * columns.length + c] = emptyCell(r, c);
  }
  const n = cols.source.length;
  for (let i = 0; i < n; i++) {
    const r = rowAt[cols.source[i]];
    const c = colAt[cols.target[i]];
    if (r < 0 || c < 0) continue;
    const cell = grid[r * columns.length + c];
    cell.pairs += 1;
    if (cell.first < 0) cell.first = i;
    cell.ok += cols.ok[i];
    cell.lost += cols.lost[i];
    cell.invalid += cols.invalid[i];
    cell.paths += cols.paths[i];
    cell.judged = cell.judged || cols.judged[i];
    if (cols.failing[i] & metric.bit) cell.failingPairs += 1;
    if (cols.ok[i] === 0 && cols.lost[i] > 0) cell.unanswered = true;
    cell.value = worse(cell.value, metric.value(cols, i));
  }
  const aggregated = !zoom && rows.length < tors.length;
  const threshold = metric.threshold(matrix.sla);
  for (const cell of grid) {
    cell.state = cell.pairs === 0 ? 'nodata' : cell.failingPairs > 0 ? 'failing' : 'ok';
    cell.bin = bin(metric.key, cell, threshold);
    cell.possiblePairs = rows[cell.row].members.length * columns[cell.col].members.length;
  }
  return { rows, cols: columns, cells: grid, aggregated, metric: metric.key, threshold };
}

// Palette class of a cell: h0..h3 within the SLA (lighter is better), f1..f4
// beyond it (darker is worse), nd without data. Failing bins split the range
// from the threshold to the worst plausible value on a log scale.
export function bin(metricKey, cell, threshold) {
  if (cell.state === 'nodata') return 'nd';
  const v = cell.value;
  if (cell.state === 'failing') {
    if (v === null || v === undefined) return 'f4'; // p99 of a pair nobody answered
    const worst = metricKey === 'loss' ? 1 : threshold * 16;
    if (v >= worst || threshold <= 0) return 'f4';
    const step = Math.log(worst / threshold) / 4;
    const k = Math.floor(Math.log(Math.max(v, threshold) / threshold) / step) + 1;
    return `f${Math.min(4, Math.max(1, k))}`;
  }
  if (v === null || v === undefined || v <= 0) return 'h0';
  const share = v / threshold;
  if (metricKey === 'loss') return share <= 0.25 ? 'h1' : share <= 0.5 ? 'h2' : 'h3';
  return share <= 0.125 ? 'h0' : share <= 0.25 ? 'h1' : share <= 0.5 ? 'h2' : 'h3';
}

// Values as people read them.
export function formatValue(metricKey, v) {
  if (v === null || v === undefined) return '–';
  return metricKey === 'loss' ? formatPercent(v) : formatNanos(v);
}

export function formatPercent(ratio) {
  if (ratio === null || ratio === undefined) return '–';
  const pct = ratio * 100;
  if (pct === 0) return '0%';
  if (pct < 0.1) return `${pct.toFixed(3)}%`;
  if (pct < 10) return `${pct.toFixed(2)}%`;
  return `${pct.toFixed(1)}%`;
}

export function formatNanos(ns) {
  if (ns === null || ns === undefined) return '–';
  if (ns < 1e3) return `${ns} ns`;
  if (ns < 1e6) return `${(ns / 1e3).toFixed(ns < 1e4 ? 1 : 0)} µs`;
  if (ns < 1e9) return `${(ns / 1e6).toFixed(ns < 1e7 ? 2 : 1)} ms`;
  return `${(ns / 1e9).toFixed(2)} s`;
}
