//! Every gRPC request the mesh controller takes, through the real tonic
//! service (its framing, size limits and protobuf decoding) into a real
//! `MeshController` on a SQLite registry. One controller lives for the whole
//! process, so a sequence of inputs builds up state (registrations, reports)
//! the next inputs act on. A call must end with a gRPC status, never a panic.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use libfuzzer_sys::fuzz_target;
use pingmesh_fuzz::grpc_input::{
    Call, FLAG_LIVE_SESSION, FLAG_RECENT_WINDOWS, SEEDED_NODE, split_selector,
};
use pingmesh_operator::config::MeshConfig;
use pingmesh_operator::mesh::controller::MeshController;
use pingmesh_operator::mesh::grpc;
use pingmesh_operator::mesh::identity::Unverified;
use pingmesh_operator::mesh::registry::open_registry;
use pingmesh_proto::v1::{
    Endpoint, ExchangeTracesRequest, ReportServiceFlowsRequest, ReportWindowsRequest, Transport,
    WatchPinglistRequest,
};
use pingmesh_proto::window::{unix_now_ms, window_start};
use prost::Message;
use tower::ServiceExt;

struct World {
    runtime: tokio::runtime::Runtime,
    controller: Arc<MeshController>,
    _dir: tempfile::TempDir,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        // tmpfs when there is one: SQLite's syncs would otherwise dominate.
        let dir = tempfile::Builder::new()
            .prefix("pingmesh-fuzz-")
            .tempdir_in(if std::path::Path::new("/dev/shm").is_dir() {
                "/dev/shm"
            } else {
                "/tmp"
            })
            .expect("temp dir");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("tokio runtime");
        let controller = runtime.block_on(async {
            let registry = open_registry(&format!(
                "sqlite://{}",
                dir.path().join("registry.db").display()
            ))
            .await
            .expect("registry");
            let controller = MeshController::new(MeshConfig::default(), registry)
                .await
                .expect("controller");
            let endpoint = Endpoint {
                id: format!("{SEEDED_NODE}/udp0"),
                transport: Transport::Udp.into(),
                address: "10.0.0.1:9500".into(),
                tor: "tor-a".into(),
                ..Endpoint::default()
            };
            controller
                .register(SEEDED_NODE, "fuzz", &[endpoint])
                .await
                .expect("seeded registration");
            controller
        });
        World {
            runtime,
            controller,
            _dir: dir,
        }
    })
}

/// The request re-encoded with the flags applied; the raw bytes when they do
/// not decode (tonic must then refuse them itself).
fn prepare(call: Call, flags: u8, body: &[u8], controller: &MeshController) -> Bytes {
    let live = |node: &str| controller.current_session(node);
    let window_ms = controller.config().pinglist.window_ms;
    macro_rules! patch {
        ($ty:ty, |$r:ident| $edit:block) => {
            match <$ty>::decode(body) {
                Ok(mut $r) => {
                    if flags & FLAG_LIVE_SESSION != 0 {
                        $edit
                    }
                    Bytes::from($r.encode_to_vec())
                }
                Err(_) => Bytes::copy_from_slice(body),
            }
        };
    }
    match call {
        Call::Register | Call::Evaluate => Bytes::copy_from_slice(body),
        Call::WatchPinglist => patch!(WatchPinglistRequest, |r| { r.session = live(&r.node) }),
        Call::ExchangeTraces => patch!(ExchangeTracesRequest, |r| { r.session = live(&r.node) }),
        Call::ReportServiceFlows => {
            patch!(ReportServiceFlowsRequest, |r| { r.session = live(&r.node) })
        }
        Call::ReportWindows => match ReportWindowsRequest::decode(body) {
            Ok(mut r) => {
                if flags & FLAG_LIVE_SESSION != 0 {
                    r.session = live(&r.node);
                }
                if flags & FLAG_RECENT_WINDOWS != 0 {
                    let current = window_start(unix_now_ms(), window_ms);
                    for w in &mut r.windows {
                        let back = w.window_start_ms % 4 + 1;
                        w.window_start_ms = current.saturating_sub(back * u64::from(window_ms));
                        w.window_ms = window_ms;
                    }
                }
                Bytes::from(r.encode_to_vec())
            }
            Err(_) => Bytes::copy_from_slice(body),
        },
    }
}

/// One length-prefixed, uncompressed gRPC message.
fn frame(message: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(message.len() + 5);
    out.put_u8(0);
    out.put_u32(u32::try_from(message.len()).unwrap_or(u32::MAX));
    out.put_slice(message);
    out.freeze()
}

async fn call(controller: &Arc<MeshController>, call: Call, message: Bytes) {
    let request = http::Request::builder()
        .method("POST")
        .uri(call.path())
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(frame(&message)))
        .expect("request");
    let response = grpc::server(controller.clone(), Arc::new(Unverified))
        .oneshot(request)
        .await
        .expect("tonic services are infallible");
    let mut saw_status = response.headers().contains_key("grpc-status");
    let mut body = response.into_body();
    if call == Call::WatchPinglist {
        // The stream stays open while the node is registered: its first
        // frame (a pinglist or the refusal) is enough.
        let _ = tokio::time::timeout(Duration::from_millis(200), body.frame()).await;
        return;
    }
    let rest = tokio::time::timeout(Duration::from_secs(10), body.collect()).await;
    match rest {
        Ok(Ok(collected)) => {
            if let Some(trailers) = collected.trailers() {
                saw_status |= trailers.contains_key("grpc-status");
            }
        }
        Ok(Err(e)) => panic!("{call:?}: the response body failed: {e}"),
        Err(_) => panic!("{call:?}: no answer within 10 s"),
    }
    assert!(saw_status, "{call:?} ended without a grpc-status");
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let world = world();
    let (which, flags) = split_selector(selector);
    let message = prepare(which, flags, body, &world.controller);
    world.runtime.block_on(async {
        if which == Call::Evaluate {
            let window_ms = world.controller.config().pinglist.window_ms;
            let now = unix_now_ms();
            let last = window_start(now, window_ms).saturating_sub(u64::from(window_ms));
            let _ = world.controller.evaluate(last);
            world.controller.housekeeping(now).await;
        } else {
            call(&world.controller, which, message).await;
        }
    });
});
