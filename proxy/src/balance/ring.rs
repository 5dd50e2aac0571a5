//! Consistent hashing for `ring_hash`: each endpoint owns points on a 64-bit ring in proportion
//! to its weight; a request's key goes to the first point at or after its hash, so adding or
//! removing an endpoint moves only the keys next to its points. Ejected endpoints are skipped.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use super::Endpoint;

/// Points per unit of weight.
pub const POINTS_PER_WEIGHT: usize = 128;

#[derive(Debug)]
pub struct Ring {
    /// (hash, endpoint index), sorted by hash.
    points: Vec<(u64, usize)>,
}

/// A stable 64-bit hash (SipHash with fixed keys): the same key maps to the same point in every
/// process, which affinity across sidecars needs.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    #[allow(deprecated)]
    let mut h = std::hash::SipHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

impl Ring {
    pub fn build(endpoints: &[Arc<Endpoint>], weights: &[f64]) -> Ring {
        let mut points = Vec::new();
        for (i, (e, w)) in endpoints.iter().zip(weights).enumerate() {
            let count = ((POINTS_PER_WEIGHT as f64) * w).round().max(1.0) as usize;
            for k in 0..count {
                points.push((stable_hash(format!("{}#{k}", e.addr).as_bytes()), i));
            }
        }
        points.sort_unstable();
        Ring { points }
    }

    pub fn lookup<'a>(&self, hash: u64, endpoints: &'a [Arc<Endpoint>]) -> Option<&'a Arc<Endpoint>> {
        let n = self.points.len();
        if n == 0 {
            return None;
        }
        let start = self.points.partition_point(|(h, _)| *h < hash);
        (0..n)
            .map(|k| &endpoints[self.points[(start + k) % n].1])
            .find(|e| !e.is_ejected())
    }
}
