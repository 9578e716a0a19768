//! Securing the control channel: TLS (optionally mutual) from certificate
//! files read at every connect, and a bearer token read at every call.
//!
//! Reading at every connect is what makes rotation work without a restart:
//! the agent reconnects whenever the controller goes away, and a new
//! connection meets the files as they are now. The token is read per call
//! because a session can outlive a projected `ServiceAccount` token (kubelet
//! replaces it at 80 % of its lifetime, which can be ten minutes).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use pingmesh_proto::v1::mesh_controller_client::MeshControllerClient;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Status};

use crate::config::ControlSecurity;

/// The client every control-channel call goes through.
pub type ControlClient = MeshControllerClient<InterceptedService<Channel, BearerToken>>;

/// Adds `authorization: Bearer <token>` from a file to every call.
#[derive(Debug, Clone, Default)]
pub struct BearerToken {
    file: Option<Arc<Path>>,
}

impl BearerToken {
    pub fn from_file(file: Option<&Path>) -> Self {
        Self {
            file: file.map(Arc::from),
        }
    }

    fn header(file: &Path) -> Result<AsciiMetadataValue, Status> {
        let token = std::fs::read_to_string(file).map_err(|e| {
            Status::unauthenticated(format!("reading token file {}: {e}", file.display()))
        })?;
        let token = token.trim();
        if token.is_empty() {
            return Err(Status::unauthenticated(format!(
                "token file {} is empty",
                file.display()
            )));
        }
        MetadataValue::try_from(format!("Bearer {token}")).map_err(|_| {
            Status::unauthenticated(format!(
                "token file {} holds characters a header cannot carry",
                file.display()
            ))
        })
    }
}

impl Interceptor for BearerToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(file) = &self.file {
            let value = Self::header(file)?;
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecurityError {
    #[error(
        "controller URL {0} is plain text to a host other than this one: use https:// with \
         --controller-ca, or allow plain text with --insecure-plaintext (docs/security.md)"
    )]
    PlaintextNotAllowed(String),
    #[error("controller URL {0} is https:// but no --controller-ca is set")]
    NoCa(String),
    #[error("controller URL {url} is neither http:// nor https://")]
    Scheme { url: String },
    #[error("reading {path}: {detail}")]
    Read { path: PathBuf, detail: String },
    #[error("TLS settings: {0}")]
    Tls(String),
}

/// Whether the channel to `url` is allowed as configured: plain text only to
/// this host, or with the explicit setting; TLS only with a CA to check the
/// controller against. Checked when the agent starts, so a wrong setting
/// stops it with a clear message instead of retrying forever.
pub fn check(url: &str, security: &ControlSecurity) -> Result<(), SecurityError> {
    let uri: tonic::codegen::http::Uri = url.parse().map_err(|_| SecurityError::Scheme {
        url: url.to_owned(),
    })?;
    match uri.scheme_str() {
        Some("https")
            if security.controller_ca.is_none() && security.controller_ca_pem.is_none() =>
        {
            Err(SecurityError::NoCa(url.to_owned()))
        }
        Some("https") => Ok(()),
        Some("http") if security.insecure_plaintext || is_loopback(uri.host()) => Ok(()),
        Some("http") => Err(SecurityError::PlaintextNotAllowed(url.to_owned())),
        _ => Err(SecurityError::Scheme {
            url: url.to_owned(),
        }),
    }
}

fn is_loopback(host: Option<&str>) -> bool {
    let Some(host) = host else { return false };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.eq_ignore_ascii_case("localhost")
        || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// `endpoint` with TLS when `url` is https://, from the files as they are now.
pub fn with_tls(
    endpoint: Endpoint,
    url: &str,
    security: &ControlSecurity,
) -> Result<Endpoint, SecurityError> {
    if !url.starts_with("https://") {
        return Ok(endpoint);
    }
    let ca = match (&security.controller_ca, &security.controller_ca_pem) {
        (Some(file), _) => read(file)?,
        (None, Some(pem)) => pem.clone().into_bytes(),
        (None, None) => return Err(SecurityError::NoCa(url.to_owned())),
    };
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
    if let Some(name) = &security.controller_server_name {
        tls = tls.domain_name(name.clone());
    }
    if let (Some(cert), Some(key)) = (&security.tls_cert, &security.tls_key) {
        tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
    }
    endpoint
        .tls_config(tls)
        .map_err(|e| SecurityError::Tls(e.to_string()))
}

fn read(path: &Path) -> Result<Vec<u8>, SecurityError> {
    std::fs::read(path).map_err(|e| SecurityError::Read {
        path: path.to_owned(),
        detail: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(url: &str, security: &ControlSecurity) -> bool {
        check(url, security).is_ok()
    }

    #[test]
    fn plain_text_goes_to_loopback_only_unless_allowed() {
        let none = ControlSecurity::default();
        assert!(allowed("http://127.0.0.1:9400", &none));
        assert!(allowed("http://[::1]:9400", &none));
        assert!(allowed("http://localhost:9400", &none));
        assert_eq!(
            check("http://10.0.0.1:9400", &none),
            Err(SecurityError::PlaintextNotAllowed(
                "http://10.0.0.1:9400".into()
            ))
        );
        assert!(!allowed("http://ctl.example:9400", &none));
        let insecure = ControlSecurity {
            insecure_plaintext: true,
            ..ControlSecurity::default()
        };
        assert!(allowed("http://10.0.0.1:9400", &insecure));
    }

    #[test]
    fn tls_needs_a_ca_and_odd_schemes_are_refused() {
        let none = ControlSecurity::default();
        assert!(matches!(
            check("https://ctl:9400", &none),
            Err(SecurityError::NoCa(_))
        ));
        let with_ca = ControlSecurity {
            controller_ca: Some("/ca.crt".into()),
            ..ControlSecurity::default()
        };
        assert!(allowed("https://ctl:9400", &with_ca));
        let inline = ControlSecurity {
            controller_ca_pem: Some("-----BEGIN CERTIFICATE-----".into()),
            ..ControlSecurity::default()
        };
        assert!(allowed("https://ctl:9400", &inline));
        assert!(matches!(
            check("ftp://ctl:9400", &with_ca),
            Err(SecurityError::Scheme { .. })
        ));
        assert!(!allowed("not a url", &with_ca));
    }

    #[test]
    fn the_token_is_read_at_every_call() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        let mut interceptor = BearerToken::from_file(Some(&file));
        // Missing file: the call fails as unauthenticated, nothing is sent.
        let err = interceptor.call(Request::new(())).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        for token in ["first", "second"] {
            std::fs::write(&file, format!("{token}\n")).unwrap();
            let request = interceptor.call(Request::new(())).unwrap();
            assert_eq!(
                request.metadata().get("authorization").unwrap(),
                &format!("Bearer {token}")
            );
        }
        std::fs::write(&file, "bad\u{7f}token").unwrap();
        assert!(interceptor.call(Request::new(())).is_err());
        let request = BearerToken::default().call(Request::new(())).unwrap();
        assert!(request.metadata().get("authorization").is_none());
    }
}
