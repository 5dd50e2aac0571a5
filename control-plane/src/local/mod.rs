//! The local mesh: `cogmesh up` runs a whole mesh on one machine from `deploy/local/mesh.yaml`,
//! `cogmesh down` stops it, and `cogmesh demo` shows it routing, shedding and scaling.

pub mod demo;
pub mod mesh;
pub mod up;
