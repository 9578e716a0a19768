//! The mesh controller's YAML configuration (`pingmesh-operator standalone
//! --config`): arbitrary text must parse to a config or a parse error, and a
//! config that validates must be one the controller's parts accept, since
//! `validate` is the only gate before they are built.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pingmesh_operator::config::MeshConfig;
use pingmesh_operator::mesh::analyzer::Analyzer;

fuzz_target!(|data: &[u8]| {
    let Ok(config) = serde_yaml::from_slice::<MeshConfig>(data) else {
        return;
    };
    if config.validate().is_err() {
        return;
    }
    if let Err(e) = Analyzer::new(config.sla.clone(), config.pinglist.window_ms) {
        panic!("a validated config's SLA policy is refused by the analyzer: {e}");
    }
    // What the controller writes back (docs, `--print-config`) reads again.
    let text = serde_yaml::to_string(&config).expect("a config serializes");
    let again: MeshConfig = serde_yaml::from_str(&text).expect("a serialized config parses");
    assert_eq!(again, config, "YAML round trip changed the config");
});
