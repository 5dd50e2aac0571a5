//! cogmesh-proto: the generated protobuf messages and gRPC services of cogmesh.
//!
//! The `.proto` sources live in `proto/proto/`; `build.rs` compiles them with protox, so building
//! needs no system `protoc`.
#![forbid(unsafe_code)]

/// `cogmesh.v1`: the workload service (and, later, the control-plane API).
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/cogmesh.v1.rs"));
}

/// `xds.data.orca.v3`: the ORCA load report, as upstreams send it.
pub mod orca {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/xds.data.orca.v3.rs"));
}

/// `externalscaler`: KEDA's external scaler service, which the control plane serves.
pub mod externalscaler {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/externalscaler.rs"));
}

pub mod delta;

/// The encoded `FileDescriptorSet` of every cogmesh proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/cogmesh_descriptor.bin"));
