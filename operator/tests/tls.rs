//! TLS and node identity on the agent-facing gRPC port, with real
//! certificates (a test CA made with rcgen) over real sockets: an agent with
//! a certificate for node A may act for A only; plain-text, certificate-less
//! and foreign-CA clients are refused; certificates rotate without a restart.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use pingmesh_operator::config::{GrpcTlsConfig, MeshConfig};
use pingmesh_operator::mesh::server::{self, RunningController};
use pingmesh_proto::v1::mesh_controller_client::MeshControllerClient;
use pingmesh_proto::v1::{Endpoint, RegisterRequest, ReportWindowsRequest, Transport};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// A test certificate authority.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        Self {
            issuer: Issuer::new(params, key),
            pem,
        }
    }

    /// (certificate PEM, key PEM) for the controller at localhost/127.0.0.1.
    fn server(&self) -> (String, String) {
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(&params)
    }

    /// (certificate PEM, key PEM) of the agent on `node`.
    fn agent(&self, node: &str) -> (String, String) {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, node);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(&params)
    }

    fn sign(&self, params: &CertificateParams) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

struct Controller {
    running: Option<RunningController>,
    cancel: CancellationToken,
    files: GrpcTlsConfig,
    _dir: tempfile::TempDir,
}

impl Controller {
    /// A controller serving `server` (cert, key); agents' certificates must
    /// chain to `client_ca` when given.
    async fn start(server: &(String, String), client_ca: Option<&Ca>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let files = GrpcTlsConfig {
            cert_file: dir.path().join("tls.crt"),
            key_file: dir.path().join("tls.key"),
            client_ca_file: client_ca.map(|_| dir.path().join("ca.crt")),
        };
        write(&files.cert_file, &server.0);
        write(&files.key_file, &server.1);
        if let (Some(path), Some(ca)) = (&files.client_ca_file, client_ca) {
            write(path, &ca.pem);
        }
        let config = MeshConfig {
            // Reachable from other hosts: allowed because TLS is on.
            grpc_addr: "0.0.0.0:0".parse().unwrap(),
            http_addr: "127.0.0.1:0".parse().unwrap(),
            registry: format!("sqlite://{}", dir.path().join("registry.db").display()),
            grpc_tls: Some(files.clone()),
            ..MeshConfig::default()
        };
        config.validate().unwrap();
        let cancel = CancellationToken::new();
        let running = server::start(config, cancel.clone()).await.unwrap();
        Self {
            running: Some(running),
            cancel,
            files,
            _dir: dir,
        }
    }

    fn port(&self) -> u16 {
        self.running.as_ref().unwrap().grpc_addr.port()
    }

    fn identity_rejections(&self, rpc: &str) -> u64 {
        let text =
            String::from_utf8(self.running.as_ref().unwrap().controller.metrics.encode()).unwrap();
        let prefix = format!(
            "pingmesh_controller_rejected_requests_total{{reason=\"identity\",rpc=\"{rpc}\"}} "
        );
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix)?.parse().ok())
            .unwrap_or(0)
    }

    async fn stop(mut self) {
        self.cancel.cancel();
        self.running.take().unwrap().wait().await.unwrap();
    }
}

fn write(path: &Path, text: &str) {
    // Write then rename, as a Secret update or cert-manager does: a reader
    // never sees half a file.
    let tmp: PathBuf = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A TLS client trusting `ca`, presenting `agent` (cert, key) if given.
async fn connect(
    port: u16,
    ca: &Ca,
    agent: Option<&(String, String)>,
) -> Result<MeshControllerClient<Channel>, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca.pem))
        .domain_name("localhost");
    if let Some((cert, key)) = agent {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let channel = Channel::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(MeshControllerClient::new(channel))
}

fn register(node: &str) -> RegisterRequest {
    RegisterRequest {
        node: node.into(),
        agent_version: "test".into(),
        endpoints: vec![Endpoint {
            id: format!("{node}/udp0"),
            transport: Transport::Udp as i32,
            address: "127.0.0.1:9403".into(),
            qpn: 0,
            tor: "rack-1".into(),
            device: String::new(),
        }],
    }
}

#[tokio::test]
async fn an_agent_acts_for_its_own_node_only() {
    let ca = Ca::new("pingmesh test CA");
    let controller = Controller::start(&ca.server(), Some(&ca)).await;
    let mut a = connect(controller.port(), &ca, Some(&ca.agent("node-a")))
        .await
        .unwrap();

    let session = a
        .register(register("node-a"))
        .await
        .unwrap()
        .into_inner()
        .session;
    assert!(session > 0);

    let refused = a.register(register("node-b")).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused}");
    assert!(refused.message().contains("node-b"), "{refused}");

    // Every RPC naming a node is checked, not only Register.
    let report = ReportWindowsRequest {
        node: "node-b".into(),
        session,
        windows: Vec::new(),
    };
    let refused = a.report_windows(report).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    let own = ReportWindowsRequest {
        node: "node-a".into(),
        session,
        windows: Vec::new(),
    };
    a.report_windows(own).await.unwrap();

    assert_eq!(controller.identity_rejections("register"), 1);
    assert_eq!(controller.identity_rejections("report_windows"), 1);
    controller.stop().await;
}

#[tokio::test]
async fn plain_text_certificate_less_and_foreign_clients_are_refused() {
    let ca = Ca::new("pingmesh test CA");
    let controller = Controller::start(&ca.server(), Some(&ca)).await;
    let port = controller.port();

    // Plain text to a TLS port: the connection never carries a request.
    let plain = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        match MeshControllerClient::connect(format!("http://127.0.0.1:{port}")).await {
            Ok(mut c) => c.register(register("node-a")).await.is_ok(),
            Err(_) => false,
        }
    })
    .await
    .expect("a plain-text client must fail, not hang");
    assert!(!plain, "a plain-text client registered");

    // TLS without a client certificate, or with one from another CA.
    let stranger = Ca::new("someone else's CA");
    for agent in [None, Some(stranger.agent("node-a"))] {
        let registered = match connect(port, &ca, agent.as_ref()).await {
            Ok(mut c) => c.register(register("node-a")).await.is_ok(),
            Err(_) => false,
        };
        assert!(!registered, "registered with client certificate {agent:?}");
    }

    // A client that does not trust the controller's CA refuses it.
    assert!(
        connect(port, &stranger, Some(&ca.agent("node-a")))
            .await
            .is_err()
    );
    controller.stop().await;
}

#[tokio::test]
async fn rotated_certificates_serve_new_connections_without_a_restart() {
    let old_ca = Ca::new("old CA");
    let new_ca = Ca::new("new CA");
    let controller = Controller::start(&old_ca.server(), Some(&old_ca)).await;
    let port = controller.port();
    let old_agent = old_ca.agent("node-a");
    let new_agent = new_ca.agent("node-a");

    let mut before = connect(port, &old_ca, Some(&old_agent)).await.unwrap();
    before.register(register("node-a")).await.unwrap();
    assert!(connect(port, &new_ca, Some(&new_agent)).await.is_err());

    // Rotate everything: serving certificate, key and client CA.
    let (cert, key) = new_ca.server();
    write(&controller.files.key_file, &key);
    write(&controller.files.cert_file, &cert);
    write(
        controller.files.client_ca_file.as_ref().unwrap(),
        &new_ca.pem,
    );

    let mut after = connect(port, &new_ca, Some(&new_agent)).await.unwrap();
    after.register(register("node-a")).await.unwrap();
    assert!(
        connect(port, &old_ca, Some(&old_agent)).await.is_err(),
        "new connections still met the old certificate"
    );

    // A half-written rotation (garbage key) keeps the last good certificates.
    write(&controller.files.key_file, "not a key");
    let mut still = connect(port, &new_ca, Some(&new_agent)).await.unwrap();
    still.register(register("node-a")).await.unwrap();
    controller.stop().await;
}

#[tokio::test]
async fn tls_without_a_client_ca_encrypts_without_identities() {
    let ca = Ca::new("pingmesh test CA");
    let controller = Controller::start(&ca.server(), None).await;
    let mut client = connect(controller.port(), &ca, None).await.unwrap();
    client.register(register("node-a")).await.unwrap();
    client.register(register("node-b")).await.unwrap();
    controller.stop().await;
}

#[tokio::test]
async fn broken_certificate_files_stop_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let cert_file = dir.path().join("tls.crt");
    std::fs::write(&cert_file, "no certificate here").unwrap();
    let config = MeshConfig {
        grpc_addr: "127.0.0.1:0".parse().unwrap(),
        http_addr: "127.0.0.1:0".parse().unwrap(),
        registry: format!("sqlite://{}", dir.path().join("registry.db").display()),
        grpc_tls: Some(GrpcTlsConfig {
            cert_file: cert_file.clone(),
            key_file: dir.path().join("missing.key"),
            client_ca_file: None,
        }),
        ..MeshConfig::default()
    };
    let err = server::start(config, CancellationToken::new())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("gRPC TLS"), "{err}");
}
