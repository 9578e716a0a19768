//! Compiles the gRPC contract with protox, so building needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/pingmesh/v1/mesh.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Probe keys are secrets: their Debug (probe_auth.rs) prints the id only,
        // so a logged pinglist never carries them.
        .skip_debug(["pingmesh.v1.ProbeKey"])
        .compile_fds(descriptors)?;
    Ok(())
}
