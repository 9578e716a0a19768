//! `pingmesh-operator run`: the reconciler, the mesh controller it hosts, and
//! one public HTTP port with the mesh API, `/metrics` (mesh controller and
//! reconciler), `/livez` and `/readyz`. SIGTERM stops everything gracefully.
//!
//! The mesh controller runs with the probing and SLA settings of one
//! `PingMesh` (`--mesh`, default `<pod namespace>/default`), read before it
//! starts; when they change, it restarts in-process with the new ones.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use clap::Args;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::Controller;
use kube::runtime::watcher;
use kube::{Api, Client};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

use super::{
    Context, MeshHost, MeshPolicy, OperatorSettings, ReconcileMetrics, error_policy,
    managed_selector, reconcile,
};
use crate::config::{ConfigError, MeshArgs, MeshConfig};
use crate::crd::PingMesh;
use crate::mesh::http as mesh_http;
use crate::mesh::server::{self, RunningController, ServeError};

/// Flags of `pingmesh-operator run` (the mesh controller's flags included).
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub mesh: MeshArgs,
    /// gRPC URL agents dial for the mesh controller. Default:
    /// `http://pingmesh-operator.<pod namespace>.svc:<gRPC port>`.
    #[arg(long, env = "PINGMESH_AGENT_CONTROLLER_URL")]
    pub agent_controller_url: Option<String>,
    /// Service account of agent pods (default: the namespace's default).
    #[arg(long, env = "PINGMESH_AGENT_SERVICE_ACCOUNT")]
    pub agent_service_account: Option<String>,
    /// Only watch `PingMeshes` in this namespace (default: all namespaces).
    #[arg(long, env = "PINGMESH_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,
    /// Seconds between status refreshes of an unchanged mesh.
    #[arg(long, env = "PINGMESH_RESYNC_SECS", default_value_t = 30)]
    pub resync_secs: u64,
    /// This pod's name (downward API), named in Events.
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
    /// This pod's namespace (downward API), for the default agent controller URL.
    #[arg(long, env = "POD_NAMESPACE", default_value = "pingmesh-system")]
    pub pod_namespace: String,
    /// `namespace/name` of the PingMesh whose probing and SLA settings the mesh
    /// controller runs with. Default: `<pod namespace>/default`.
    #[arg(long, env = "PINGMESH_MESH")]
    pub mesh_source: Option<String>,
}

impl RunArgs {
    /// Reconciler settings; `grpc_port` is the port the mesh controller serves agents on.
    pub fn settings(&self, grpc_port: u16) -> OperatorSettings {
        OperatorSettings {
            controller_url: self.agent_controller_url.clone().unwrap_or_else(|| {
                format!(
                    "http://pingmesh-operator.{}.svc:{grpc_port}",
                    self.pod_namespace
                )
            }),
            agent_service_account: self.agent_service_account.clone(),
            resync: Duration::from_secs(self.resync_secs.max(1)),
        }
    }

    /// `(namespace, name)` of the policy source.
    pub fn policy_source(&self) -> (String, String) {
        match self.mesh_source.as_deref().and_then(|s| s.split_once('/')) {
            Some((ns, name)) => (ns.to_owned(), name.to_owned()),
            None => (
                self.pod_namespace.clone(),
                self.mesh_source
                    .clone()
                    .unwrap_or_else(|| "default".to_owned()),
            ),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("connecting to the Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Mesh(#[from] ServeError),
    #[error("metrics setup: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("binding HTTP on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("HTTP server: {0}")]
    Http(std::io::Error),
}

impl RunError {
    /// Bounded label for logs.
    pub fn category(&self) -> &'static str {
        match self {
            Self::Config(_) => "config",
            Self::Kube(_) => "kube_client",
            Self::Mesh(_) => "mesh_controller",
            Self::Metrics(_) => "metrics",
            Self::Bind { .. } => "bind",
            Self::Http(_) => "http",
        }
    }
}

/// Runs until SIGTERM/SIGINT.
pub async fn run(args: RunArgs) -> Result<(), RunError> {
    let mut config = args.mesh.resolve()?;
    let public_addr = config.http_addr;
    // The mesh controller's own HTTP server moves to an unused loopback port;
    // the public port serves its routes behind the operator's.
    config.http_addr = SocketAddr::from(([127, 0, 0, 1], 0));
    let client = Client::try_default().await?;
    let (source_ns, source_name) = args.policy_source();
    if let Some(pm) = Api::<PingMesh>::namespaced(client.clone(), &source_ns)
        .get_opt(&source_name)
        .await?
        .filter(|pm| pm.spec.validate().is_ok())
    {
        with_policy(&mut config, MeshPolicy::of(&pm));
    }
    let mut mesh_cancel = CancellationToken::new();
    let mut running = server::start(config.clone(), mesh_cancel.clone()).await?;
    let host = Arc::new(MeshHost::new(
        running.controller.clone(),
        format!("{source_ns}/{source_name}"),
    ));
    let metrics = ReconcileMetrics::new()?;
    let ctx = Arc::new(Context::new(
        client.clone(),
        args.settings(running.grpc_addr.port()),
        host.clone(),
        metrics.clone(),
        args.pod_name.clone(),
    ));

    let cancel = CancellationToken::new();
    let controller = kube_controller(&client, args.watch_namespace.as_deref())
        .graceful_shutdown_on(cancel.clone().cancelled_owned());
    let ready = Arc::new(AtomicBool::new(false));
    tokio::spawn({
        let (store, ready) = (controller.store(), ready.clone());
        async move {
            if store.wait_until_ready().await.is_ok() {
                ready.store(true, Ordering::Relaxed);
                tracing::info!("PingMesh cache synced; ready");
            }
        }
    });
    let listener = TcpListener::bind(public_addr)
        .await
        .map_err(|source| RunError::Bind {
            addr: public_addr,
            source,
        })?;
    let router = operator_router(host.clone(), metrics, ready);
    let http = tokio::spawn(
        axum::serve(listener, router)
            .with_graceful_shutdown(cancel.clone().cancelled_owned())
            .into_future(),
    );
    let reconciler = tokio::spawn(controller.run(reconcile, error_policy, ctx).for_each(
        |result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "controller event");
            }
        },
    ));
    tracing::info!(%public_addr, grpc_addr = %running.grpc_addr, "operator running");

    let mut policies = host.policy_requests();
    let shutdown = pingmesh_proto::signals::shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            changed = policies.changed() => {
                let wanted = policies.borrow_and_update().clone();
                let (Ok(()), Some(policy)) = (changed, wanted) else { continue };
                tracing::info!("probing or SLA settings changed; restarting the mesh controller");
                mesh_cancel.cancel();
                running.wait().await?;
                with_policy(&mut config, policy);
                mesh_cancel = CancellationToken::new();
                running = server::start(config.clone(), mesh_cancel.clone()).await?;
                host.replace(running.controller.clone());
            }
        }
    }
    tracing::info!("shutting down");
    cancel.cancel();
    mesh_cancel.cancel();
    let _ = reconciler.await;
    let served = http.await;
    stop(running).await?;
    match served {
        Ok(Err(e)) => Err(RunError::Http(e)),
        _ => Ok(()),
    }
}

async fn stop(running: RunningController) -> Result<(), RunError> {
    Ok(running.wait().await?)
}

fn with_policy(config: &mut MeshConfig, policy: MeshPolicy) {
    config.pinglist = policy.pinglist;
    config.sla = policy.sla;
}

/// The `PingMesh` controller, watching owned objects by label only (the cache
/// holds ours, not every `ConfigMap` of the cluster).
fn kube_controller(client: &Client, namespace: Option<&str>) -> Controller<PingMesh> {
    let owned = watcher::Config::default().labels(&managed_selector());
    match namespace {
        Some(ns) => Controller::new(
            Api::<PingMesh>::namespaced(client.clone(), ns),
            watcher::Config::default(),
        )
        .owns(
            Api::<ConfigMap>::namespaced(client.clone(), ns),
            owned.clone(),
        )
        .owns(Api::<DaemonSet>::namespaced(client.clone(), ns), owned),
        None => Controller::new(
            Api::<PingMesh>::all(client.clone()),
            watcher::Config::default(),
        )
        .owns(Api::<ConfigMap>::all(client.clone()), owned.clone())
        .owns(Api::<DaemonSet>::all(client.clone()), owned),
    }
}

#[derive(Debug, Clone)]
struct OperatorHttp {
    host: Arc<MeshHost>,
    metrics: ReconcileMetrics,
    ready: Arc<AtomicBool>,
}

/// `/livez`, `/readyz` (once the `PingMesh` cache synced) and `/metrics` (mesh
/// controller and reconciler); everything else goes to the API of the mesh
/// controller serving now.
pub fn operator_router(
    host: Arc<MeshHost>,
    metrics: ReconcileMetrics,
    ready: Arc<AtomicBool>,
) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(prometheus_text))
        .fallback(to_mesh)
        .with_state(OperatorHttp {
            host,
            metrics,
            ready,
        })
}

async fn to_mesh(State(s): State<OperatorHttp>, request: Request) -> Response {
    match mesh_http::router(s.host.current()).oneshot(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    }
}

async fn readyz(State(s): State<OperatorHttp>) -> impl IntoResponse {
    if s.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "PingMesh cache not synced yet",
        )
    }
}

async fn prometheus_text(State(s): State<OperatorHttp>) -> impl IntoResponse {
    let mut body = s.host.current().metrics.encode();
    body.extend(s.metrics.encode());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}
