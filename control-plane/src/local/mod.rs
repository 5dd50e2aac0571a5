//! The local mesh: `cogmesh up` runs a whole mesh on one machine from `deploy/local/mesh.yaml`,
//! `cogmesh down` stops it.

pub mod mesh;
