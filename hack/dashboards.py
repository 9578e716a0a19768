#!/usr/bin/env python3
"""Writes the Grafana dashboards of the Helm chart (charts/pingmesh/dashboards/).

The JSON files are generated so that panel layout, datasource wiring and
PromQL stay consistent across dashboards; edit this file, then run

    python3 hack/dashboards.py          # rewrite the JSON files
    python3 hack/dashboards.py --check  # exit 1 if they are out of date

Only metric names documented in docs/metrics.md (and the operator's
pingmesh_reconcile_* and pingmesh_operator_* series) may appear; hack/validate-manifests.sh parses
every expression with promtool.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parent.parent / "charts" / "pingmesh" / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"
PAIR = 'src_tor="$src_tor", dst_tor="$dst_tor"'
NODE = 'node=~"$node"'
GRID_WIDTH = 24


class Layout:
    """Places panels left to right, wrapping at Grafana's 24-column grid."""

    def __init__(self) -> None:
        self.x = 0
        self.y = 0
        self.row_height = 0
        self.next_id = 1

    def place(self, width: int, height: int) -> tuple[int, dict]:
        if self.x + width > GRID_WIDTH:
            self.newline()
        pos = {"x": self.x, "y": self.y, "w": width, "h": height}
        self.x += width
        self.row_height = max(self.row_height, height)
        panel_id = self.next_id
        self.next_id += 1
        return panel_id, pos

    def newline(self) -> None:
        if self.x:
            self.y += self.row_height
        self.x = 0
        self.row_height = 0


def target(expr: str, legend: str = "", ref: str = "A", **extra) -> dict:
    t = {"datasource": DATASOURCE, "expr": expr, "refId": ref, "legendFormat": legend or "__auto"}
    t.update(extra)
    return t


def thresholds(*steps: tuple[float | None, str]) -> dict:
    return {"mode": "absolute", "steps": [{"color": c, "value": v} for v, c in steps]}


LOSS_THRESHOLDS = thresholds((None, "green"), (0.001, "yellow"), (0.01, "red"))
RTT_THRESHOLDS = thresholds((None, "green"), (0.0003, "yellow"), (0.0005, "red"))


class Dashboard:
    def __init__(self, uid: str, title: str, description: str) -> None:
        self.uid = uid
        self.title = title
        self.description = description
        self.layout = Layout()
        self.panels: list[dict] = []
        self.variables: list[dict] = [
            {
                "name": "datasource",
                "label": "Data source",
                "type": "datasource",
                "query": "prometheus",
                "current": {},
                "hide": 0,
                "refresh": 1,
                "options": [],
            }
        ]

    def query_variable(self, name: str, label: str, query: str, *, multi: bool = False) -> None:
        var = {
            "name": name,
            "label": label,
            "type": "query",
            "datasource": DATASOURCE,
            "definition": query,
            "query": {"query": query, "refId": f"{name}-query", "qryType": 1},
            "refresh": 2,
            "sort": 1,
            "current": {},
            "options": [],
            "hide": 0,
            "includeAll": multi,
            "multi": multi,
        }
        if multi:
            # ".+" rather than ".*": "All" must not match series without the label.
            var["allValue"] = ".+"
        self.variables.append(var)

    def row(self, title: str) -> None:
        self.layout.newline()
        panel_id, pos = self.layout.place(GRID_WIDTH, 1)
        self.panels.append(
            {"id": panel_id, "type": "row", "title": title, "gridPos": pos, "collapsed": False, "panels": []}
        )
        self.layout.newline()

    def _panel(self, kind: str, title: str, description: str, width: int, height: int, targets: list[dict]) -> dict:
        panel_id, pos = self.layout.place(width, height)
        panel = {
            "id": panel_id,
            "type": kind,
            "title": title,
            "description": description,
            "datasource": DATASOURCE,
            "gridPos": pos,
            "targets": targets,
        }
        self.panels.append(panel)
        return panel

    def stat(self, title: str, description: str, expr: str, *, unit: str = "short", width: int = 4,
             steps: dict | None = None, decimals: int | None = None) -> dict:
        panel = self._panel("stat", title, description, width, 4, [target(expr, instant=True, range=False)])
        defaults: dict = {"unit": unit, "thresholds": steps or thresholds((None, "green"))}
        if decimals is not None:
            defaults["decimals"] = decimals
        panel["fieldConfig"] = {"defaults": defaults, "overrides": []}
        panel["options"] = {
            "colorMode": "background" if steps else "value",
            "graphMode": "none",
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "textMode": "value",
        }
        return panel

    def timeseries(self, title: str, description: str, targets: list[dict], *, unit: str = "short",
                   width: int = 12, height: int = 8, stack: bool = False, steps: dict | None = None) -> dict:
        panel = self._panel("timeseries", title, description, width, height, targets)
        custom = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never", "spanNulls": False}
        if stack:
            custom["stacking"] = {"mode": "normal", "group": "A"}
        defaults = {"unit": unit, "custom": custom, "min": 0}
        if steps:
            defaults["thresholds"] = steps
            custom["thresholdsStyle"] = {"mode": "dashed"}
        panel["fieldConfig"] = {"defaults": defaults, "overrides": []}
        panel["options"] = {
            "legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
        return panel

    def table(self, title: str, description: str, targets: list[dict], *, unit: str = "short",
              width: int = 12, height: int = 10, steps: dict | None = None,
              transformations: list[dict] | None = None, links: list[dict] | None = None) -> dict:
        panel = self._panel("table", title, description, width, height, targets)
        defaults: dict = {"unit": unit, "custom": {"align": "auto", "cellOptions": {"type": "auto"}}}
        if steps:
            defaults["thresholds"] = steps
            defaults["custom"]["cellOptions"] = {"type": "color-background", "mode": "basic"}
        if links:
            defaults["links"] = links
        panel["fieldConfig"] = {"defaults": defaults, "overrides": []}
        panel["options"] = {"showHeader": True, "cellHeight": "sm", "footer": {"show": False}}
        panel["transformations"] = transformations or []
        return panel

    def matrix(self, title: str, description: str, expr: str, *, unit: str, steps: dict) -> dict:
        """A ToR x ToR matrix: rows are source ToRs, columns destination ToRs."""
        return self.table(
            title,
            description,
            [target(expr, format="table", instant=True, range=False)],
            unit=unit,
            steps=steps,
            transformations=[
                {
                    "id": "groupingToMatrix",
                    "options": {"columnField": "dst_tor", "rowField": "src_tor", "valueField": "Value",
                                "emptyValue": "null"},
                }
            ],
        )

    def heatmap(self, title: str, description: str, expr: str, *, width: int = 12, height: int = 9) -> dict:
        panel = self._panel("heatmap", title, description, width, height,
                            [target(expr, legend="{{le}}", format="heatmap")])
        panel["options"] = {
            "calculate": False,
            "cellGap": 1,
            "color": {"mode": "scheme", "scheme": "Oranges", "scale": "exponential", "exponent": 0.5, "steps": 64},
            "yAxis": {"unit": "s", "axisPlacement": "left"},
            "rowsFrame": {"layout": "auto"},
            "tooltip": {"mode": "single", "yHistogram": True},
            "legend": {"show": True},
        }
        panel["fieldConfig"] = {"defaults": {"custom": {"scaleDistribution": {"type": "linear"}}}, "overrides": []}
        return panel

    def state_timeline(self, title: str, description: str, expr: str, legend: str, *,
                       width: int = 24, height: int = 8) -> dict:
        panel = self._panel("state-timeline", title, description, width, height, [target(expr, legend=legend)])
        panel["fieldConfig"] = {
            "defaults": {
                "mappings": [
                    {"type": "value", "options": {"0": {"text": "disconnected", "color": "red"},
                                                  "1": {"text": "connected", "color": "green"}}}
                ],
                "thresholds": thresholds((None, "red"), (1, "green")),
                "color": {"mode": "thresholds"},
            },
            "overrides": [],
        }
        panel["options"] = {"showValue": "never", "mergeValues": True, "rowHeight": 0.8,
                            "legend": {"showLegend": False}}
        return panel

    def to_json(self) -> dict:
        return {
            "uid": self.uid,
            "title": self.title,
            "description": self.description,
            "tags": ["pingmesh"],
            "editable": True,
            "graphTooltip": 1,
            "schemaVersion": 39,
            "version": 1,
            "refresh": "30s",
            "time": {"from": "now-1h", "to": "now"},
            "timepicker": {},
            "timezone": "browser",
            "fiscalYearStartMonth": 0,
            "liveNow": False,
            "annotations": {"list": []},
            "links": [
                {"type": "dashboards", "tags": ["pingmesh"], "asDropdown": True, "title": "PingMesh",
                 "includeVars": False, "keepTime": True}
            ],
            "templating": {"list": self.variables},
            "panels": self.panels,
        }


def ratio(numerator: str, denominator: str) -> str:
    """numerator / denominator where the denominator is non-zero (no clamping, no NaN)."""
    return f"{numerator}\n/\n({denominator} > 0)"


def loss_ratio(selector: str, by: str = "") -> str:
    grouping = f" by ({by})" if by else ""
    lost = f'sum{grouping} (rate(pingmesh_probes_total{{{selector}{", " if selector else ""}result="lost"}}[{RATE}]))'
    judged = f'sum{grouping} (rate(pingmesh_probes_total{{{selector}{", " if selector else ""}result=~"ok|lost"}}[{RATE}]))'
    return ratio(lost, judged)


def quantile(q: float, metric: str, selector: str, by: str = "") -> str:
    grouping = f"{by}, le" if by else "le"
    matchers = f"{{{selector}}}" if selector else ""
    return f"histogram_quantile({q}, sum by ({grouping}) (rate({metric}_bucket{matchers}[{RATE}])))"


DRILLDOWN_LINK = [
    {
        "title": "ToR pair ${__data.fields.src_tor} -> ${__data.fields.dst_tor}",
        "url": "/d/pingmesh-tor-pair?var-src_tor=${__data.fields.src_tor}&var-dst_tor=${__data.fields.dst_tor}"
               "&${datasource:queryparam}&${__url_time_range}",
    }
]


def overview() -> Dashboard:
    d = Dashboard(
        "pingmesh-overview",
        "PingMesh / Mesh overview",
        "ToR x ToR loss and p99 network RTT from the mesh controller's last judged window, "
        "worst pairs, probe rate, open root causes and findings.",
    )
    d.row("Now")
    d.stat("Open findings", "Findings the analyzer holds open (all kinds).",
           "sum(pingmesh_findings_open)", steps=thresholds((None, "green"), (1, "red")), width=4)
    d.stat("Agents connected", "Agents with an open pinglist stream to the mesh controller.",
           'sum(pingmesh_controller_agents{state="connected"})', width=4)
    d.stat("Agents registered", "Agents in the registry (expired after the stale timeout).",
           'max(pingmesh_controller_agents{state="registered"})', width=4)
    d.stat("Endpoints", "Probe-able endpoints (RNICs or UDP addresses) in the registry.",
           "max(pingmesh_controller_endpoints)", width=4)
    d.stat("Probe rate", "Probes finished per second across all agents.",
           f"sum(rate(pingmesh_probes_total[{RATE}]))", unit="reqps", width=4)
    d.stat("Fleet loss", "Lost / (ok + lost) over all agents; invalid samples are not loss.",
           loss_ratio(""), unit="percentunit", steps=LOSS_THRESHOLDS, width=4, decimals=3)
    d.row("Root causes (localized faults)")
    d.stat("Open root causes", "Faults the localizer names and holds open (all kinds): an endpoint, host, ToR, "
           "link or switch. Details: /api/v1/findings and RootCauseLocalized Events.",
           "sum(pingmesh_localized_faults)", steps=thresholds((None, "green"), (1, "red")), width=4)
    d.stat("Nodes at fault", "Nodes an open endpoint or host root cause names (their spec.nodeHealth "
           "condition is False when enabled).",
           "max(pingmesh_operator_faulty_nodes)", steps=thresholds((None, "green"), (1, "red")), width=4)
    d.table("Open root causes by kind and signal",
            "pingmesh_localized_faults: open root causes by component kind (endpoint, host, tor, link, switch, "
            "unknown) and signal (loss, latency, host_delay). Which component, its evidence and the findings it "
            "explains: the mesh API (/api/v1/findings), RootCauseLocalized Events on the PingMesh and on Nodes.",
            [target("sum by (kind, signal) (pingmesh_localized_faults) > 0",
                    format="table", instant=True, range=False)],
            width=8, height=8,
            transformations=[{"id": "organize", "options": {"excludeByName": {"Time": True},
                                                            "renameByName": {"Value": "open"}}},
                             {"id": "sortBy", "options": {"sort": [{"field": "open", "desc": True}]}}])
    d.timeseries("Open root causes over time", "pingmesh_localized_faults by kind and signal.",
                 [target("sum by (kind, signal) (pingmesh_localized_faults)", "{{kind}} {{signal}}")],
                 width=8, height=8, stack=True)
    d.row("Services hit by faults")
    d.stat("Services hit", "pingmesh_services_impacted: services (workloads named after their pods' owners) whose "
           "traced connections cross an open root cause or SLA finding. Which faults hit which service: the mesh "
           "API (/api/v1/services), the PingMesh status (affectedServices) and RootCauseHitsService Events on the "
           "workloads. Needs spec.tracing.enabled.",
           "max(pingmesh_services_impacted)", steps=thresholds((None, "green"), (1, "red")), width=4)
    d.table("Services hit by faults (top by affected connections)",
            "pingmesh_service_impact_flows and pingmesh_service_impact_pods: the connections (TCP) or queue pairs "
            "(RDMA) of each service that cross an open fault, and its pods with such connections; only the top "
            "services.metricsTopServices (default 10) services have series.",
            [target("max by (kind, namespace, service) (pingmesh_service_impact_flows) > 0",
                    ref="A", format="table", instant=True, range=False),
             target("max by (kind, namespace, service) (pingmesh_service_impact_pods)",
                    ref="B", format="table", instant=True, range=False)],
            width=10, height=8,
            transformations=[{"id": "merge", "options": {}},
                             {"id": "organize", "options": {"excludeByName": {"Time": True},
                                                            "renameByName": {"Value #A": "connections",
                                                                             "Value #B": "pods"}}},
                             {"id": "filterByValue", "options": {
                                 "filters": [{"fieldName": "connections",
                                              "config": {"id": "isNull", "options": {}}}],
                                 "match": "any", "type": "exclude"}},
                             {"id": "sortBy", "options": {"sort": [{"field": "connections", "desc": True}]}}])
    d.timeseries("Connections of the services hit",
                 "pingmesh_service_impact_flows of each top service over time, and pingmesh_services_impacted.",
                 [target("max by (service) (pingmesh_service_impact_flows) > 0", "{{service}}"),
                  target("max(pingmesh_services_impacted)", "services hit", ref="B")],
                 width=10, height=8)
    d.row("ToR x ToR (last judged window)")
    d.matrix("Loss ratio matrix (rows: source ToR, columns: destination ToR)",
             "pingmesh_tor_pair_loss_ratio. Empty cells: the pair was not probed in the last window.",
             "max by (src_tor, dst_tor) (pingmesh_tor_pair_loss_ratio)",
             unit="percentunit", steps=LOSS_THRESHOLDS)
    d.matrix("p99 network RTT matrix (rows: source ToR, columns: destination ToR)",
             "pingmesh_tor_pair_network_rtt_p99_seconds: network RTT with prober and responder host delay removed.",
             "max by (src_tor, dst_tor) (pingmesh_tor_pair_network_rtt_p99_seconds)",
             unit="s", steps=RTT_THRESHOLDS)
    d.row("Worst pairs")
    d.table("Worst pairs by loss", "The 10 ToR pairs with the highest loss ratio; click a row to drill down.",
            [target("topk(10, max by (src_tor, dst_tor) (pingmesh_tor_pair_loss_ratio) > 0)",
                    format="table", instant=True, range=False)],
            unit="percentunit", steps=LOSS_THRESHOLDS, links=DRILLDOWN_LINK,
            transformations=[{"id": "organize", "options": {"excludeByName": {"Time": True},
                                                            "renameByName": {"Value": "loss ratio"}}},
                             {"id": "sortBy", "options": {"sort": [{"field": "loss ratio", "desc": True}]}}])
    d.table("Worst pairs by p99 network RTT", "The 10 ToR pairs with the highest p99 network RTT.",
            [target("topk(10, max by (src_tor, dst_tor) (pingmesh_tor_pair_network_rtt_p99_seconds))",
                    format="table", instant=True, range=False)],
            unit="s", steps=RTT_THRESHOLDS, links=DRILLDOWN_LINK,
            transformations=[{"id": "organize", "options": {"excludeByName": {"Time": True},
                                                            "renameByName": {"Value": "p99 network RTT"}}},
                             {"id": "sortBy", "options": {"sort": [{"field": "p99 network RTT", "desc": True}]}}])
    d.row("Trends")
    d.timeseries("Probe rate by result", "ok: both ACKs back in time; lost: timed out; invalid: failed validity checks.",
                 [target(f"sum by (result) (rate(pingmesh_probes_total[{RATE}]))", "{{result}}")],
                 unit="reqps", stack=True)
    d.timeseries("Open findings by kind", "pingmesh_findings_open.",
                 [target("sum by (kind) (pingmesh_findings_open)", "{{kind}}")], stack=True)
    d.timeseries("Worst 5 pairs: loss ratio", "pingmesh_tor_pair_loss_ratio of the 5 worst pairs at each step.",
                 [target("topk(5, max by (src_tor, dst_tor) (pingmesh_tor_pair_loss_ratio))",
                         "{{src_tor}} -> {{dst_tor}}")], unit="percentunit", steps=LOSS_THRESHOLDS)
    d.timeseries("Worst 5 pairs: p99 network RTT",
                 "pingmesh_tor_pair_network_rtt_p99_seconds of the 5 worst pairs at each step.",
                 [target("topk(5, max by (src_tor, dst_tor) (pingmesh_tor_pair_network_rtt_p99_seconds))",
                         "{{src_tor}} -> {{dst_tor}}")], unit="s", steps=RTT_THRESHOLDS)
    d.timeseries("Findings opened", "New findings per interval, by kind.",
                 [target(f"sum by (kind) (increase(pingmesh_findings_opened_total[{RATE}]))", "{{kind}}")],
                 width=24)
    return d


def tor_pair() -> Dashboard:
    d = Dashboard(
        "pingmesh-tor-pair",
        "PingMesh / ToR pair",
        "One source ToR to one destination ToR: RTT distribution, percentiles, loss, "
        "and the prober and responder host delays kept out of the network RTT.",
    )
    d.query_variable("src_tor", "Source ToR", "label_values(pingmesh_probes_total, src_tor)")
    d.query_variable("dst_tor", "Destination ToR",
                     'label_values(pingmesh_probes_total{src_tor="$src_tor"}, dst_tor)')
    d.row("Controller verdict (last judged window)")
    d.stat("Loss ratio", "pingmesh_tor_pair_loss_ratio for this pair.",
           f"max(pingmesh_tor_pair_loss_ratio{{{PAIR}}})", unit="percentunit",
           steps=LOSS_THRESHOLDS, width=6, decimals=3)
    d.stat("p99 network RTT", "pingmesh_tor_pair_network_rtt_p99_seconds for this pair.",
           f"max(pingmesh_tor_pair_network_rtt_p99_seconds{{{PAIR}}})", unit="s", steps=RTT_THRESHOLDS, width=6)
    d.stat("Probes ok (window)", "Answered probes in the last judged window.",
           f'sum(pingmesh_tor_pair_window_probes{{{PAIR}, result="ok"}})', width=4)
    d.stat("Probes lost (window)", "Lost probes in the last judged window.",
           f'sum(pingmesh_tor_pair_window_probes{{{PAIR}, result="lost"}})',
           steps=thresholds((None, "green"), (1, "orange")), width=4)
    d.stat("Probes invalid (window)", "Samples that failed validity checks (not counted as loss).",
           f'sum(pingmesh_tor_pair_window_probes{{{PAIR}, result="invalid"}})', width=4)
    d.row("Network RTT")
    d.heatmap("Network RTT distribution",
              "pingmesh_network_rtt_seconds buckets from every prober in the source ToR to the destination ToR.",
              f"sum by (le) (rate(pingmesh_network_rtt_seconds_bucket{{{PAIR}}}[{RATE}]))")
    d.timeseries("Network RTT percentiles",
                 "p50/p90/p99 from the agents' histograms, and the controller's per-window p99.",
                 [target(quantile(0.5, "pingmesh_network_rtt_seconds", PAIR), "p50", "A"),
                  target(quantile(0.9, "pingmesh_network_rtt_seconds", PAIR), "p90", "B"),
                  target(quantile(0.99, "pingmesh_network_rtt_seconds", PAIR), "p99", "C"),
                  target(f"max(pingmesh_tor_pair_network_rtt_p99_seconds{{{PAIR}}})", "controller p99", "D")],
                 unit="s", steps=RTT_THRESHOLDS)
    d.row("Loss")
    d.timeseries("Loss ratio", "From the agents' counters (lost / (ok + lost)) and the controller's window verdict.",
                 [target(loss_ratio(PAIR), "agents", "A"),
                  target(f"max(pingmesh_tor_pair_loss_ratio{{{PAIR}}})", "controller", "B")],
                 unit="percentunit", steps=LOSS_THRESHOLDS)
    d.timeseries("Probes by result", "Probe outcomes per second for this pair.",
                 [target(f"sum by (result) (rate(pingmesh_probes_total{{{PAIR}}}[{RATE}]))", "{{result}}")],
                 unit="reqps", stack=True)
    d.row("Per source node (is one RNIC or host the problem?)")
    d.timeseries("Loss ratio by source node",
                 "A single node losing while its ToR peers do not points at that node's NIC or host.",
                 [target(loss_ratio(PAIR, by="node"), "{{node}}")], unit="percentunit", steps=LOSS_THRESHOLDS)
    d.timeseries("p99 network RTT by source node", "Per-prober p99 towards the destination ToR.",
                 [target(quantile(0.99, "pingmesh_network_rtt_seconds", PAIR, by="node"), "{{node}}")],
                 unit="s", steps=RTT_THRESHOLDS)
    d.row("Host delays (kept out of the network RTT)")
    d.timeseries("Prober delay (source ToR)",
                 "(T6 - T1) - (T5 - T2): time the probing hosts in the source ToR spent around each probe.",
                 [target(quantile(0.5, "pingmesh_prober_delay_seconds", 'src_tor="$src_tor"'), "p50", "A"),
                  target(quantile(0.99, "pingmesh_prober_delay_seconds", 'src_tor="$src_tor"'), "p99", "B")],
                 unit="s")
    d.timeseries("Responder delay (slowest responders)",
                 "T4 - T3 reported by responders. The series carry only the responder's node, not its ToR: "
                 "this shows the 5 responders with the highest p99 fleet-wide.",
                 [target("topk(5, " + quantile(0.99, "pingmesh_responder_delay_seconds", "", by="node") + ")",
                         "{{node}} p99")],
                 unit="s")
    return d


def nodes() -> Dashboard:
    d = Dashboard(
        "pingmesh-nodes",
        "PingMesh / Nodes and endpoints",
        "Per-node agent health: controller connection, probe results, timestamp quality, "
        "and packets or samples the agent refused.",
    )
    d.query_variable("node", "Node", "label_values(pingmesh_controller_connected, node)", multi=True)
    d.row("Agents")
    d.state_timeline("Controller connection", "pingmesh_controller_connected: 1 while the pinglist stream is open.",
                     f"max by (node) (pingmesh_controller_connected{{{NODE}}})", "{{node}}")
    d.table("Transport", "Which transport each agent runs, with which timestamps, and why.",
            [target(f"max by (node, transport, timestamps, reason) (pingmesh_transport_info{{{NODE}}})",
                    format="table", instant=True, range=False)],
            transformations=[{"id": "organize", "options": {"excludeByName": {"Time": True, "Value": True}}}])
    d.timeseries("Pinglist targets", "Targets in each agent's current pinglist, by kind.",
                 [target(f"sum by (node, kind) (pingmesh_pinglist_targets{{{NODE}}})", "{{node}} {{kind}}")])
    d.row("Probe results")
    d.timeseries("Probes by node and result", "Probe outcomes per second.",
                 [target(f"sum by (node, result) (rate(pingmesh_probes_total{{{NODE}}}[{RATE}]))",
                         "{{node}} {{result}}")], unit="reqps")
    d.timeseries("Loss ratio by node", "lost / (ok + lost) of each prober, all destinations.",
                 [target(loss_ratio(NODE, by="node"), "{{node}}")], unit="percentunit", steps=LOSS_THRESHOLDS)
    d.timeseries("Software-timed share",
                 "Share of valid samples timed in user space (no kernel or NIC timestamps): "
                 "their network RTT includes host scheduling noise.",
                 [target(ratio(
                     f"sum by (node) (rate(pingmesh_software_timed_samples_total{{{NODE}}}[{RATE}]))",
                     f'sum by (node) (rate(pingmesh_probes_total{{{NODE}, result="ok"}}[{RATE}]))'), "{{node}}")],
                 unit="percentunit")
    d.timeseries("Probes in flight", "pingmesh_pending_probes: probes awaiting their ACKs.",
                 [target(f"max by (node) (pingmesh_pending_probes{{{NODE}}})", "{{node}}")])
    d.row("Refused and dropped")
    d.timeseries("Invalid samples", "Samples that failed validity checks, by reason (counted apart from loss).",
                 [target(f"sum by (node, reason) (rate(pingmesh_invalid_samples_total{{{NODE}}}[{RATE}]))",
                         "{{node}} {{reason}}")], unit="cps")
    d.timeseries("Malformed packets", "Datagrams that failed strict decoding, by role and reason.",
                 [target(f"sum by (node, role, reason) (rate(pingmesh_malformed_packets_total{{{NODE}}}[{RATE}]))",
                         "{{node}} {{role}} {{reason}}")], unit="cps")
    d.timeseries("Unmatched ACKs", "Late, duplicate or foreign ACKs, by reason.",
                 [target(f"sum by (node, reason) (rate(pingmesh_unmatched_acks_total{{{NODE}}}[{RATE}]))",
                         "{{node}} {{reason}}")], unit="cps")
    d.timeseries("Probes not sent", "Probes the agent could not send, by reason.",
                 [target(f"sum by (node, reason) (rate(pingmesh_probes_not_sent_total{{{NODE}}}[{RATE}]))",
                         "{{node}} {{reason}}")], unit="cps")
    d.timeseries("Responder answers by timestamp source", "Probes answered with both ACKs, kernel vs software stamps.",
                 [target(f"sum by (node, timestamps) (rate(pingmesh_responder_answered_total{{{NODE}}}[{RATE}]))",
                         "{{node}} {{timestamps}}")], unit="reqps")
    d.timeseries("Window summaries dropped", "Summaries the agent could not deliver to the controller, by reason.",
                 [target(f"sum by (node, reason) "
                         f"(rate(pingmesh_window_summaries_dropped_total{{{NODE}}}[{RATE}]))",
                         "{{node}} {{reason}}")], unit="cps")
    return d


def operator() -> Dashboard:
    d = Dashboard(
        "pingmesh-operator",
        "PingMesh / Operator",
        "The operator process: mesh controller (registry, window evaluation, localization, API) and the PingMesh "
        "reconciler.",
    )
    d.row("Mesh controller")
    d.stat("Agents connected", "Agents with an open pinglist stream.",
           'sum(pingmesh_controller_agents{state="connected"})', width=6)
    d.stat("Agents registered", "Agents in the registry.",
           'max(pingmesh_controller_agents{state="registered"})', width=6)
    d.stat("Endpoints", "Endpoints in the registry.", "max(pingmesh_controller_endpoints)", width=6)
    d.stat("Windows evaluated / min", "Windows the analyzer judged per minute.",
           f"sum(rate(pingmesh_controller_windows_evaluated_total[{RATE}])) * 60", width=6, decimals=1)
    d.timeseries("Agents by state", "registered vs connected.",
                 [target('max(pingmesh_controller_agents{state="registered"})', "registered", "A"),
                  target('sum(pingmesh_controller_agents{state="connected"})', "connected", "B")])
    d.timeseries("Window summaries by result", "Summaries received from agents: accepted, duplicate, or why rejected.",
                 [target(f"sum by (result) (rate(pingmesh_controller_window_summaries_total[{RATE}]))", "{{result}}")],
                 unit="reqps")
    d.timeseries("Rejected requests", "Agent requests the controller refused, by RPC and reason.",
                 [target(f"sum by (rpc, reason) (rate(pingmesh_controller_rejected_requests_total[{RATE}]))",
                         "{{rpc}} {{reason}}")], unit="reqps")
    d.timeseries("Registry errors", "Registry store (SQLite or rqlite) errors by category.",
                 [target(f"sum by (category) (rate(pingmesh_controller_registry_errors_total[{RATE}]))",
                         "{{category}}")], unit="cps")
    d.timeseries("Registrations by result", "Agent registrations seen by the controller.",
                 [target(f'sum by (result) (rate(pingmesh_controller_registrations_total{{node=""}}[{RATE}]))',
                         "{{result}}")], unit="reqps")
    d.timeseries("Paths excluded from judgement", "Paths left out of a window, by reason (e.g. target gone).",
                 [target(f"sum by (reason) (rate(pingmesh_controller_excluded_paths_total[{RATE}]))", "{{reason}}")],
                 unit="cps")
    d.timeseries("Findings opened", "New findings per interval, by kind.",
                 [target(f"sum by (kind) (increase(pingmesh_findings_opened_total[{RATE}]))", "{{kind}}")])
    d.timeseries("Open findings", "pingmesh_findings_open by kind.",
                 [target("sum by (kind) (pingmesh_findings_open)", "{{kind}}")])
    d.timeseries("Root causes opened", "New root causes (localized faults) per interval, by kind and signal.",
                 [target(f"sum by (kind, signal) (increase(pingmesh_root_causes_opened_total[{RATE}]))",
                         "{{kind}} {{signal}}")])
    d.timeseries("Root causes localized (last window, before hysteresis)",
                 "pingmesh_root_causes_localized: what the last judged window localized, before the "
                 "hysteresis that opens and clears root causes (pingmesh_localized_faults).",
                 [target("sum by (kind, signal) (pingmesh_root_causes_localized)", "{{kind}} {{signal}}", "A"),
                  target("sum(pingmesh_localized_faults)", "open (after hysteresis)", "B")])
    d.row("Reconciler")
    d.timeseries("Reconciles by result", "PingMesh reconciles per second.",
                 [target(f"sum by (result) (rate(pingmesh_reconcile_total[{RATE}]))", "{{result}}")],
                 unit="reqps", width=8)
    d.timeseries("Reconcile duration", "p50 and p99 of one reconcile.",
                 [target(quantile(0.5, "pingmesh_reconcile_duration_seconds", ""), "p50", "A"),
                  target(quantile(0.99, "pingmesh_reconcile_duration_seconds", ""), "p99", "B")],
                 unit="s", width=8)
    d.timeseries("Reconcile errors", "Reconcile errors by category.",
                 [target(f"sum by (category) (rate(pingmesh_reconcile_errors_total[{RATE}]))", "{{category}}")],
                 unit="cps", width=8)
    d.row("Leadership, Events and Node conditions")
    d.stat("Leaders", "Replicas holding the leader Lease: 1 in a healthy install.",
           "sum(pingmesh_operator_leader)", width=6)
    d.stat("Nodes with a localized fault", "Nodes an open endpoint or host root cause names (Node condition False "
           "when on).",
           "max(pingmesh_operator_faulty_nodes)", width=6)
    d.timeseries("Finding Events by result", "Events published when root causes and findings open and clear, on the "
                 "PingMesh and on Nodes.",
                 [target(f"sum by (object, result) (rate(pingmesh_operator_finding_events_total[{RATE}]))",
                         "{{object}} {{result}}")], unit="cps", width=6)
    d.timeseries("Node condition writes by result", "Sets and removals of the spec.nodeHealth condition.",
                 [target(f"sum by (result) (rate(pingmesh_operator_node_condition_writes_total[{RATE}]))",
                         "{{result}}")], unit="cps", width=6)
    return d


DASHBOARDS = {
    "mesh-overview.json": overview,
    "tor-pair.json": tor_pair,
    "nodes.json": nodes,
    "operator.json": operator,
}


def render(build) -> str:
    return json.dumps(build().to_json(), indent=2, sort_keys=False) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if a file differs from what would be written")
    args = parser.parse_args()
    stale = []
    for name, build in DASHBOARDS.items():
        path = OUT_DIR / name
        text = render(build)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            OUT_DIR.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    unknown = sorted(p.name for p in OUT_DIR.glob("*.json") if p.name not in DASHBOARDS)
    if unknown:
        print(f"dashboards not generated by {Path(__file__).name}: {', '.join(unknown)}", file=sys.stderr)
        return 1
    if stale:
        print("out of date (run python3 hack/dashboards.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
