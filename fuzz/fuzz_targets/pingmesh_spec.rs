//! The PingMesh custom resource's spec as the operator receives it from the API
//! server (JSON) or a user writes it (YAML): deserialization, `validate`, and
//! the policies a valid spec turns into, which must pass the mesh controller's
//! own checks (the operator would otherwise hand the controller a config it
//! refuses).
#![no_main]

use libfuzzer_sys::fuzz_target;
use pingmesh_operator::crd::PingMeshSpec;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the format, so one corpus exercises both parsers.
    let Some((&format, text)) = data.split_first() else {
        return;
    };
    let spec = if format & 1 == 0 {
        serde_json::from_slice::<PingMeshSpec>(text).ok()
    } else {
        serde_yaml::from_slice::<PingMeshSpec>(text).ok()
    };
    let Some(spec) = spec else {
        return;
    };
    match spec.validate() {
        Ok(()) => {
            if let Err(e) = spec.pinglist_policy().validate() {
                panic!("a valid spec gives a pinglist policy the controller refuses: {e}");
            }
            if let Err(e) = spec.sla_policy().validate() {
                panic!("a valid spec gives an SLA policy the controller refuses: {e}");
            }
            if let Err(e) = spec.trace_settings() {
                panic!("a valid spec gives trace settings that fail: {e}");
            }
        }
        Err(e) => {
            assert!(!e.category().is_empty());
            assert!(!e.to_string().is_empty());
        }
    }
});
