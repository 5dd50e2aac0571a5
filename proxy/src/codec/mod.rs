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
