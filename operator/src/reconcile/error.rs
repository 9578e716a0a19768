//! Why a reconcile failed, with a bounded category for metrics and Events.

use kube::Error as KubeError;

/// A `PingMesh` the operator cannot build objects for (not a spec problem:
/// those are reported in status, see `SpecError`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    #[error("PingMesh has no {0}; it was not read from the API server")]
    MissingMetadata(&'static str),
    #[error("PingMesh name {name:?} is longer than {max} characters (it becomes a label value)")]
    NameTooLong { name: String, max: usize },
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("listing {kind} owned by {mesh}: {source}")]
    List {
        kind: &'static str,
        mesh: String,
        source: KubeError,
    },
    #[error("applying {kind} {name}: {source}")]
    Apply {
        kind: &'static str,
        name: String,
        source: KubeError,
    },
    #[error("deleting orphaned {kind} {name}: {source}")]
    Delete {
        kind: &'static str,
        name: String,
        source: KubeError,
    },
    #[error("patching the status of {name}: {source}")]
    Status { name: String, source: KubeError },
}

impl ReconcileError {
    /// Bounded label for metrics and Event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            Self::Build(_) => "invalid_object",
            Self::List { source, .. }
            | Self::Apply { source, .. }
            | Self::Delete { source, .. }
            | Self::Status { source, .. } => api_category(source),
        }
    }
}

/// Bounded category of an API client error.
pub fn api_category(error: &KubeError) -> &'static str {
    match error {
        KubeError::Api(status) => match status.code {
            400 | 422 => "api_invalid",
            401 | 403 => "api_forbidden",
            404 => "api_not_found",
            409 => "api_conflict",
            429 => "api_throttled",
            500..=599 => "api_server_error",
            _ => "api_other",
        },
        KubeError::HyperError(_) | KubeError::Service(_) => "api_unreachable",
        KubeError::SerdeError(_) => "api_decode",
        _ => "api_other",
    }
}
