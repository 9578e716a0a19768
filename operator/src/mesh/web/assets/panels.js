// The side panels (root causes with the SLA findings they explain, the other
// findings, affected services, agents) and the drill-down into one ToR pair.
// Everything shown is escaped: names come from agents.

import { esc } from './heatmap.js';
import { formatPercent, formatNanos } from './matrix.js';

export function formatTime(ms) {
  if (!ms) return '–';
  return new Date(ms).toLocaleTimeString([], { hour12: false });
}

function findingKey(f) {
  return `${f.kind} ${f.location}`;
}

const KIND_NAMES = {
  pathLoss: 'path loss',
  pathLatency: 'path latency',
  torPairLoss: 'ToR-pair loss',
  torPairLatency: 'ToR-pair latency',
};

function findingItem(f) {
  const kind = KIND_NAMES[f.kind] ?? f.kind;
  return `<li data-finding="${esc(findingKey(f))}"><span class="kind">${esc(kind)}</span> `
    + `${esc(f.location)}<br><span class="muted">${esc(f.evidence)}; since ${esc(formatTime(f.firstBadWindowMs))}</span>`
    + `${serviceChips(f)}</li>`;
}

// A service as people name it: `Job/ml/train` (the API's id), else its name.
function serviceName(s) {
  if (typeof s === 'string') return s;
  if (s && typeof s === 'object') {
    const name = s.service ?? s.name ?? s.id;
    if (name !== undefined) return String(name);
  }
  return JSON.stringify(s);
}

// The services a root cause or finding hits (`impactedServices`, ranked by
// the controller), as chips; "+N" when it lists fewer than it counted.
function serviceChips(item) {
  const list = Array.isArray(item.impactedServices) ? item.impactedServices : [];
  if (list.length === 0) return '';
  const more = Math.max(0, (item.impactedServiceCount ?? list.length) - list.length);
  const chips = list.map((s) => {
    const detail = typeof s === 'object' ? ` title="${esc(`${s.flows ?? '?'} flows, ${s.pods ?? '?'} pods`)}"` : '';
    return `<span class="chip"${detail}>${esc(serviceName(s))}</span>`;
  });
  if (more) chips.push(`<span class="chip">+${more}</span>`);
  return `<div class="chips" aria-label="Services it hits">${chips.join('')}</div>`;
}

// The SLA findings a cause explains: the first few, the rest folded away.
const SHOWN_FINDINGS = 4;

function explainedList(explained) {
  if (explained.length === 0) return '';
  const head = explained.slice(0, SHOWN_FINDINGS).map(findingItem).join('');
  const rest = explained.slice(SHOWN_FINDINGS);
  return `<div class="muted">SLA findings it explains (${explained.length}):</div>`
    + `<ul class="findings-list">${head}</ul>`
    + (rest.length
      ? `<details><summary>${rest.length} more</summary><ul class="findings-list">${rest.map(findingItem).join('')}</ul></details>`
      : '');
}

const RATIO_NAMES = { loss: 'loss', latency: 'slow', hostDelay: 'delayed' };

function causeCard(cause, findingsByKey) {
  const ev = cause.evidence ?? {};
  const explained = (cause.explains ?? []).map((k) => findingsByKey.get(k)).filter(Boolean);
  const side = cause.side ? ` (${cause.side})` : '';
  const rows = [
    ['evidence', `${ev.failing ?? 0} of ${(ev.failing ?? 0) + (ev.healthy ?? 0)} ${esc(ev.unit ?? 'paths')} through it failing`],
    // The ratio is of lost probes for loss, of slow paths for latency.
    [RATIO_NAMES[cause.signal] ?? 'failing', `${formatPercent(ev.lossRatio)} vs ${formatPercent(ev.elsewhereLossRatio)} elsewhere`],
    ['confidence', `${Math.round((cause.confidence ?? 0) * 100)}%`],
    ['open since', esc(formatTime(cause.firstWindowMs))],
  ];
  if (cause.tor) rows.push(['ToR', esc(cause.tor)]);
  if (cause.candidates?.length) rows.push(['fits as well', esc(cause.candidates.join(', '))]);
  return `<div class="cause" data-kind="${esc(cause.kind)}" data-component="${esc(cause.component)}"`
    + ` data-tor="${esc(cause.tor ?? '')}">`
    + `<div class="head"><span class="badge">${esc(cause.kind)}</span>`
    + `<span class="badge signal">${esc(cause.signal)}</span>`
    + `<span class="component">${esc(cause.component)}${esc(side)}</span></div>`
    + `<div class="summary">${esc(cause.summary ?? '')}</div>`
    + `<dl>${rows.map(([k, v]) => `<dt>${k}</dt><dd>${v}</dd>`).join('')}</dl>`
    + serviceChips(cause)
    + explainedList(explained)
    + '</div>';
}

// GET /api/v1/findings: {rootCauses, findings}.
export function renderFindings(causesEl, findingsEl, counts, view) {
  const causes = view?.rootCauses ?? [];
  const findings = view?.findings ?? [];
  const byKey = new Map(findings.map((f) => [findingKey(f), f]));
  const explained = new Set(causes.flatMap((c) => c.explains ?? []));
  const others = findings.filter((f) => !explained.has(findingKey(f)));
  counts.causes.textContent = causes.length ? `(${causes.length})` : '';
  counts.findings.textContent = others.length ? `(${others.length})` : '';
  causesEl.innerHTML = causes.length
    ? causes.map((c) => causeCard(c, byKey)).join('')
    : '<p class="muted">None open.</p>';
  const shown = 8;
  findingsEl.innerHTML = others.length
    ? `<ul class="findings-list">${others.slice(0, shown).map(findingItem).join('')}</ul>`
      + (others.length > shown
        ? `<details><summary>${others.length - shown} more</summary><ul class="findings-list">${others.slice(shown).map(findingItem).join('')}</ul></details>`
        : '')
    : `<p class="muted">${findings.length ? 'Every open finding is explained by a root cause above.' : 'None open.'}</p>`;
}

// GET /api/v1/services: {reportingNodes, services: [{service, flows, pods,
// nodes, impactedBy, ...}]}; `null`: not served by this controller.
export function renderServices(el, view) {
  if (view === null) {
    el.innerHTML = '<p class="muted">Service awareness is not served by this controller.</p>';
    return;
  }
  const all = Array.isArray(view?.services) ? view.services : [];
  const hit = all.filter((s) => Array.isArray(s?.impactedBy) && s.impactedBy.length > 0);
  const traced = `${all.length} service${all.length === 1 ? '' : 's'} traced`
    + (view?.reportingNodes !== undefined ? ` on ${view.reportingNodes} nodes` : '');
  if (hit.length === 0) {
    el.innerHTML = `<p class="muted">No service crosses an open fault (${esc(traced)}).</p>`;
    return;
  }
  const items = hit.map((s) => `<li data-service="${esc(serviceName(s))}"><span class="kind">${esc(serviceName(s))}</span>`
    + `<br><span class="muted">${esc(`${s.flows ?? 0} flows, ${s.pods ?? 0} pods on ${s.nodes ?? 0} nodes`)}</span>`
    + `<div class="chips" aria-label="Hit by">${s.impactedBy.map((h) => `<span class="chip">${esc(h)}</span>`).join('')}</div></li>`);
  el.innerHTML = `<ul class="findings-list">${items.join('')}</ul><p class="muted">${esc(traced)}</p>`;
}

// GET /api/v1/agents.
export function renderAgents(el, countEl, agents) {
  const list = Array.isArray(agents) ? [...agents] : [];
  list.sort((a, b) => Number(a.connected) - Number(b.connected) || String(a.node).localeCompare(String(b.node), undefined, { numeric: true }));
  const up = list.filter((a) => a.connected).length;
  countEl.textContent = `(${up}/${list.length} connected)`;
  if (list.length === 0) {
    el.innerHTML = '<p class="muted">No agent has registered.</p>';
    return;
  }
  const rows = list.map((a) => {
    const tors = [...new Set((a.endpoints ?? []).map((e) => e.tor))].join(', ');
    const state = a.connected ? '<span class="dot up"></span>connected' : '<span class="dot down"></span>disconnected';
    return `<tr data-node="${esc(a.node)}" data-connected="${a.connected}"><td>${esc(a.node)}</td><td>${state}</td>`
      + `<td>${esc(tors)}</td><td class="num">${(a.endpoints ?? []).length}</td>`
      + `<td>${esc(formatTime(a.last_seen_ms))}</td></tr>`;
  });
  el.innerHTML = '<div class="table-wrap"><table><thead><tr><th>node</th><th>state</th><th>ToR</th>'
    + '<th class="num" title="endpoints">EPs</th><th>last seen</th></tr></thead>'
    + `<tbody>${rows.join('')}</tbody></table></div>`;
}

function pathRow(p) {
  const bad = p.loss === 'violated' || p.latency === 'violated';
  return `<tr class="${bad ? 'bad' : ''}"><td>${esc(p.sourceEndpoint)}</td><td>${esc(p.targetEndpoint)}</td>`
    + `<td>${esc(p.kind)}</td><td class="num">${p.ok}</td><td class="num">${p.lost}</td><td class="num">${p.invalid}</td>`
    + `<td class="num">${esc(formatPercent(p.lossRatio))}</td><td class="num">${esc(formatNanos(p.p50NetworkRttNs))}</td>`
    + `<td class="num">${esc(formatNanos(p.p99NetworkRttNs))}</td><td>${esc(p.loss)} / ${esc(p.latency)}</td></tr>`;
}

// The drill-down: one ToR pair's numbers and, while the window keeps them, its paths.
// `paths`: the list, or a string saying why there is none.
export function renderDrill(el, pair, windowStartMs, paths) {
  const probes = pair.ok + pair.lost;
  const head = `<button type="button" class="close" data-close>Close</button>`
    + `<h3>${esc(pair.source)} → ${esc(pair.target)} <span class="muted">window ${esc(formatTime(windowStartMs))}</span></h3>`
    + `<p>${pair.pairs ? `${pair.ok} answered, ${pair.lost} lost (${formatPercent(probes ? pair.lost / probes : null)}), `
      + `${pair.invalid} invalid over ${pair.paths} paths; p99 network RTT ${esc(formatNanos(pair.p99))}` : 'Not probed in this window.'}</p>`;
  let body;
  if (typeof paths === 'string') {
    body = `<p class="muted">${esc(paths)}</p>`;
  } else if (paths.length === 0) {
    body = '<p class="muted">No path between these ToRs in this window.</p>';
  } else {
    const sorted = [...paths].sort((a, b) => (b.lossRatio ?? -1) - (a.lossRatio ?? -1)
      || (b.p99NetworkRttNs ?? 0) - (a.p99NetworkRttNs ?? 0));
    body = '<div class="table-wrap"><table id="paths-table"><thead><tr><th>source</th><th>target</th><th>kind</th>'
      + '<th class="num">ok</th><th class="num">lost</th><th class="num">invalid</th><th class="num">loss</th>'
      + '<th class="num">p50</th><th class="num">p99</th><th>SLA loss / latency</th></tr></thead>'
      + `<tbody>${sorted.map(pathRow).join('')}</tbody></table></div>`;
  }
  el.innerHTML = head + body;
  el.hidden = false;
}
