//! The cost of TLS on the agent channel: one `ReportWindows` round trip
//! (100 summaries, the agent's usual batch per window at ~100 targets) on
//! an open connection, plain text against mutual TLS, and a new connection
//! (TCP + TLS handshake + one call) with and without TLS. A real controller
//! on loopback; certificates from a throwaway CA.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use pingmesh_operator::config::{GrpcTlsConfig, MeshConfig};
use pingmesh_operator::mesh::server;
use pingmesh_proto::v1::mesh_controller_client::MeshControllerClient;
use pingmesh_proto::v1::{
    Endpoint, RegisterRequest, ReportWindowsRequest, Transport, WindowSummary,
};
use pingmesh_proto::window::{unix_now_ms, window_start};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

struct Pki {
    ca: String,
    server: (String, String),
    agent: (String, String),
}

fn pki() -> Pki {
    let mut ca = CertificateParams::default();
    ca.distinguished_name.push(DnType::CommonName, "bench CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca, ca_key);
    let sign = |mut params: CertificateParams, usage| {
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        (
            params.signed_by(&key, &issuer).unwrap().pem(),
            key.serialize_pem(),
        )
    };
    let server = sign(
        CertificateParams::new(vec!["localhost".to_owned()]).unwrap(),
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let mut agent = CertificateParams::default();
    agent
        .distinguished_name
        .push(DnType::CommonName, "bench-node");
    let agent = sign(agent, ExtendedKeyUsagePurpose::ClientAuth);
    Pki {
        ca: ca_pem,
        server,
        agent,
    }
}

fn summaries(n: usize) -> Vec<WindowSummary> {
    let start = window_start(unix_now_ms(), 5_000);
    (0..n)
        .map(|i| WindowSummary {
            window_start_ms: start,
            window_ms: 5_000,
            source_endpoint: "bench-node/udp0".into(),
            target_endpoint: format!("peer-{i}/udp0"),
            sent: 50,
            ok: 50,
            ..WindowSummary::default()
        })
        .collect()
}

async fn connect(url: &str, tls: Option<&Pki>) -> MeshControllerClient<Channel> {
    let mut endpoint = Channel::from_shared(url.to_owned()).unwrap();
    if let Some(p) = tls {
        endpoint = endpoint
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(&p.ca))
                    .domain_name("localhost")
                    .identity(Identity::from_pem(&p.agent.0, &p.agent.1)),
            )
            .unwrap();
    }
    MeshControllerClient::new(endpoint.connect().await.unwrap())
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pki = pki();
    let files = GrpcTlsConfig {
        cert_file: dir.path().join("tls.crt"),
        key_file: dir.path().join("tls.key"),
        client_ca_file: Some(dir.path().join("ca.crt")),
    };
    std::fs::write(&files.cert_file, &pki.server.0).unwrap();
    std::fs::write(&files.key_file, &pki.server.1).unwrap();
    std::fs::write(files.client_ca_file.as_ref().unwrap(), &pki.ca).unwrap();
    let cancel = CancellationToken::new();
    let start = |tls: Option<GrpcTlsConfig>, name: &str| {
        let config = MeshConfig {
            grpc_addr: "127.0.0.1:0".parse().unwrap(),
            http_addr: "127.0.0.1:0".parse().unwrap(),
            registry: format!("sqlite://{}", dir.path().join(name).display()),
            grpc_tls: tls,
            ..MeshConfig::default()
        };
        rt.block_on(server::start(config, cancel.clone())).unwrap()
    };
    let plain = start(None, "plain.db");
    let tls = start(Some(files), "tls.db");
    let plain_url = format!("http://127.0.0.1:{}", plain.grpc_addr.port());
    let tls_url = format!("https://localhost:{}", tls.grpc_addr.port());

    let mut group = c.benchmark_group("agent_channel");
    group.measurement_time(Duration::from_secs(5));
    for (name, url, secured) in [
        ("plaintext", &plain_url, None),
        ("mutual_tls", &tls_url, Some(&pki)),
    ] {
        let (mut client, session) = rt.block_on(async {
            let mut client = connect(url, secured).await;
            let session = client
                .register(RegisterRequest {
                    node: "bench-node".into(),
                    agent_version: "bench".into(),
                    endpoints: vec![Endpoint {
                        id: "bench-node/udp0".into(),
                        transport: Transport::Udp as i32,
                        address: "127.0.0.1:9403".into(),
                        qpn: 0,
                        tor: "rack-1".into(),
                        device: String::new(),
                    }],
                })
                .await
                .unwrap()
                .into_inner()
                .session;
            (client, session)
        });
        let windows = summaries(100);
        group.bench_function(format!("report_windows_100/{name}"), |b| {
            b.iter(|| {
                rt.block_on(client.report_windows(ReportWindowsRequest {
                    node: "bench-node".into(),
                    session,
                    windows: windows.clone(),
                }))
                .unwrap()
            });
        });
        group.bench_function(format!("connect_and_call/{name}"), |b| {
            b.iter(|| {
                rt.block_on(async {
                    let mut fresh = connect(url, secured).await;
                    fresh
                        .report_windows(ReportWindowsRequest {
                            node: "bench-node".into(),
                            session,
                            windows: Vec::new(),
                        })
                        .await
                        .unwrap()
                })
            });
        });
    }
    group.finish();
    cancel.cancel();
}

criterion_group!(benches, bench);
criterion_main!(benches);
