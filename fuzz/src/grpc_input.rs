//! A gRPC fuzz input: one selector byte, then the request's protobuf bytes.
//!
//! The selector's low bits pick the call; two flag bits let the fuzzer reach
//! past the session check and the window-age check without guessing a random
//! session id or the current time.

/// The five RPCs agents make, plus a pseudo-call that runs the controller's
/// window evaluation and housekeeping on what was reported so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Register,
    WatchPinglist,
    ReportWindows,
    ExchangeTraces,
    ReportServiceFlows,
    Evaluate,
}

impl Call {
    pub const ALL: [Call; 6] = [
        Call::Register,
        Call::WatchPinglist,
        Call::ReportWindows,
        Call::ExchangeTraces,
        Call::ReportServiceFlows,
        Call::Evaluate,
    ];

    /// The gRPC path tonic routes on.
    pub fn path(self) -> &'static str {
        match self {
            Call::Register => "/pingmesh.v1.MeshController/Register",
            Call::WatchPinglist => "/pingmesh.v1.MeshController/WatchPinglist",
            Call::ReportWindows => "/pingmesh.v1.MeshController/ReportWindows",
            Call::ExchangeTraces => "/pingmesh.v1.MeshController/ExchangeTraces",
            Call::ReportServiceFlows => "/pingmesh.v1.MeshController/ReportServiceFlows",
            Call::Evaluate => "",
        }
    }
}

/// Replace the request's `session` with the node's current one.
pub const FLAG_LIVE_SESSION: u8 = 0b1000_0000;
/// Move reported windows to the last few windows before now.
pub const FLAG_RECENT_WINDOWS: u8 = 0b0100_0000;

/// The call and flags of a selector byte.
pub fn split_selector(selector: u8) -> (Call, u8) {
    let call = Call::ALL[usize::from(selector & 0x0f) % Call::ALL.len()];
    (call, selector & (FLAG_LIVE_SESSION | FLAG_RECENT_WINDOWS))
}

/// The selector byte for `call` with `flags`.
pub fn selector(call: Call, flags: u8) -> u8 {
    let index = Call::ALL.iter().position(|c| *c == call).unwrap_or(0);
    u8::try_from(index).unwrap_or(0) | flags
}

/// The node the fuzz target registers before the first input, so inputs that
/// name it (the seeds do) reach the handlers past the session check.
pub const SEEDED_NODE: &str = "fuzz-node";
