//! Path-level evidence: one observation per path and window (the last few
//! closed windows together, so that sparse inter-ToR probes add up), through
//! the components a path crosses, named by the registry's placement.
//!
//! Components, by index (E endpoints, N nodes, T ToRs):
//! endpoint out / in / both, host out / in / both, ToR, the links between a
//! ToR and the spine layer (its inter-ToR paths, either way: a probe and its
//! ACK cross them in opposite directions, so round trips cannot tell an
//! uplink from a downlink; traced flows can), and the inter-ToR fabric as a
//! whole. "Out" is the prober side, "in" the responder side.

use super::engine::{Evidence, Tally};
use super::rows::{EndpointTable, PathRow};
use crate::mesh::analyzer::Judgement;

/// Which kind of component an index stands for, and which entity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Component {
    EndpointOut(u32),
    EndpointIn(u32),
    Endpoint(u32),
    HostOut(u32),
    HostIn(u32),
    Host(u32),
    Tor(u32),
    /// The links between a ToR and the spine layer, both directions.
    TorLinks(u32),
    Fabric,
}

/// What the paths measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PathSignal {
    /// Lost of (ok + lost) probes.
    Loss,
    /// One observation per latency-judged path, failing when over the SLA.
    Latency,
}

/// One path, by this evidence's indices.
#[derive(Debug, Clone, Copy)]
struct Row {
    source: u32,
    target: u32,
    probes: u64,
    lost: u64,
}

/// The paths of a few windows with their ends numbered densely, in the order
/// they first appear (the table's numbers also cover endpoints on no row
/// here: other windows' and departed ones).
#[derive(Debug)]
pub(super) struct PathEvidence<'a> {
    pub endpoints: Vec<&'a str>,
    pub nodes: Vec<&'a str>,
    pub tors: Vec<&'a str>,
    node_of: Vec<u32>,
    tor_of: Vec<u32>,
    endpoints_of_node: Vec<Vec<u32>>,
    endpoints_of_tor: Vec<Vec<u32>>,
    nodes_per_tor: Vec<u32>,
    rows: Vec<Row>,
    /// Which window and path each row came from.
    row_path: Vec<(u32, u32)>,
    windows: &'a [&'a [PathRow]],
    table: &'a EndpointTable,
    /// Table number -> index here (`u32::MAX`: on no row).
    local_of: Vec<u32>,
    /// (row, prober p99, responder p99) of the rows with host delays, so
    /// that host-delay checks need not read every path again.
    host_delays: Vec<(u32, Option<u64>, Option<u64>)>,
    /// Paths by source endpoint and by target endpoint (CSR).
    out_start: Vec<u32>,
    out_rows: Vec<u32>,
    in_start: Vec<u32>,
    in_rows: Vec<u32>,
}

/// Dense indices for table numbers, handed out on first sight.
struct Dense {
    local: Vec<u32>,
    members: Vec<u32>,
}

impl Dense {
    fn new(numbers: usize) -> Self {
        Self {
            local: vec![u32::MAX; numbers],
            members: Vec::new(),
        }
    }

    /// (index, first sight).
    fn get(&mut self, number: u32) -> (u32, bool) {
        let at = number as usize;
        if at >= self.local.len() {
            // Rows only hold numbers of their table; stay safe regardless.
            self.local.resize(at + 1, u32::MAX);
        }
        if self.local[at] != u32::MAX {
            return (self.local[at], false);
        }
        self.local[at] = self.members.len() as u32;
        self.members.push(number);
        (self.local[at], true)
    }
}

impl<'a> PathEvidence<'a> {
    /// The observations of `windows` (oldest first) for `signal`, their
    /// ends read in `table`.
    pub fn new(windows: &'a [&'a [PathRow]], table: &'a EndpointTable, signal: PathSignal) -> Self {
        let mut endpoints = Dense::new(table.len());
        let mut nodes = Dense::new(table.node_count());
        let mut tors = Dense::new(table.tor_count());
        let (mut node_of_ep, mut tor_of_ep) = (Vec::new(), Vec::new());
        let total: usize = windows.iter().map(|w| w.len()).sum();
        let mut rows = Vec::with_capacity(total);
        let mut row_path = Vec::with_capacity(total);
        let mut host_delays = Vec::new();
        let mut local = |number: u32| {
            let (e, new) = endpoints.get(number);
            if new {
                node_of_ep.push(nodes.get(table.node_of(number)).0);
                tor_of_ep.push(tors.get(table.tor_of(number)).0);
            }
            e
        };
        for (w, i, p) in windows
            .iter()
            .enumerate()
            .flat_map(|(w, paths)| paths.iter().enumerate().map(move |(i, p)| (w, i, p)))
        {
            let (probes, lost) = match signal {
                PathSignal::Loss => (p.ok.saturating_add(p.lost), p.lost),
                PathSignal::Latency => match p.latency {
                    Judgement::NotJudged => (0, 0),
                    Judgement::Met => (1, 0),
                    Judgement::Violated => (1, 1),
                },
            };
            if probes == 0 {
                continue;
            }
            let (source, target) = (local(p.source), local(p.target));
            if p.prober_p99_ns.is_some() || p.responder_p99_ns.is_some() {
                host_delays.push((rows.len() as u32, p.prober_p99_ns, p.responder_p99_ns));
            }
            rows.push(Row {
                source,
                target,
                probes,
                lost,
            });
            row_path.push((w as u32, u32::try_from(i).unwrap_or(u32::MAX)));
        }
        let named = |numbers: &[u32], name: fn(&'a EndpointTable, u32) -> &'a str| {
            numbers.iter().map(|&i| name(table, i)).collect::<Vec<_>>()
        };
        let endpoint_names = named(&endpoints.members, EndpointTable::endpoint_name);
        let nodes = named(&nodes.members, EndpointTable::node_name);
        let tors = named(&tors.members, EndpointTable::tor_name);
        let local_of = endpoints.local;
        let endpoints = endpoint_names;
        let mut endpoints_of_node = vec![Vec::new(); nodes.len()];
        let mut endpoints_of_tor = vec![Vec::new(); tors.len()];
        for e in 0..endpoints.len() {
            endpoints_of_node[node_of_ep[e] as usize].push(e as u32);
            endpoints_of_tor[tor_of_ep[e] as usize].push(e as u32);
        }
        let nodes_per_tor = count_nodes(&endpoints_of_tor, &node_of_ep, nodes.len());
        let (out_start, out_rows) = csr(endpoints.len(), rows.iter().map(|r| r.source));
        let (in_start, in_rows) = csr(endpoints.len(), rows.iter().map(|r| r.target));
        Self {
            endpoints,
            nodes,
            tors,
            node_of: node_of_ep,
            tor_of: tor_of_ep,
            endpoints_of_node,
            endpoints_of_tor,
            nodes_per_tor,
            rows,
            row_path,
            windows,
            table,
            local_of,
            host_delays,
            out_start,
            out_rows,
            in_start,
            in_rows,
        }
    }

    fn e(&self) -> u32 {
        self.endpoints.len() as u32
    }

    fn n(&self) -> u32 {
        self.nodes.len() as u32
    }

    fn t(&self) -> u32 {
        self.tors.len() as u32
    }

    pub fn component(&self, c: u32) -> Component {
        let (e, n, t) = (self.e(), self.n(), self.t());
        match c {
            c if c < e => Component::EndpointOut(c),
            c if c < 2 * e => Component::EndpointIn(c - e),
            c if c < 3 * e => Component::Endpoint(c - 2 * e),
            c if c < 3 * e + n => Component::HostOut(c - 3 * e),
            c if c < 3 * e + 2 * n => Component::HostIn(c - 3 * e - n),
            c if c < 3 * e + 3 * n => Component::Host(c - 3 * e - 2 * n),
            c if c < 3 * e + 3 * n + t => Component::Tor(c - 3 * e - 3 * n),
            c if c < 3 * e + 3 * n + 2 * t => Component::TorLinks(c - 3 * e - 3 * n - t),
            _ => Component::Fabric,
        }
    }

    pub fn index(&self, component: Component) -> u32 {
        let (e, n, t) = (self.e(), self.n(), self.t());
        match component {
            Component::EndpointOut(i) => i,
            Component::EndpointIn(i) => e + i,
            Component::Endpoint(i) => 2 * e + i,
            Component::HostOut(i) => 3 * e + i,
            Component::HostIn(i) => 3 * e + n + i,
            Component::Host(i) => 3 * e + 2 * n + i,
            Component::Tor(i) => 3 * e + 3 * n + i,
            Component::TorLinks(i) => 3 * e + 3 * n + t + i,
            Component::Fabric => 3 * e + 3 * n + 2 * t,
        }
    }

    pub fn node_of(&self, endpoint: u32) -> u32 {
        self.node_of[endpoint as usize]
    }

    pub fn tor_of(&self, endpoint: u32) -> u32 {
        self.tor_of[endpoint as usize]
    }

    pub fn endpoints_of_node(&self, node: u32) -> &[u32] {
        &self.endpoints_of_node[node as usize]
    }

    pub fn nodes_under(&self, tor: u32) -> u32 {
        self.nodes_per_tor[tor as usize]
    }

    /// ToR of a node (of its first endpoint).
    pub fn tor_of_node(&self, node: u32) -> Option<u32> {
        self.endpoints_of_node[node as usize]
            .first()
            .map(|&e| self.tor_of(e))
    }

    /// (source, target) endpoint indices of a row.
    pub fn ends(&self, row: u32) -> (u32, u32) {
        let r = &self.rows[row as usize];
        (r.source, r.target)
    }

    /// Index of an endpoint id, when it is on a row.
    pub fn endpoint_index(&self, id: &str) -> Option<u32> {
        let local = *self.local_of.get(self.table.get(id)? as usize)?;
        (local != u32::MAX).then_some(local)
    }

    /// The path a row came from.
    pub fn path(&self, row: u32) -> &'a PathRow {
        let (w, i) = self.row_path[row as usize];
        &self.windows[w as usize][i as usize]
    }

    /// (row, prober p99, responder p99) of every row with a host delay.
    pub fn host_delays(&self) -> &[(u32, Option<u64>, Option<u64>)] {
        &self.host_delays
    }

    /// The first row of window `window` or of a later one (rows are in
    /// window order).
    pub fn first_row_of(&self, window: u32) -> u32 {
        self.row_path.partition_point(|&(w, _)| w < window) as u32
    }

    /// Windows given.
    pub fn window_count(&self) -> u32 {
        self.windows.len() as u32
    }

    /// Rows (observations) there are.
    pub fn rows(&self) -> u32 {
        self.rows.len() as u32
    }

    /// Every component the path between two endpoints crosses (at most
    /// [`MAX_CROSSED`]), in a fixed array: this runs for every path, and
    /// pushing onto a vector one by one cost as much as the rest of it.
    pub fn components_between(&self, source: u32, target: u32) -> Crossed {
        let (ns, nt) = (self.node_of(source), self.node_of(target));
        let (ts, tt) = (self.tor_of(source), self.tor_of(target));
        let mut out = Crossed::default();
        out.push(self.index(Component::EndpointOut(source)));
        out.push(self.index(Component::EndpointIn(target)));
        out.push(self.index(Component::Endpoint(source)));
        if source != target {
            out.push(self.index(Component::Endpoint(target)));
        }
        out.push(self.index(Component::HostOut(ns)));
        out.push(self.index(Component::HostIn(nt)));
        out.push(self.index(Component::Host(ns)));
        if ns != nt {
            out.push(self.index(Component::Host(nt)));
        }
        out.push(self.index(Component::Tor(ts)));
        if ts != tt {
            out.push(self.index(Component::Tor(tt)));
            out.push(self.index(Component::TorLinks(ts)));
            out.push(self.index(Component::TorLinks(tt)));
            out.push(self.index(Component::Fabric));
        }
        out
    }

    /// The tallies of every component over all rows, as adding each row
    /// to every component it crosses ([`Self::components_between`]) gives
    /// them, from sums by endpoint: two sums a row instead of thirteen
    /// (this pass over every path was most of the search's time).
    /// `failing(probes, lost)` says whether a row counts as failing.
    fn tallies(&self, failing: &dyn Fn(u64, u64) -> bool) -> Vec<Tally> {
        let endpoints = self.endpoints.len();
        let mut out = vec![Tally::default(); endpoints];
        let mut inn = vec![Tally::default(); endpoints];
        // Rows whose two ends share the endpoint, the node or the ToR: the
        // sums by endpoint count them twice for that component.
        let mut same_endpoint = vec![Tally::default(); endpoints];
        let mut same_node = vec![Tally::default(); self.nodes.len()];
        let mut same_tor = vec![Tally::default(); self.tors.len()];
        let mut links = vec![Tally::default(); self.tors.len()];
        let mut fabric = Tally::default();
        for r in &self.rows {
            let row = Tally {
                probes: r.probes,
                lost: r.lost,
                observations: 1,
                failing: u64::from(failing(r.probes, r.lost)),
            };
            let (source, target) = (r.source as usize, r.target as usize);
            out[source].add(&row);
            inn[target].add(&row);
            if source == target {
                same_endpoint[source].add(&row);
            }
            let node = self.node_of[source];
            if node == self.node_of[target] {
                same_node[node as usize].add(&row);
            }
            let (source_tor, target_tor) = (self.tor_of[source], self.tor_of[target]);
            if source_tor == target_tor {
                same_tor[source_tor as usize].add(&row);
            } else {
                links[source_tor as usize].add(&row);
                links[target_tor as usize].add(&row);
                fabric.add(&row);
            }
        }
        let mut tallies = vec![Tally::default(); self.component_count()];
        let at = |c: Component| self.index(c) as usize;
        for (endpoint, (sent, received)) in out.iter().zip(&inn).enumerate() {
            let id = endpoint as u32;
            tallies[at(Component::EndpointOut(id))] = *sent;
            tallies[at(Component::EndpointIn(id))] = *received;
            let both = &mut tallies[at(Component::Endpoint(id))];
            both.add(sent);
            both.add(received);
            both.sub(&same_endpoint[endpoint]);
            let node = self.node_of[endpoint];
            tallies[at(Component::HostOut(node))].add(sent);
            tallies[at(Component::HostIn(node))].add(received);
            let tor = &mut tallies[at(Component::Tor(self.tor_of[endpoint]))];
            tor.add(sent);
            tor.add(received);
        }
        for (node, twice) in same_node.iter().enumerate() {
            let id = node as u32;
            let sent = tallies[at(Component::HostOut(id))];
            let received = tallies[at(Component::HostIn(id))];
            let host = &mut tallies[at(Component::Host(id))];
            host.add(&sent);
            host.add(&received);
            host.sub(twice);
        }
        for (tor, (twice, crossing)) in same_tor.iter().zip(&links).enumerate() {
            let id = tor as u32;
            tallies[at(Component::Tor(id))].sub(twice);
            tallies[at(Component::TorLinks(id))] = *crossing;
        }
        tallies[at(Component::Fabric)] = fabric;
        tallies
    }

    fn out_of(&self, e: u32) -> &[u32] {
        &self.out_rows[self.out_start[e as usize] as usize..self.out_start[e as usize + 1] as usize]
    }

    fn into(&self, e: u32) -> &[u32] {
        &self.in_rows[self.in_start[e as usize] as usize..self.in_start[e as usize + 1] as usize]
    }
}

/// Nodes under each ToR (a node counts once however many of its
/// endpoints are there).
fn count_nodes(endpoints_of_tor: &[Vec<u32>], node_of: &[u32], nodes: usize) -> Vec<u32> {
    let mut nodes_per_tor = vec![0u32; endpoints_of_tor.len()];
    let mut seen = vec![u32::MAX; nodes];
    for (t, eps) in endpoints_of_tor.iter().enumerate() {
        for &e in eps {
            let n = node_of[e as usize] as usize;
            if seen[n] != t as u32 {
                seen[n] = t as u32;
                nodes_per_tor[t] += 1;
            }
        }
    }
    nodes_per_tor
}

/// Most components one path crosses.
pub(super) const MAX_CROSSED: usize = 13;

/// The components one path crosses.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Crossed {
    ids: [u32; MAX_CROSSED],
    len: u8,
}

impl Crossed {
    fn push(&mut self, id: u32) {
        // At most MAX_CROSSED pushes by construction (components_between).
        if let Some(slot) = self.ids.get_mut(usize::from(self.len)) {
            *slot = id;
            self.len += 1;
        }
    }

    pub fn as_slice(&self) -> &[u32] {
        &self.ids[..usize::from(self.len)]
    }
}

/// Compressed rows: for keys `0..keys`, the positions of `items` holding each.
fn csr(keys: usize, items: impl Iterator<Item = u32> + Clone) -> (Vec<u32>, Vec<u32>) {
    let mut start = vec![0u32; keys + 1];
    for k in items.clone() {
        start[k as usize + 1] += 1;
    }
    for i in 0..keys {
        start[i + 1] += start[i];
    }
    let mut fill = start.clone();
    let mut rows = vec![0u32; start[keys] as usize];
    for (i, k) in items.enumerate() {
        let slot = &mut fill[k as usize];
        rows[*slot as usize] = i as u32;
        *slot += 1;
    }
    (start, rows)
}

impl Evidence for PathEvidence<'_> {
    fn component_count(&self) -> usize {
        (3 * self.e() + 3 * self.n() + 2 * self.t() + 1) as usize
    }

    fn observation_count(&self) -> usize {
        self.rows.len()
    }

    fn counts(&self, o: u32) -> (u64, u64) {
        let r = &self.rows[o as usize];
        (r.probes, r.lost)
    }

    fn components_of(&self, o: u32, out: &mut Vec<u32>) {
        let (s, t) = self.ends(o);
        out.extend_from_slice(self.components_between(s, t).as_slice());
    }

    fn initial_tallies(&self, failing: &dyn Fn(u64, u64) -> bool) -> Option<Vec<Tally>> {
        Some(self.tallies(failing))
    }

    fn observations_of(&self, c: u32, out: &mut Vec<u32>) {
        match self.component(c) {
            Component::EndpointOut(e) => out.extend(self.out_of(e)),
            Component::EndpointIn(e) => out.extend(self.into(e)),
            Component::Endpoint(e) => {
                out.extend(self.out_of(e));
                out.extend(self.into(e));
            }
            Component::HostOut(n) => {
                for &e in self.endpoints_of_node(n) {
                    out.extend(self.out_of(e));
                }
            }
            Component::HostIn(n) => {
                for &e in self.endpoints_of_node(n) {
                    out.extend(self.into(e));
                }
            }
            Component::Host(n) => {
                for &e in self.endpoints_of_node(n) {
                    out.extend(self.out_of(e));
                    out.extend(self.into(e));
                }
            }
            Component::Tor(t) => {
                for &e in &self.endpoints_of_tor[t as usize] {
                    out.extend(self.out_of(e));
                    out.extend(self.into(e));
                }
            }
            Component::TorLinks(t) => {
                for &e in &self.endpoints_of_tor[t as usize] {
                    out.extend(
                        self.out_of(e)
                            .iter()
                            .filter(|&&r| self.tor_of(self.rows[r as usize].target) != t),
                    );
                    out.extend(
                        self.into(e)
                            .iter()
                            .filter(|&&r| self.tor_of(self.rows[r as usize].source) != t),
                    );
                }
            }
            Component::Fabric => out.extend((0..self.rows.len() as u32).filter(|&r| {
                let (s, t) = self.ends(r);
                self.tor_of(s) != self.tor_of(t)
            })),
        }
    }

    fn diluted(&self, c: u32) -> bool {
        matches!(
            self.component(c),
            Component::TorLinks(_) | Component::Fabric
        )
    }

    fn baseline(&self, c: u32) -> Option<u32> {
        matches!(self.component(c), Component::TorLinks(_)).then(|| self.index(Component::Fabric))
    }

    fn blamable(&self, c: u32) -> bool {
        match self.component(c) {
            // A node with one endpoint: the host stands for it (same paths).
            Component::EndpointOut(e) | Component::EndpointIn(e) | Component::Endpoint(e) => {
                self.endpoints_of_node(self.node_of(e)).len() > 1
            }
            // A ToR with one node: its host stands for it.
            Component::Tor(t) => self.nodes_per_tor[t as usize] > 1,
            _ => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::localize::rows::rows_of;
    use crate::mesh::localize::sim::{Fabric, FabricSpec, Fault};

    /// Every component's tally, one row at a time (what the search did
    /// before the sums by endpoint).
    fn tallies_row_by_row(
        evidence: &PathEvidence<'_>,
        failing: &dyn Fn(u64, u64) -> bool,
    ) -> Vec<Tally> {
        let mut tallies = vec![Tally::default(); evidence.component_count()];
        let mut crossed = Vec::new();
        for r in 0..evidence.rows() {
            let (probes, lost) = evidence.counts(r);
            let row = Tally {
                probes,
                lost,
                observations: 1,
                failing: u64::from(failing(probes, lost)),
            };
            crossed.clear();
            evidence.components_of(r, &mut crossed);
            for &c in &crossed {
                tallies[c as usize].add(&row);
            }
        }
        tallies
    }

    #[test]
    fn sums_by_endpoint_give_the_tallies_of_adding_every_row() {
        // Rail-optimized (a host's RNICs under different ToRs) and not, with
        // faults so that rows fail, and a path from an endpoint to itself.
        for rail_optimized in [true, false] {
            let spec = FabricSpec {
                spines: 4,
                groups: 3,
                hosts_per_group: 4,
                rnics_per_host: if rail_optimized { 2 } else { 1 },
                rail_optimized,
                tor_mesh_probes: 20,
                inter_tor_probes: 5,
                inter_tor_sample_tors: 2,
                inter_tor_flows: 8,
                background_loss: 1e-3,
            };
            let fabric = Fabric::new(spec, 7);
            let faults = [
                Fault::Host { host: 1, loss: 0.5 },
                Fault::Tor { tor: 2, loss: 0.1 },
            ];
            let (mut paths, _) = fabric.window(&faults, 3, 0.01);
            let mut to_itself = paths[0].clone();
            to_itself.target_endpoint = to_itself.source_endpoint.clone();
            to_itself.target_tor = to_itself.source_tor.clone();
            paths.insert(1, to_itself);
            let node_of = |e: &str| fabric.node_of_name.get(e).map(String::as_str);
            let mut table = EndpointTable::new();
            let rows = rows_of(&paths, &mut table, &node_of);
            let windows = [rows.as_slice()];
            let evidence = PathEvidence::new(&windows, &table, PathSignal::Loss);
            let failing = |probes: u64, lost: u64| lost * 10 > probes;
            let summed = evidence.tallies(&failing);
            assert!(summed.iter().any(|t| t.failing > 0));
            assert_eq!(summed, tallies_row_by_row(&evidence, &failing));
        }
    }
}
