//! TLS on the agent-facing gRPC port, with certificates that rotate without
//! a restart.
//!
//! tonic's own TLS takes one fixed identity, so the controller runs its own
//! accept loop: every accepted connection is handshaken with the
//! configuration current at that moment, and that configuration is rebuilt
//! whenever the certificate, key or client CA files change on disk (a
//! Kubernetes Secret update, cert-manager renewing, an operator's `cp`).
//! Open connections keep the certificate they were made with; agents
//! reconnect on their own and then meet the new one.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::crypto::{CryptoProvider, ring};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

use crate::config::GrpcTlsConfig;

/// A client that opens a connection and never finishes the handshake must not
/// hold resources forever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed accept (EMFILE comes back at once until something changes).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path} holds no PEM {what}")]
    Empty { path: PathBuf, what: &'static str },
    #[error("{path}: {detail}")]
    Pem { path: PathBuf, detail: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// The bytes a configuration was built from: a new configuration is built
/// only when they change.
#[derive(Debug, PartialEq, Eq)]
struct Material {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

impl Material {
    fn read(files: &GrpcTlsConfig) -> Result<Self, TlsError> {
        Ok(Self {
            cert: read(&files.cert_file)?,
            key: read(&files.key_file)?,
            client_ca: files.client_ca_file.as_deref().map(read).transpose()?,
        })
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

struct Current {
    material: Material,
    config: Arc<ServerConfig>,
}

/// The server configuration, rebuilt from its files when they change.
pub struct ReloadingServerConfig {
    files: GrpcTlsConfig,
    current: Mutex<Current>,
}

impl std::fmt::Debug for ReloadingServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingServerConfig")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl ReloadingServerConfig {
    /// Loads the files once; an unreadable or invalid set is an error here,
    /// so that a controller never starts without working TLS.
    pub fn load(files: GrpcTlsConfig) -> Result<Self, TlsError> {
        let material = Material::read(&files)?;
        let config = build(&files, &material)?;
        Ok(Self {
            files,
            current: Mutex::new(Current { material, config }),
        })
    }

    /// Whether agents must present a client certificate.
    pub fn requires_client_certificates(&self) -> bool {
        self.files.client_ca_file.is_some()
    }

    /// The configuration for the next handshake. Re-reads the files (a few
    /// kilobytes, far below the cost of the handshake itself) and rebuilds
    /// when they changed; a set that does not load (a rotation caught half
    /// written) keeps the last good configuration and is logged.
    pub fn current(&self) -> Arc<ServerConfig> {
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match Material::read(&self.files) {
            Ok(material) if material == current.material => {}
            Ok(material) => match build(&self.files, &material) {
                Ok(config) => {
                    tracing::info!(cert = %self.files.cert_file.display(), "gRPC TLS certificates changed; new connections use them");
                    *current = Current { material, config };
                }
                Err(e) => {
                    tracing::warn!(error = %e, "new gRPC TLS files do not load; keeping the previous certificates");
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the gRPC TLS files; keeping the previous certificates");
            }
        }
        current.config.clone()
    }
}

fn provider() -> Arc<CryptoProvider> {
    // Named explicitly: with both ring and aws-lc in a dependency graph,
    // rustls cannot pick a process default on its own.
    Arc::new(ring::default_provider())
}

fn certificates(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            path: path.to_owned(),
            what: "certificate",
        });
    }
    Ok(certs)
}

fn build(files: &GrpcTlsConfig, material: &Material) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = certificates(&files.cert_file, &material.cert)?;
    let key = PrivateKeyDer::from_pem_slice(&material.key).map_err(|e| TlsError::Pem {
        path: files.key_file.clone(),
        detail: e.to_string(),
    })?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match (&files.client_ca_file, &material.client_ca) {
        (Some(path), Some(pem)) => {
            let mut roots = RootCertStore::empty();
            for ca in certificates(path, pem)? {
                roots
                    .add(ca)
                    .map_err(|e| TlsError::Config(format!("{}: {e}", path.display())))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        _ => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    // gRPC is HTTP/2 only.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Accepts on `listener` and hands tonic each connection once its TLS
/// handshake is done. Handshakes run on their own tasks, so a slow or
/// malicious client delays nobody else. Ends when the receiving side (the
/// gRPC server) is dropped.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<ReloadingServerConfig>,
) -> ReceiverStream<Result<TlsStream<TcpStream>, io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = tx.closed() => return,
                accepted = listener.accept() => accepted,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "gRPC accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(tls.current());
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    // Plain-text clients, unknown CAs, expired certificates:
                    // the client sees the TLS alert; the log says who.
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "gRPC TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "gRPC TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
