// The heatmap's model on its own (no browser): aggregation beyond 100 ToRs
// never hides a failing pair, zooming shows the ToRs of one aggregated cell,
// and values fall in the palette's bins around the SLA.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { axisGroups, buildGrid, bin, MAX_AXIS } from '../../../operator/src/mesh/web/assets/matrix.js';

const SLA = { maxLossRatio: 0.01, maxP99NetworkRttNs: 500000, minProbes: 10 };

// A full matrix over `n` ToRs; `lossOf(s, t)` gives each pair's loss ratio.
function matrix(n, lossOf = () => 0) {
  const tors = Array.from({ length: n }, (_, i) => `tor-${String(i + 1).padStart(3, '0')}`);
  const cells = {
    source: [], target: [], paths: [], ok: [], lost: [], invalid: [],
    lossRatio: [], p99NetworkRttNs: [], failing: [], judged: [],
  };
  for (let s = 0; s < n; s++) {
    for (let t = 0; t < n; t++) {
      const loss = lossOf(s, t);
      cells.source.push(s);
      cells.target.push(t);
      cells.paths.push(1);
      cells.ok.push(100 - loss * 100);
      cells.lost.push(loss * 100);
      cells.invalid.push(0);
      cells.lossRatio.push(loss);
      cells.p99NetworkRttNs.push(loss === 1 ? null : 4000);
      cells.failing.push((loss > SLA.maxLossRatio ? 1 : 0) | (loss === 1 ? 2 : 0));
      cells.judged.push(true);
    }
  }
  return { startMs: 0, windowMs: 5000, tors, sla: SLA, pathsKept: true, cells };
}

test('up to 100 ToRs every ToR has its own row and column', () => {
  const grid = buildGrid(matrix(MAX_AXIS), 'loss');
  assert.equal(grid.aggregated, false);
  assert.equal(grid.cells.length, MAX_AXIS * MAX_AXIS);
  assert.equal(grid.rows[41].label, 'tor-042');
});

test('beyond 100 ToRs consecutive ToRs share a row, and one failing pair fails its group', () => {
  const groups = axisGroups(Array.from({ length: 250 }, (_, i) => `t${i}`));
  assert.equal(groups.length, 84);
  assert.deepEqual(groups[0].members, [0, 1, 2]);
  assert.deepEqual(groups.at(-1).members, [249]);

  // One pair out of 9 in its group loses 30%: the group's overall loss is
  // ~3%, its worst pair's 30% is what the cell shows.
  const grid = buildGrid(matrix(250, (s, t) => (s === 4 && t === 7 ? 0.3 : 0)), 'loss');
  assert.equal(grid.aggregated, true);
  assert.equal(grid.cells.length, 84 * 84);
  const failing = grid.cells.filter((c) => c.state === 'failing');
  assert.equal(failing.length, 1);
  assert.deepEqual([failing[0].row, failing[0].col], [1, 2]);
  assert.equal(failing[0].value, 0.3);
  assert.equal(failing[0].pairs, 9);
  assert.equal(failing[0].failingPairs, 1);
});

test('zooming into an aggregated cell shows its ToRs one by one', () => {
  const m = matrix(250, (s, t) => (s === 4 && t === 7 ? 1 : 0));
  const grid = buildGrid(m, 'p99', { rows: [3, 4, 5], cols: [6, 7, 8] });
  assert.equal(grid.aggregated, false);
  assert.deepEqual(grid.rows.map((r) => r.label), ['tor-004', 'tor-005', 'tor-006']);
  const failing = grid.cells.filter((c) => c.state === 'failing');
  assert.equal(failing.length, 1);
  assert.deepEqual([failing[0].row, failing[0].col], [1, 1]);
  // Nobody answered: no RTT, the worst bin.
  assert.equal(failing[0].value, null);
  assert.equal(failing[0].bin, 'f4');
});

test('pairs without data are cells of their own kind', () => {
  const m = matrix(2);
  for (const col of Object.values(m.cells)) col.splice(1, 1); // drop tor-001 -> tor-002
  const grid = buildGrid(m, 'loss');
  assert.deepEqual(grid.cells.map((c) => c.state), ['ok', 'nodata', 'ok', 'ok']);
  assert.equal(grid.cells[1].bin, 'nd');
});

test('bins: lighter within the SLA, darker beyond it', () => {
  const loss = (value, state = value > SLA.maxLossRatio ? 'failing' : 'ok') => bin('loss', { value, state }, SLA.maxLossRatio);
  assert.deepEqual([0, 0.002, 0.005, 0.01].map((v) => loss(v)), ['h0', 'h1', 'h2', 'h3']);
  assert.deepEqual([0.02, 0.05, 0.2, 0.5, 1].map((v) => loss(v)), ['f1', 'f2', 'f3', 'f4', 'f4']);
  const rtt = (value) => bin('p99', { value, state: value > 500000 ? 'failing' : 'ok' }, 500000);
  assert.deepEqual([4000, 100000, 250000, 500000, 600000, 9e6].map(rtt), ['h0', 'h1', 'h2', 'h3', 'f1', 'f4']);
});
