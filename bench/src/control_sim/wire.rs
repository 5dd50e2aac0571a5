//! The sidecars' side of `MeshControl.Connect`, made cheap enough to run 10 000 of in one process.
//!
//! Reports and ACKs are encoded with prost as usual. Routing tables are *not* decoded into
//! `RoutingTable` (one `String` per endpoint, 10 000 endpoints × 10 000 sidecars per version at
//! N = 10 000, which would cost the simulator more CPU than the control plane it measures): the
//! decoder walks the protobuf wire format in place and keeps the version, the endpoint count and
//! the weight of the one endpoint the bench watches. Deltas (`RoutingTableDelta`) are walked the
//! same way: their base version, and the watched endpoint's new weight or removal. The walk is
//! checked against prost's own encoding in the tests below.

use std::sync::Arc;

use bytes::Buf;
use cogmesh_proto::v1::SidecarMessage;
use tonic::codec::{Codec, DecodeBuf, Decoder};
use tonic::Status;
use tonic_prost::ProstEncoder;

/// The gRPC method the sidecars call.
pub const CONNECT_PATH: &str = "/cogmesh.v1.MeshControl/Connect";

/// What the bench keeps of one `ControlMessage`.
#[derive(Clone, Debug, PartialEq)]
pub enum Control {
    Table(TableSummary),
    /// A scaling decision or an unknown kind: ignored.
    Other,
}

/// What the bench keeps of one `RoutingTable` or `RoutingTableDelta`.
#[derive(Clone, Debug, PartialEq)]
pub struct TableSummary {
    pub version: u64,
    /// A delta's base version; `None` for a whole table.
    pub base: Option<u64>,
    /// Endpoints over all services (a delta: endpoints added or changed).
    pub endpoints: usize,
    /// The watched endpoint's weight, if the table lists it (a delta: if it changed).
    pub watched_weight: Option<f64>,
    /// A delta removes the watched endpoint (or its service).
    pub watched_removed: bool,
    /// Encoded size of the `ControlMessage`, bytes.
    pub bytes: usize,
}

/// The endpoint whose weight the bench follows.
#[derive(Debug)]
pub struct Watched {
    pub service: String,
    pub address: String,
}

/// Encodes `SidecarMessage`s with prost and summarizes `ControlMessage`s in place.
#[derive(Clone, Debug)]
pub struct SidecarCodec {
    watched: Arc<Watched>,
}

impl SidecarCodec {
    pub fn new(watched: Arc<Watched>) -> Self {
        SidecarCodec { watched }
    }
}

impl Codec for SidecarCodec {
    type Encode = SidecarMessage;
    type Decode = Control;
    type Encoder = ProstEncoder<SidecarMessage>;
    type Decoder = SummaryDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        SummaryDecoder {
            watched: Arc::clone(&self.watched),
        }
    }
}

#[derive(Debug)]
pub struct SummaryDecoder {
    watched: Arc<Watched>,
}

impl Decoder for SummaryDecoder {
    type Item = Control;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Control>, Status> {
        let len = src.remaining();
        // A DecodeBuf is one contiguous BytesMut slice; fall back to a copy if that ever changes.
        let result = if src.chunk().len() == len {
            let r = summarize(src.chunk(), &self.watched);
            src.advance(len);
            r
        } else {
            let bytes = src.copy_to_bytes(len);
            summarize(&bytes, &self.watched)
        };
        result
            .map(Some)
            .map_err(|e| Status::internal(format!("malformed ControlMessage: {e}")))
    }
}

/// Summarizes one encoded `ControlMessage`.
pub fn summarize(message: &[u8], watched: &Watched) -> Result<Control, &'static str> {
    let mut table = None;
    for field in Fields(message) {
        match field? {
            (1, Value::Bytes(t)) => table = Some((t, false)),
            (3, Value::Bytes(t)) => table = Some((t, true)),
            _ => {}
        }
    }
    let Some((table, delta)) = table else {
        return Ok(Control::Other);
    };
    let mut summary = TableSummary {
        version: 0,
        base: delta.then_some(0),
        endpoints: 0,
        watched_weight: None,
        watched_removed: false,
        bytes: message.len(),
    };
    for field in Fields(table) {
        match (delta, field?) {
            (_, (1, Value::Varint(v))) => summary.version = v,
            (false, (2, Value::Bytes(service))) => scan_service(service, watched, &mut summary)?,
            // `RoutingTableDelta { base_version = 2; repeated ServiceDelta services = 3;
            // repeated string removed_services = 4 }`.
            (true, (2, Value::Varint(v))) => summary.base = Some(v),
            (true, (3, Value::Bytes(service))) => scan_service(service, watched, &mut summary)?,
            (true, (4, Value::Bytes(name))) => summary.watched_removed |= name == watched.service.as_bytes(),
            _ => {}
        }
    }
    Ok(Control::Table(summary))
}

/// `ServiceEndpoints { name = 1; repeated WeightedEndpoint endpoints = 2 }`, or
/// `ServiceDelta { name = 1; repeated WeightedEndpoint upserted = 2; repeated string removed = 3 }`.
fn scan_service(service: &[u8], watched: &Watched, summary: &mut TableSummary) -> Result<(), &'static str> {
    // Fields may come in any order: find the name first (prost writes it first).
    let mut name: &[u8] = &[];
    for field in Fields(service) {
        if let (1, Value::Bytes(n)) = field? {
            name = n;
        }
    }
    let is_watched = name == watched.service.as_bytes();
    for field in Fields(service) {
        let endpoint = match field? {
            (2, Value::Bytes(endpoint)) => endpoint,
            (3, Value::Bytes(removed)) => {
                summary.watched_removed |= is_watched && removed == watched.address.as_bytes();
                continue;
            }
            _ => continue,
        };
        summary.endpoints += 1;
        if !is_watched {
            continue;
        }
        // `WeightedEndpoint { address = 1; double weight = 2 }`; absent weight is 0.
        let mut address: &[u8] = &[];
        let mut weight = 0.0;
        for field in Fields(endpoint) {
            match field? {
                (1, Value::Bytes(a)) => address = a,
                (2, Value::Fixed64(bits)) => weight = f64::from_bits(bits),
                _ => {}
            }
        }
        if address == watched.address.as_bytes() {
            summary.watched_weight = Some(weight);
        }
    }
    Ok(())
}

enum Value<'a> {
    Varint(u64),
    Fixed64(u64),
    Bytes(&'a [u8]),
    Fixed32,
}

/// The fields of one protobuf message, in wire order.
struct Fields<'a>(&'a [u8]);

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u64, Value<'a>), &'static str>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.0.is_empty() {
            return None;
        }
        let field = self.field();
        if field.is_err() {
            // Stop at the first error.
            self.0 = &[];
        }
        Some(field)
    }
}

impl<'a> Fields<'a> {
    fn field(&mut self) -> Result<(u64, Value<'a>), &'static str> {
        let key = self.varint()?;
        let number = key >> 3;
        let value = match key & 7 {
            0 => Value::Varint(self.varint()?),
            1 => Value::Fixed64(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes"))),
            2 => {
                let len = usize::try_from(self.varint()?).map_err(|_| "length overflow")?;
                Value::Bytes(self.take(len)?)
            }
            5 => {
                self.take(4)?;
                Value::Fixed32
            }
            _ => return Err("unsupported wire type"),
        };
        Ok((number, value))
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8], &'static str> {
        if self.0.len() < len {
            return Err("truncated field");
        }
        let (head, tail) = self.0.split_at(len);
        self.0 = tail;
        Ok(head)
    }

    fn varint(&mut self) -> Result<u64, &'static str> {
        let mut value = 0u64;
        for (i, byte) in self.0.iter().enumerate().take(10) {
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                self.0 = &self.0[i + 1..];
                return Ok(value);
            }
        }
        Err("bad varint")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cogmesh_proto::v1::{
        control_message, ControlMessage, RoutingTable, RoutingTableDelta, ScalingDecision, ServiceDelta,
        ServiceEndpoints, WeightedEndpoint,
    };
    use prost::Message;

    fn watched() -> Watched {
        Watched {
            service: "reasoning".into(),
            address: "127.1.0.7:4143".into(),
        }
    }

    fn endpoint(address: &str, weight: f64) -> WeightedEndpoint {
        WeightedEndpoint {
            address: address.into(),
            weight,
        }
    }

    #[test]
    fn summarizes_a_prost_encoded_table() {
        let table = RoutingTable {
            version: 300_000,
            services: vec![
                ServiceEndpoints {
                    name: "gateway".into(),
                    // Same address in another service: not the watched one.
                    endpoints: vec![endpoint("127.1.0.7:4143", 9.0), endpoint("127.1.0.8:4143", 1.0)],
                },
                ServiceEndpoints {
                    name: "reasoning".into(),
                    endpoints: vec![
                        endpoint("127.1.0.6:4143", 1.25),
                        endpoint("127.1.0.7:4143", 0.66),
                        // Weight 0 is not encoded at all.
                        endpoint("127.1.0.9:4143", 0.0),
                    ],
                },
            ],
        };
        let message = ControlMessage {
            kind: Some(control_message::Kind::RoutingTable(table)),
        }
        .encode_to_vec();
        assert_eq!(
            summarize(&message, &watched()),
            Ok(Control::Table(TableSummary {
                version: 300_000,
                base: None,
                endpoints: 5,
                watched_weight: Some(0.66),
                watched_removed: false,
                bytes: message.len(),
            }))
        );
    }

    #[test]
    fn summarizes_a_prost_encoded_delta() {
        let delta = |services, removed_services| {
            ControlMessage {
                kind: Some(control_message::Kind::RoutingTableDelta(RoutingTableDelta {
                    version: 41,
                    base_version: 39,
                    services,
                    removed_services,
                })),
            }
            .encode_to_vec()
        };
        let changed = delta(
            vec![
                ServiceDelta {
                    name: "gateway".into(),
                    upserted: vec![endpoint("127.1.0.7:4143", 9.0)],
                    removed: vec![],
                },
                ServiceDelta {
                    name: "reasoning".into(),
                    upserted: vec![endpoint("127.1.0.6:4143", 1.5), endpoint("127.1.0.7:4143", 0.35)],
                    removed: vec!["127.1.0.9:4143".into()],
                },
            ],
            vec![],
        );
        assert_eq!(
            summarize(&changed, &watched()),
            Ok(Control::Table(TableSummary {
                version: 41,
                base: Some(39),
                endpoints: 3,
                watched_weight: Some(0.35),
                watched_removed: false,
                bytes: changed.len(),
            }))
        );
        let removed = delta(
            vec![ServiceDelta {
                name: "reasoning".into(),
                upserted: vec![],
                removed: vec!["127.1.0.7:4143".into()],
            }],
            vec![],
        );
        let Ok(Control::Table(s)) = summarize(&removed, &watched()) else {
            panic!("not a table");
        };
        assert_eq!((s.watched_weight, s.watched_removed), (None, true));
        let service_gone = delta(vec![], vec!["reasoning".into()]);
        let Ok(Control::Table(s)) = summarize(&service_gone, &watched()) else {
            panic!("not a table");
        };
        assert_eq!((s.base, s.endpoints, s.watched_removed), (Some(39), 0, true));
    }

    #[test]
    fn empty_tables_other_kinds_and_garbage() {
        let empty = ControlMessage {
            kind: Some(control_message::Kind::RoutingTable(RoutingTable::default())),
        }
        .encode_to_vec();
        assert_eq!(
            summarize(&empty, &watched()),
            Ok(Control::Table(TableSummary {
                version: 0,
                base: None,
                endpoints: 0,
                watched_weight: None,
                watched_removed: false,
                bytes: empty.len(),
            }))
        );
        let decision = ControlMessage {
            kind: Some(control_message::Kind::ScalingDecision(ScalingDecision {
                service: "reasoning".into(),
                to_replicas: 3,
                ..Default::default()
            })),
        }
        .encode_to_vec();
        assert_eq!(summarize(&decision, &watched()), Ok(Control::Other));
        assert!(summarize(&[0x0a, 0x05, 0x08], &watched()).is_err(), "truncated");
        assert!(summarize(&[0xff; 11], &watched()).is_err(), "bad varint");
    }
}
