//! Compiles `proto/**/*.proto` with protox (a pure-Rust protobuf compiler, so no system `protoc`)
//! and generates prost messages and tonic clients/servers. The encoded descriptor set is kept for
//! gRPC server reflection.

use std::path::PathBuf;

const PROTO_FILES: &[&str] = &[
    "cogmesh/v1/workload.proto",
    "cogmesh/v1/mesh.proto",
    "cogmesh/v1/identity.proto",
    "xds/data/orca/v3/orca_load_report.proto",
    "externalscaler/externalscaler.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(PROTO_FILES, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("cogmesh_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // `MeshControl.Connect` would clash with the generated `connect` constructor; clients
        // are built with `new(channel)` instead.
        .build_transport(false)
        .compile_fds(fds)?;
    Ok(())
}
