//! Pods as the mesh controller's service names: agents report the pod UID of
//! each traced flow (from its cgroup), and the operator tells the controller
//! which pod that is and which workload owns it (see `mesh::services::identity`).
//!
//! Three metadata-only caches: Pods (indexed by UID), `ReplicaSets` and Jobs.
//! A pod's service is its controlling owner, one level up where the owner is
//! itself owned: a Deployment's `ReplicaSet` names the Deployment, a Job
//! created by a `CronJob` or a `JobSet` names that. Metadata only, so a cached pod costs
//! its name, namespace and owner references, not its spec and status. The
//! chart grants `get`, `list` and `watch` on pods, replicasets and jobs.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use futures::TryStreamExt;
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::PartialObjectMeta;
use kube::runtime::reflector::{ObjectRef, Store, store::Writer};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client, Resource};
use tokio_util::sync::CancellationToken;

use crate::mesh::services::{PodIdentity, PodResolver, WorkloadRef};

pub type PodMeta = PartialObjectMeta<Pod>;
pub type ReplicaSetMeta = PartialObjectMeta<ReplicaSet>;
pub type JobMeta = PartialObjectMeta<Job>;

/// What the index keeps of one pod.
#[derive(Debug, Clone, PartialEq)]
struct PodEntry {
    namespace: String,
    name: String,
    owner: Option<OwnerReference>,
}

/// Pods by UID, kept by [`follow_pods`].
#[derive(Debug, Default)]
pub struct PodIndex {
    by_uid: RwLock<HashMap<String, PodEntry>>,
}

impl PodIndex {
    fn entry(pod: &PodMeta) -> Option<(String, PodEntry)> {
        let meta = pod.meta();
        Some((
            meta.uid.clone()?.to_ascii_lowercase(),
            PodEntry {
                namespace: meta.namespace.clone()?,
                name: meta.name.clone()?,
                owner: controller_of(meta.owner_references.as_deref()),
            },
        ))
    }

    fn apply(&self, pod: &PodMeta) {
        if let Some((uid, entry)) = Self::entry(pod) {
            self.write().insert(uid, entry);
        }
    }

    fn delete(&self, pod: &PodMeta) {
        if let Some(uid) = &pod.meta().uid {
            self.write().remove(&uid.to_ascii_lowercase());
        }
    }

    fn replace(&self, pods: HashMap<String, PodEntry>) {
        *self.write() = pods;
    }

    fn get(&self, uid: &str) -> Option<PodEntry> {
        self.by_uid
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(uid)
            .cloned()
    }

    pub fn len(&self) -> usize {
        self.by_uid
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, PodEntry>> {
        self.by_uid.write().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The owner reference with `controller: true`, if any.
fn controller_of(owners: Option<&[OwnerReference]>) -> Option<OwnerReference> {
    owners?.iter().find(|o| o.controller == Some(true)).cloned()
}

fn workload(owner: &OwnerReference) -> WorkloadRef {
    WorkloadRef {
        api_version: owner.api_version.clone(),
        kind: owner.kind.clone(),
        name: owner.name.clone(),
        uid: owner.uid.clone(),
    }
}

/// The workload a pod's service is named after: its controlling owner, or
/// the owner's own controller for `ReplicaSets` and Jobs that have one.
/// `owner_of(kind, namespace, name)` looks up an intermediate's controller.
fn service_owner(
    owner: &OwnerReference,
    namespace: &str,
    owner_of: impl Fn(&str, &str, &str) -> Option<OwnerReference>,
) -> WorkloadRef {
    let intermediate = matches!(
        (owner.api_version.as_str(), owner.kind.as_str()),
        ("apps/v1", "ReplicaSet") | ("batch/v1", "Job")
    );
    if intermediate && let Some(up) = owner_of(&owner.kind, namespace, &owner.name) {
        return workload(&up);
    }
    workload(owner)
}

/// Service names from the operator's caches.
#[derive(Debug, Clone)]
pub struct KubePodResolver {
    pods: Arc<PodIndex>,
    replica_sets: Store<ReplicaSetMeta>,
    jobs: Store<JobMeta>,
}

impl PodResolver for KubePodResolver {
    fn pod(&self, uid: &str) -> Option<PodIdentity> {
        let pod = self.pods.get(uid)?;
        let owner = pod.owner.as_ref().map(|owner| {
            service_owner(owner, &pod.namespace, |kind, ns, name| {
                let meta = match kind {
                    "ReplicaSet" => self
                        .replica_sets
                        .get(&ObjectRef::new(name).within(ns))
                        .map(|rs| rs.metadata.owner_references.clone()),
                    _ => self
                        .jobs
                        .get(&ObjectRef::new(name).within(ns))
                        .map(|job| job.metadata.owner_references.clone()),
                };
                controller_of(meta.flatten().as_deref())
            })
        });
        Some(PodIdentity {
            namespace: pod.namespace,
            name: pod.name,
            owner,
        })
    }
}

/// A cache's task, by name.
pub type CacheTask = (&'static str, tokio::task::JoinHandle<()>);

/// Starts the three caches; they run until `cancel`. The resolver answers
/// from the moment it is returned (pods not listed yet are named by UID).
pub fn start_pod_caches(
    client: &Client,
    cancel: &CancellationToken,
) -> (Arc<dyn PodResolver>, Vec<CacheTask>) {
    let pods = Arc::new(PodIndex::default());
    let (replica_sets, rs_writer) = {
        let w = Writer::default();
        (w.as_reader(), w)
    };
    let (jobs, job_writer) = {
        let w = Writer::default();
        (w.as_reader(), w)
    };
    let tasks = vec![
        (
            "Pod cache",
            tokio::spawn(follow_pods(
                Api::<PodMeta>::all(client.clone()),
                pods.clone(),
                cancel.clone(),
            )),
        ),
        (
            "ReplicaSet cache",
            tokio::spawn(reflect(
                Api::<ReplicaSetMeta>::all(client.clone()),
                rs_writer,
                cancel.clone(),
            )),
        ),
        (
            "Job cache",
            tokio::spawn(reflect(
                Api::<JobMeta>::all(client.clone()),
                job_writer,
                cancel.clone(),
            )),
        ),
    ];
    (
        Arc::new(KubePodResolver {
            pods,
            replica_sets,
            jobs,
        }),
        tasks,
    )
}

/// Keeps `index` in sync with the cluster's running pods. Runs until `cancel`.
pub async fn follow_pods(api: Api<PodMeta>, index: Arc<PodIndex>, cancel: CancellationToken) {
    // Finished pods have no connections; leaving them out bounds the cache
    // by what runs (completed Job pods can linger by the thousand).
    let config = watcher::Config::default().fields("status.phase!=Succeeded,status.phase!=Failed");
    let events = watcher(api, config).default_backoff();
    let mut events = std::pin::pin!(events);
    let mut relisting: Option<HashMap<String, PodEntry>> = None;
    loop {
        let next = tokio::select! {
            () = cancel.cancelled() => return,
            next = events.try_next() => next,
        };
        match next {
            Ok(Some(watcher::Event::Apply(pod))) => index.apply(&pod),
            Ok(Some(watcher::Event::Delete(pod))) => index.delete(&pod),
            Ok(Some(watcher::Event::Init)) => relisting = Some(HashMap::new()),
            Ok(Some(watcher::Event::InitApply(pod))) => {
                if let (Some(list), Some((uid, entry))) =
                    (relisting.as_mut(), PodIndex::entry(&pod))
                {
                    list.insert(uid, entry);
                }
            }
            Ok(Some(watcher::Event::InitDone)) => {
                if let Some(list) = relisting.take() {
                    index.replace(list);
                    tracing::debug!(pods = index.len(), "Pod cache listed");
                }
            }
            Ok(None) => return,
            // The backoff retries; a lasting error (RBAC) shows here.
            Err(e) => tracing::warn!(error = %e, "watching Pods failed; retrying"),
        }
    }
}

/// Keeps `writer`'s store in sync (metadata only). Runs until `cancel`.
async fn reflect<K>(api: Api<K>, writer: Writer<K>, cancel: CancellationToken)
where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let kind = K::kind(&()).into_owned();
    let stream = reflector(
        writer,
        watcher(api, watcher::Config::default()).default_backoff(),
    )
    .applied_objects();
    let mut stream = std::pin::pin!(stream);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            next = stream.try_next() => match next {
                Ok(Some(_)) => {}
                Ok(None) => return,
                Err(e) => tracing::warn!(error = %e, kind, "watching failed; retrying"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use kube::api::ObjectMeta;

    use super::*;

    fn owner(api_version: &str, kind: &str, name: &str, controller: bool) -> OwnerReference {
        OwnerReference {
            api_version: api_version.to_owned(),
            kind: kind.to_owned(),
            name: name.to_owned(),
            uid: format!("uid-{name}"),
            controller: Some(controller),
            block_owner_deletion: None,
        }
    }

    fn pod(uid: &str, owners: Vec<OwnerReference>) -> PodMeta {
        PodMeta {
            types: None,
            metadata: ObjectMeta {
                name: Some(format!("pod-{uid}")),
                namespace: Some("ml".to_owned()),
                uid: Some(uid.to_owned()),
                owner_references: Some(owners),
                ..ObjectMeta::default()
            },
            _phantom: std::marker::PhantomData,
        }
    }

    #[test]
    fn a_deployments_pod_is_named_after_the_deployment_and_a_jobs_after_the_job() {
        let rs = owner("apps/v1", "ReplicaSet", "web-5d8f", true);
        let up = |kind: &str, _: &str, name: &str| {
            (kind == "ReplicaSet" && name == "web-5d8f")
                .then(|| owner("apps/v1", "Deployment", "web", true))
        };
        assert_eq!(service_owner(&rs, "ml", up).kind, "Deployment");
        let job = owner("batch/v1", "Job", "train", true);
        let named = service_owner(&job, "ml", up);
        assert_eq!((named.kind.as_str(), named.name.as_str()), ("Job", "train"));
        let by_jobset = service_owner(&job, "ml", |_: &str, _: &str, _: &str| {
            Some(owner("jobset.x-k8s.io/v1alpha2", "JobSet", "llm", true))
        });
        assert_eq!(by_jobset.kind, "JobSet");
        let sts = owner("apps/v1", "StatefulSet", "db", true);
        assert_eq!(service_owner(&sts, "ml", up).kind, "StatefulSet");
    }

    #[test]
    fn the_index_keeps_the_controlling_owner_and_forgets_deleted_pods() {
        let index = PodIndex::default();
        let p = pod(
            "ABC-1",
            vec![
                owner("v1", "Node", "n1", false),
                owner("apps/v1", "StatefulSet", "db", true),
            ],
        );
        index.apply(&p);
        let entry = index.get("abc-1").unwrap();
        assert_eq!(entry.owner.unwrap().name, "db");
        index.delete(&p);
        assert!(index.get("abc-1").is_none());
    }

    #[test]
    fn the_resolver_names_pods_through_the_caches() {
        let index = Arc::new(PodIndex::default());
        index.apply(&pod(
            "u1",
            vec![owner("apps/v1", "ReplicaSet", "web-1", true)],
        ));
        index.apply(&pod("u2", vec![]));
        let resolver = KubePodResolver {
            pods: index,
            replica_sets: Writer::default().as_reader(),
            jobs: Writer::default().as_reader(),
        };
        // The ReplicaSet is not cached: the ReplicaSet names the service.
        let p = resolver.pod("u1").unwrap();
        assert_eq!(p.owner.unwrap().kind, "ReplicaSet");
        assert!(resolver.pod("u2").unwrap().owner.is_none());
        assert!(resolver.pod("u3").is_none());
    }
}
