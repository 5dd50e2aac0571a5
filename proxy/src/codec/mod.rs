//! cogmesh's own HTTP/2 codec: it serves HTTP/2 clients ([`crate::forward::h2_server`]); the
//! connections to upstreams still run on the `h2` crate.
//!
//! Why: callgrind puts about half of an h2c request's instructions in the `h2` crate, on the
//! two connections of an exchange, and HPACK is a good part of it (`bench/README.md`). The
//! HTTP/1.1 relay shows what a codec of the proxy's own can do: it parses in place, allocates
//! nothing per field and does nothing that forwarding does not need, and it costs fewer
//! instructions per request than HAProxy's or nginx's (`bench/instructions.sh`).
//!
//! - [`hpack`]: header compression, decoder and encoder.
//! - [`frame`]: frames read in place and checked against RFC 9113 §6, and written.
//!
//! The connection on top of them (streams, flow control, settings, limits) is
//! [`crate::forward::h2_server`].

pub mod frame;
pub mod hpack;

/// The connection error of a header block that cannot be decoded: the two ends' HPACK tables
/// are out of step (RFC 9113 §4.3).
pub fn compression_error(e: hpack::DecodeError) -> frame::FrameError {
    tracing::debug!("HPACK: {e}");
    frame::connection_error(
        frame::ErrorCode::COMPRESSION_ERROR,
        "a header block that cannot be decoded",
    )
}

/// A map of a connection's streams by identifier. Identifiers are distinct small integers a
/// connection hands out in order, so they are their own hash (SipHash, the default, cost more
/// than the rest of a lookup).
pub type StreamMap<V> = std::collections::HashMap<u32, V, std::hash::BuildHasherDefault<IdHasher>>;

/// The hasher of [`StreamMap`]: a stream identifier as it is.
#[derive(Default)]
pub struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        // Spread over the high bits too, which hashbrown uses for its control bytes.
        self.0.wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }

    fn write_u32(&mut self, id: u32) {
        self.0 = u64::from(id);
    }
}
