//! What a service is called. A flow belongs to a pod (its cgroup says which)
//! or to a process outside pods; a service is the workload that owns the pod:
//! the `Job`, `StatefulSet`, `Deployment` (through its `ReplicaSet`),
//! `DaemonSet`, or whatever controller owns it (a `JobSet`, a `PyTorchJob`...).
//!
//! The mesh core knows nothing of Kubernetes: the operator hands it a
//! [`PodResolver`] backed by a Pod cache. Without one (`standalone`), or while
//! the cache does not know a pod yet, a service is named by its pod UID; flows
//! outside pods are named by the process's command.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Service kind of flows whose pod the resolver does not know.
pub const UNRESOLVED_POD_KIND: &str = "PodUID";
/// Service kind of flows outside pods.
pub const PROCESS_KIND: &str = "Process";
/// Service kind of pods without a controlling owner.
pub const POD_KIND: &str = "Pod";

/// The object that controls a pod, as its owner references name it (one
/// level above the `ReplicaSet` or `Job` when those are owned in turn).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadRef {
    pub api_version: String,
    pub kind: String,
    pub name: String,
    pub uid: String,
}

/// A pod as the resolver knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodIdentity {
    pub namespace: String,
    pub name: String,
    /// The workload that controls it; `None` for a bare pod.
    pub owner: Option<WorkloadRef>,
}

/// Where the controller learns which pod a UID is (in a cluster: the
/// operator's Pod cache, see `reconcile::pods`).
pub trait PodResolver: Send + Sync + fmt::Debug {
    /// The pod with `uid` (lower case), or `None` when not (yet) known.
    fn pod(&self, uid: &str) -> Option<PodIdentity>;
}

/// Who owns a flow on one node: a pod, or a process outside pods.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FlowOwner {
    Pod { uid: String },
    Process { command: String, pid: u32 },
}

/// A service's name: what people and dashboards see.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceName {
    /// Owner kind (`Job`, `StatefulSet`, ...), `Pod`, `PodUID` or `Process`.
    pub kind: String,
    /// Empty for `PodUID` and `Process` services.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    pub name: String,
}

impl ServiceName {
    /// `Job/team-a/train-llm`, `PodUID/0b7f...`, `Process/ib_write_bw`: unique
    /// per service, used as its id in the API and as the `service` metric label.
    pub fn key(&self) -> String {
        if self.namespace.is_empty() {
            format!("{}/{}", self.kind, self.name)
        } else {
            format!("{}/{}/{}", self.kind, self.namespace, self.name)
        }
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.key())
    }
}

/// A service as named from one flow owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Named {
    pub service: ServiceName,
    /// The workload to put Events on (resolved pods with an owner).
    pub workload: Option<WorkloadRef>,
    /// `namespace/pod` when the resolver knew the pod.
    pub pod: Option<String>,
}

/// Names the service `owner` belongs to.
pub fn name_service(owner: &FlowOwner, resolver: Option<&dyn PodResolver>) -> Named {
    match owner {
        FlowOwner::Process { command, .. } => Named {
            service: ServiceName {
                kind: PROCESS_KIND.to_owned(),
                namespace: String::new(),
                name: if command.is_empty() {
                    "unknown".to_owned()
                } else {
                    command.clone()
                },
            },
            workload: None,
            pod: None,
        },
        FlowOwner::Pod { uid } => match resolver.and_then(|r| r.pod(uid)) {
            Some(pod) => {
                let pod_name = format!("{}/{}", pod.namespace, pod.name);
                match pod.owner {
                    Some(owner) => Named {
                        service: ServiceName {
                            kind: owner.kind.clone(),
                            namespace: pod.namespace,
                            name: owner.name.clone(),
                        },
                        workload: Some(owner),
                        pod: Some(pod_name),
                    },
                    None => Named {
                        service: ServiceName {
                            kind: POD_KIND.to_owned(),
                            namespace: pod.namespace,
                            name: pod.name,
                        },
                        workload: None,
                        pod: Some(pod_name),
                    },
                }
            }
            None => Named {
                service: ServiceName {
                    kind: UNRESOLVED_POD_KIND.to_owned(),
                    namespace: String::new(),
                    name: uid.clone(),
                },
                workload: None,
                pod: None,
            },
        },
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::HashMap;

    use super::*;

    /// A resolver over a fixed map: what a Pod cache would answer.
    #[derive(Debug, Default)]
    pub struct FixedPods(pub HashMap<String, PodIdentity>);

    impl PodResolver for FixedPods {
        fn pod(&self, uid: &str) -> Option<PodIdentity> {
            self.0.get(uid).cloned()
        }
    }

    pub fn job(name: &str) -> WorkloadRef {
        WorkloadRef {
            api_version: "batch/v1".to_owned(),
            kind: "Job".to_owned(),
            name: name.to_owned(),
            uid: format!("uid-{name}"),
        }
    }

    #[test]
    fn a_resolved_pod_is_named_by_its_owner_and_a_bare_pod_by_itself() {
        let mut pods = FixedPods::default();
        pods.0.insert(
            "u1".to_owned(),
            PodIdentity {
                namespace: "ml".to_owned(),
                name: "train-0".to_owned(),
                owner: Some(job("train")),
            },
        );
        pods.0.insert(
            "u2".to_owned(),
            PodIdentity {
                namespace: "ml".to_owned(),
                name: "debug".to_owned(),
                owner: None,
            },
        );
        let named = name_service(&FlowOwner::Pod { uid: "u1".into() }, Some(&pods));
        assert_eq!(named.service.key(), "Job/ml/train");
        assert_eq!(named.workload, Some(job("train")));
        assert_eq!(named.pod.as_deref(), Some("ml/train-0"));
        let bare = name_service(&FlowOwner::Pod { uid: "u2".into() }, Some(&pods));
        assert_eq!(bare.service.key(), "Pod/ml/debug");
        assert_eq!(bare.workload, None);
    }

    #[test]
    fn without_a_resolver_services_are_named_by_pod_uid_or_command() {
        let pod = name_service(&FlowOwner::Pod { uid: "u9".into() }, None);
        assert_eq!(pod.service.key(), "PodUID/u9");
        let process = name_service(
            &FlowOwner::Process {
                command: "ib_write_bw".into(),
                pid: 7,
            },
            None,
        );
        assert_eq!(process.service.key(), "Process/ib_write_bw");
        let unknown = name_service(
            &FlowOwner::Process {
                command: String::new(),
                pid: 7,
            },
            None,
        );
        assert_eq!(unknown.service.key(), "Process/unknown");
    }

    #[test]
    fn a_pod_the_resolver_does_not_know_yet_is_named_by_its_uid() {
        let pods = FixedPods::default();
        let named = name_service(&FlowOwner::Pod { uid: "u3".into() }, Some(&pods));
        assert_eq!(named.service.kind, UNRESOLVED_POD_KIND);
    }
}
