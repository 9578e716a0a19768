//! The mesh controller as `run` hosts it: its probing and SLA policy comes
//! from one `PingMesh` (the policy source), and a change of that policy
//! restarts the mesh controller in-process with the new one. The controller
//! reads its policy once at start, and a restart is cheap: agents reconnect
//! on their own and the registry is persistent.
//!
//! The source's other operator-side settings (`topology`, `nodeHealth`) need
//! no restart: they are published as [`SourceSettings`] and the Node label
//! follower and the findings publisher take them as they change.

use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::Resource;
use tokio::sync::watch;

use super::mesh_status::{MeshStatus, MeshStatusSource, PolicyState};
use crate::crd::{NodeHealthSpec, PingMesh, TopologySpec};
use crate::mesh::analyzer::SlaPolicy;
use crate::mesh::controller::MeshController;
use crate::mesh::pinglist::PinglistPolicy;
use crate::mesh::traces::TraceSettings;

/// The part of the mesh controller's configuration a `PingMesh` sets.
#[derive(Debug, Clone, PartialEq)]
pub struct MeshPolicy {
    pub pinglist: PinglistPolicy,
    pub sla: SlaPolicy,
    pub traces: TraceSettings,
}

impl MeshPolicy {
    /// The policy `pm`'s spec asks for.
    pub fn of(pm: &PingMesh) -> Self {
        Self {
            pinglist: pm.spec.pinglist_policy(),
            sla: pm.spec.sla_policy(),
            // A spec with a bad switch map is Degraded before it gets here;
            // should one slip through, traces run with hops named by address.
            traces: pm.spec.trace_settings().unwrap_or_else(|_| TraceSettings {
                enabled: pm.spec.topology.path_traces,
                ..TraceSettings::default()
            }),
        }
    }

    /// The policy a running controller has.
    pub fn running(controller: &MeshController) -> Self {
        Self {
            pinglist: controller.config().pinglist.clone(),
            sla: controller.config().sla.clone(),
            traces: controller.config().traces.clone(),
        }
    }
}

/// The settings of the policy source that apply without a restart.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SourceSettings {
    pub topology: TopologySpec,
    pub node_health: NodeHealthSpec,
    /// The policy-source `PingMesh`, which finding Events are about; `None`
    /// until it has been seen.
    pub mesh: Option<ObjectReference>,
}

impl SourceSettings {
    /// The settings `pm`'s spec asks for.
    pub fn of(pm: &PingMesh) -> Self {
        let mut mesh = pm.object_ref(&());
        // Changes with every status write; Events need only name and uid.
        mesh.resource_version = None;
        Self {
            topology: pm.spec.topology.clone(),
            node_health: pm.spec.node_health.clone(),
            mesh: Some(mesh),
        }
    }
}

/// The hosted mesh controller, swapped on restart.
#[derive(Debug)]
pub struct MeshHost {
    current: RwLock<Arc<MeshController>>,
    /// `namespace/name` of the policy source.
    source: String,
    wanted: watch::Sender<Option<MeshPolicy>>,
    settings: watch::Sender<SourceSettings>,
}

impl MeshHost {
    /// Hosts `controller` for the policy source `source` (`namespace/name`),
    /// with default [`SourceSettings`] until the source is seen.
    pub fn new(controller: Arc<MeshController>, source: String) -> Self {
        Self::with_settings(controller, source, SourceSettings::default())
    }

    pub fn with_settings(
        controller: Arc<MeshController>,
        source: String,
        settings: SourceSettings,
    ) -> Self {
        let (wanted, _) = watch::channel(None);
        let (settings, _) = watch::channel(settings);
        Self {
            current: RwLock::new(controller),
            source,
            wanted,
            settings,
        }
    }

    /// The policy source's topology and node health settings, as they change.
    pub fn settings(&self) -> watch::Receiver<SourceSettings> {
        self.settings.subscribe()
    }

    /// The controller serving now.
    pub fn current(&self) -> Arc<MeshController> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Puts a restarted controller in place.
    pub fn replace(&self, controller: Arc<MeshController>) {
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = controller;
    }

    /// Policies the source asked for; `run` restarts the controller on a change.
    pub fn policy_requests(&self) -> watch::Receiver<Option<MeshPolicy>> {
        self.wanted.subscribe()
    }
}

#[async_trait]
impl MeshStatusSource for MeshHost {
    async fn mesh_status(&self) -> Result<MeshStatus, String> {
        self.current().mesh_status().await
    }

    fn sync_policy(&self, pm: &PingMesh) -> PolicyState {
        let key = format!(
            "{}/{}",
            pm.metadata.namespace.as_deref().unwrap_or_default(),
            pm.metadata.name.as_deref().unwrap_or_default()
        );
        if key != self.source {
            return PolicyState::FromOtherMesh(self.source.clone());
        }
        let settings = SourceSettings::of(pm);
        self.settings.send_if_modified(|current| {
            let changed = *current != settings;
            if changed {
                *current = settings;
            }
            changed
        });
        let wanted = MeshPolicy::of(pm);
        if MeshPolicy::running(&self.current()) == wanted {
            return PolicyState::Applied;
        }
        self.wanted.send_if_modified(|current| {
            let changed = current.as_ref() != Some(&wanted);
            if changed {
                *current = Some(wanted.clone());
            }
            changed
        });
        PolicyState::Restarting
    }
}
