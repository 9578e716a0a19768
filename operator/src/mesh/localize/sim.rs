//! A synthetic Clos fabric for exercising localization: endpoints under ToRs
//! (optionally rail-optimized: a host's RNICs on different ToRs), spines
//! between ToRs with per-flow ECMP, a pinglist shaped like the controller's
//! (full ToR mesh, a few sampled inter-ToR targets), random loss faults and
//! background noise. It produces exactly what the analyzer hands the
//! localizer: per-path window statistics, placements and flow traces.
//!
//! Used by the localizer's tests and by `benches/localize.rs`, the
//! simulator that publishes precision and recall.

use std::collections::HashMap;
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::TraceBook;
use crate::mesh::analyzer::{Judgement, PathStats, ProbeKind};

/// Shape of the fabric and of the probing.
#[derive(Debug, Clone)]
pub struct FabricSpec {
    pub spines: u32,
    /// ToR groups; each has `rails` ToRs when rail-optimized, else one.
    pub groups: u32,
    pub hosts_per_group: u32,
    pub rnics_per_host: u32,
    /// RNIC r of every host of a group hangs off the group's ToR r.
    pub rail_optimized: bool,
    /// Probes per ToR-mesh path and per inter-ToR path in a window.
    pub tor_mesh_probes: u32,
    pub inter_tor_probes: u32,
    /// ToRs each ToR samples, and targets per sampled ToR, per endpoint.
    pub inter_tor_sample_tors: u32,
    /// Flows (source ports / flow labels) per inter-ToR target.
    pub inter_tor_flows: u32,
    /// Per-probe loss anywhere, on healthy paths too.
    pub background_loss: f64,
}

impl FabricSpec {
    /// ToRs in the fabric.
    pub fn tors(&self) -> u32 {
        if self.rail_optimized {
            self.groups * self.rnics_per_host
        } else {
            self.groups
        }
    }

    pub fn hosts(&self) -> u32 {
        self.groups * self.hosts_per_group
    }

    pub fn endpoints(&self) -> u32 {
        self.hosts() * self.rnics_per_host
    }
}

/// One injected fault: which component drops what share of the packets crossing it.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// An RNIC; `send`/`receive` say which of its directions drop.
    Endpoint {
        endpoint: u32,
        send: bool,
        receive: bool,
        loss: f64,
    },
    Host {
        host: u32,
        loss: f64,
    },
    Tor {
        tor: u32,
        loss: f64,
    },
    /// The link from spine `spine` down to ToR `tor`.
    Downlink {
        spine: u32,
        tor: u32,
        loss: f64,
    },
    /// The link from ToR `tor` up to spine `spine`.
    Uplink {
        tor: u32,
        spine: u32,
        loss: f64,
    },
    Spine {
        spine: u32,
        loss: f64,
    },
}

/// Names the fabric uses.
pub fn endpoint_name(e: u32, spec: &FabricSpec) -> String {
    let (h, r) = (e / spec.rnics_per_host, e % spec.rnics_per_host);
    format!("{}/mlx5_{r}", host_name(h))
}

pub fn host_name(h: u32) -> String {
    format!("host-{h:05}")
}

pub fn tor_name(t: u32) -> String {
    format!("tor-{t:04}")
}

pub fn spine_name(s: u32) -> String {
    format!("spine-{s:02}")
}

/// A fabric's fixed parts: placements and pinglists.
#[derive(Debug)]
pub struct Fabric {
    pub spec: FabricSpec,
    pub endpoint_names: Vec<String>,
    pub host_of: Vec<u32>,
    pub tor_of: Vec<u32>,
    pub node_of_name: HashMap<String, String>,
    /// (source, target, inter-ToR).
    pub pinglist: Vec<(u32, u32, bool)>,
    tor_names: Vec<Arc<str>>,
    spine_names: Vec<Arc<str>>,
}

impl Fabric {
    pub fn new(spec: FabricSpec, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let endpoints = spec.endpoints();
        let mut endpoint_names = Vec::with_capacity(endpoints as usize);
        let (mut host_of, mut tor_of) = (Vec::new(), Vec::new());
        let mut node_of_name = HashMap::new();
        let tors = spec.tors();
        let mut under: Vec<Vec<u32>> = vec![Vec::new(); tors as usize];
        for e in 0..endpoints {
            let h = e / spec.rnics_per_host;
            let r = e % spec.rnics_per_host;
            let group = h / spec.hosts_per_group;
            let t = if spec.rail_optimized {
                group * spec.rnics_per_host + r
            } else {
                group
            };
            let name = endpoint_name(e, &spec);
            node_of_name.insert(name.clone(), host_name(h));
            endpoint_names.push(name);
            host_of.push(h);
            tor_of.push(t);
            under[t as usize].push(e);
        }
        let mut pinglist = Vec::new();
        for e in 0..endpoints {
            let t = tor_of[e as usize];
            for &peer in &under[t as usize] {
                if host_of[peer as usize] != host_of[e as usize] {
                    pinglist.push((e, peer, false));
                }
            }
            if tors > 1 {
                for _ in 0..spec.inter_tor_sample_tors.min(tors - 1) {
                    let mut other = rng.random_range(0..tors - 1);
                    if other >= t {
                        other += 1;
                    }
                    let peers = &under[other as usize];
                    if !peers.is_empty() {
                        pinglist.push((e, peers[rng.random_range(0..peers.len())], true));
                    }
                }
            }
        }
        Self {
            tor_names: (0..tors).map(|t| Arc::from(tor_name(t))).collect(),
            spine_names: (0..spec.spines).map(|s| Arc::from(spine_name(s))).collect(),
            spec,
            endpoint_names,
            host_of,
            tor_of,
            node_of_name,
            pinglist,
        }
    }

    /// The spine a flow of (source, target) hashes onto.
    fn spine(&self, source: u32, target: u32, flow: u32) -> u32 {
        let mut x = (u64::from(source) << 40) ^ (u64::from(target) << 8) ^ u64::from(flow);
        // splitmix64 finalizer: a fixed, well-spread ECMP hash.
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^= x >> 31;
        (x % u64::from(self.spec.spines)) as u32
    }

    /// Chance that one packet from `a` to `b` over `spine` survives the faults.
    fn one_way(&self, a: u32, b: u32, spine: Option<u32>, faults: &[Fault]) -> f64 {
        let (ta, tb) = (self.tor_of[a as usize], self.tor_of[b as usize]);
        let (ha, hb) = (self.host_of[a as usize], self.host_of[b as usize]);
        let mut pass = 1.0;
        for f in faults {
            let drop = match *f {
                Fault::Endpoint {
                    endpoint,
                    send,
                    receive,
                    loss,
                } if (endpoint == a && send) || (endpoint == b && receive) => loss,
                Fault::Host { host, loss } if host == ha || host == hb => loss,
                Fault::Tor { tor, loss } if tor == ta || tor == tb => loss,
                Fault::Downlink {
                    spine: s,
                    tor,
                    loss,
                } if spine == Some(s) && tor == tb => loss,
                Fault::Uplink {
                    tor,
                    spine: s,
                    loss,
                } if spine == Some(s) && tor == ta => loss,
                Fault::Spine { spine: s, loss } if spine == Some(s) => loss,
                _ => 0.0,
            };
            pass *= 1.0 - drop;
        }
        pass
    }

    /// One window of probing under `faults`: path statistics as the analyzer
    /// makes them, and the traces of every probed inter-ToR flow.
    pub fn window(
        &self,
        faults: &[Fault],
        seed: u64,
        max_loss_ratio: f64,
    ) -> (Vec<PathStats>, TraceBook) {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut paths = Vec::with_capacity(self.pinglist.len());
        let mut traces = TraceBook::default();
        let noise = 1.0 - self.spec.background_loss;
        for &(s, t, inter) in &self.pinglist {
            let (probes, flows) = if inter {
                (self.spec.inter_tor_probes, self.spec.inter_tor_flows.max(1))
            } else {
                (self.spec.tor_mesh_probes, 1)
            };
            let first_flow = rng.random_range(0..flows);
            let (mut ok, mut lost) = (0u64, 0u64);
            let (mut probed_mask, mut lost_mask) = (0u64, 0u64);
            for i in 0..probes {
                let flow = (first_flow + i) % flows;
                let (there, back) = if inter {
                    (Some(self.spine(s, t, flow)), Some(self.spine(t, s, flow)))
                } else {
                    (None, None)
                };
                let pass = self.one_way(s, t, there, faults)
                    * self.one_way(t, s, back, faults)
                    * noise
                    * noise;
                let bit = 1u64 << (flow % 64);
                probed_mask |= bit;
                if rng.random::<f64>() < pass {
                    ok += 1;
                } else {
                    lost += 1;
                    lost_mask |= bit;
                }
                if inter {
                    let source = &self.endpoint_names[s as usize];
                    let target = &self.endpoint_names[t as usize];
                    let (ts, tt) = (self.tor_of[s as usize], self.tor_of[t as usize]);
                    traces.insert(
                        source,
                        target,
                        flow as u16,
                        vec![
                            self.tor_names[ts as usize].clone(),
                            self.spine_names[self.spine(s, t, flow) as usize].clone(),
                            self.tor_names[tt as usize].clone(),
                        ],
                    );
                    traces.insert_return(
                        source,
                        target,
                        flow as u16,
                        vec![
                            self.tor_names[tt as usize].clone(),
                            self.spine_names[self.spine(t, s, flow) as usize].clone(),
                            self.tor_names[ts as usize].clone(),
                        ],
                    );
                }
            }
            let ratio = lost as f64 / (ok + lost).max(1) as f64;
            paths.push(PathStats {
                source_endpoint: self.endpoint_names[s as usize].clone(),
                target_endpoint: self.endpoint_names[t as usize].clone(),
                source_tor: tor_name(self.tor_of[s as usize]),
                target_tor: tor_name(self.tor_of[t as usize]),
                kind: if inter {
                    ProbeKind::InterTor
                } else {
                    ProbeKind::TorMesh
                },
                ok,
                lost,
                invalid: 0,
                software_timed: 0,
                loss_ratio: Some(ratio),
                p50_network_rtt_ns: None,
                p99_network_rtt_ns: None,
                lost_flows_mask: lost_mask,
                probed_flows_mask: probed_mask,
                prober_p99_ns: None,
                responder_p99_ns: None,
                loss: if ok + lost < 10 {
                    Judgement::NotJudged
                } else if ratio > max_loss_ratio {
                    Judgement::Violated
                } else {
                    Judgement::Met
                },
                latency: Judgement::NotJudged,
            });
        }
        (paths, traces)
    }
}
