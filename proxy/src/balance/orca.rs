//! ORCA load reports that upstreams attach to their responses, wire-compatible with
//! `xds.data.orca.v3.OrcaLoadReport`:
//!
//! - header `endpoint-load-metrics: TEXT cpu_utilization=0.3, named_metrics.cognitive_load=0.7`
//! - header `endpoint-load-metrics: JSON {"cpu_utilization": 0.3, "named_metrics": {...}}`
//! - header `endpoint-load-metrics: BIN <base64 of the serialized proto>`
//! - gRPC trailer `endpoint-load-metrics-bin: <base64 of the serialized proto>`
//!
//! A report that is not exactly one well-formed report (garbage, NaN or infinite or negative
//! values, a key given twice, two forms at once) is rejected: the caller ignores it and counts
//! it, and the request itself is never failed because of it. Parsing is pure.

use std::collections::BTreeMap;

use base64::Engine;
use http::{HeaderMap, HeaderName, HeaderValue};
use prost::Message;

pub const LOAD_HEADER: HeaderName = HeaderName::from_static("endpoint-load-metrics");
pub const LOAD_TRAILER: HeaderName = HeaderName::from_static("endpoint-load-metrics-bin");
/// The named metric cogmesh prefers as the endpoint's load.
pub const COGNITIVE_LOAD: &str = "cognitive_load";

/// The parts of a load report the balancer and the control plane use. `None` means the report
/// did not carry the field.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoadReport {
    pub cpu_utilization: Option<f64>,
    pub mem_utilization: Option<f64>,
    pub application_utilization: Option<f64>,
    pub rps_fractional: Option<f64>,
    pub eps: Option<f64>,
    pub named_metrics: BTreeMap<String, f64>,
    pub utilization: BTreeMap<String, f64>,
}

impl LoadReport {
    /// The endpoint's load: `named_metrics.cognitive_load`, else `application_utilization`,
    /// else `cpu_utilization`.
    pub fn load(&self) -> Option<f64> {
        self.named_metrics
            .get(COGNITIVE_LOAD)
            .copied()
            .or(self.application_utilization)
            .or(self.cpu_utilization)
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    #[error("more than one load report on one response")]
    SeveralForms,
    #[error("unknown form (expected TEXT, JSON or BIN)")]
    UnknownForm,
    #[error("malformed {0} report")]
    Malformed(&'static str),
    #[error("key {0:?} given twice")]
    Duplicate(String),
    #[error("value of {0:?} is not a finite, non-negative number")]
    BadValue(String),
    #[error("unknown key {0:?}")]
    UnknownKey(String),
}

/// The report in `headers`, if any: `Ok(None)` when there is none.
pub fn from_headers(headers: &HeaderMap) -> Result<Option<LoadReport>, ReportError> {
    from_values(headers.get_all(LOAD_HEADER).iter().map(HeaderValue::as_bytes))
}

/// The report in the values of the response header [`LOAD_HEADER`], however the head was
/// parsed: none, one, or (refused) more than one.
pub fn from_values<'a>(
    mut values: impl Iterator<Item = &'a [u8]>,
) -> Result<Option<LoadReport>, ReportError> {
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ReportError::SeveralForms);
    }
    let text = std::str::from_utf8(first)
        .ok()
        .filter(|t| t.bytes().all(|b| b == b'\t' || (0x20..0x7f).contains(&b)))
        .ok_or(ReportError::Malformed("header"))?
        .trim();
    let (form, body) = text.split_once(' ').unwrap_or((text, ""));
    let body = body.trim();
    match form {
        "TEXT" => parse_text(body).map(Some),
        "JSON" => parse_json(body).map(Some),
        "BIN" => parse_bin(body).map(Some),
        _ => Err(ReportError::UnknownForm),
    }
}

/// The report in gRPC trailers, if any.
pub fn from_trailers(trailers: &HeaderMap) -> Result<Option<LoadReport>, ReportError> {
    let mut values = trailers.get_all(LOAD_TRAILER).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() || trailers.contains_key(LOAD_HEADER) {
        return Err(ReportError::SeveralForms);
    }
    let text = first.to_str().map_err(|_| ReportError::Malformed("trailer"))?;
    parse_bin(text.trim()).map(Some)
}

fn check(key: &str, v: f64) -> Result<f64, ReportError> {
    if v.is_finite() && v >= 0.0 {
        Ok(v)
    } else {
        Err(ReportError::BadValue(key.to_string()))
    }
}

fn set(slot: &mut Option<f64>, key: &str, v: f64) -> Result<(), ReportError> {
    if slot.replace(check(key, v)?).is_some() {
        return Err(ReportError::Duplicate(key.to_string()));
    }
    Ok(())
}

fn insert(map: &mut BTreeMap<String, f64>, full_key: &str, name: &str, v: f64) -> Result<(), ReportError> {
    if name.is_empty() {
        return Err(ReportError::Malformed("TEXT"));
    }
    if map.insert(name.to_string(), check(full_key, v)?).is_some() {
        return Err(ReportError::Duplicate(full_key.to_string()));
    }
    Ok(())
}

/// `k=v, k=v, ...` with keys as in the proto, and `named_metrics.NAME` / `utilization.NAME`
/// for map entries.
pub fn parse_text(body: &str) -> Result<LoadReport, ReportError> {
    let mut r = LoadReport::default();
    if body.is_empty() {
        return Err(ReportError::Malformed("TEXT"));
    }
    for pair in body.split(',') {
        let (key, value) = pair.split_once('=').ok_or(ReportError::Malformed("TEXT"))?;
        let (key, value) = (key.trim(), value.trim());
        let v: f64 = value
            .parse()
            .map_err(|_| ReportError::BadValue(key.to_string()))?;
        match key {
            "cpu_utilization" => set(&mut r.cpu_utilization, key, v)?,
            "mem_utilization" => set(&mut r.mem_utilization, key, v)?,
            "application_utilization" => set(&mut r.application_utilization, key, v)?,
            "rps_fractional" => set(&mut r.rps_fractional, key, v)?,
            "eps" => set(&mut r.eps, key, v)?,
            _ => {
                if let Some(name) = key.strip_prefix("named_metrics.") {
                    insert(&mut r.named_metrics, key, name, v)?;
                } else if let Some(name) = key.strip_prefix("utilization.") {
                    insert(&mut r.utilization, key, name, v)?;
                } else {
                    return Err(ReportError::UnknownKey(key.to_string()));
                }
            }
        }
    }
    Ok(r)
}

/// The proto3 JSON mapping: field names as in the proto or in lowerCamelCase. Duplicate keys
/// are refused by the derived deserializer.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonReport {
    #[serde(alias = "cpuUtilization")]
    cpu_utilization: Option<f64>,
    #[serde(alias = "memUtilization")]
    mem_utilization: Option<f64>,
    #[serde(alias = "applicationUtilization")]
    application_utilization: Option<f64>,
    #[serde(alias = "rpsFractional")]
    rps_fractional: Option<f64>,
    eps: Option<f64>,
    #[serde(default, alias = "namedMetrics")]
    named_metrics: BTreeMap<String, f64>,
    #[serde(default)]
    utilization: BTreeMap<String, f64>,
    #[serde(default, alias = "requestCost")]
    request_cost: BTreeMap<String, f64>,
}

pub fn parse_json(body: &str) -> Result<LoadReport, ReportError> {
    let j: JsonReport = serde_json::from_str(body).map_err(|e| {
        let msg = e.to_string();
        match msg.strip_prefix("duplicate field `") {
            Some(rest) => ReportError::Duplicate(rest.split('`').next().unwrap_or_default().to_string()),
            None => ReportError::Malformed("JSON"),
        }
    })?;
    let _ = j.request_cost;
    let opt = |key: &str, v: Option<f64>| v.map(|v| check(key, v)).transpose();
    let r = LoadReport {
        cpu_utilization: opt("cpu_utilization", j.cpu_utilization)?,
        mem_utilization: opt("mem_utilization", j.mem_utilization)?,
        application_utilization: opt("application_utilization", j.application_utilization)?,
        rps_fractional: opt("rps_fractional", j.rps_fractional)?,
        eps: opt("eps", j.eps)?,
        named_metrics: j.named_metrics,
        utilization: j.utilization,
    };
    for (k, v) in r.named_metrics.iter().chain(r.utilization.iter()) {
        check(k, *v)?;
    }
    Ok(r)
}

/// Base64 (standard alphabet, padding optional, as gRPC binary metadata allows) of the
/// serialized `OrcaLoadReport`. proto3 cannot tell a zero from an absent field, so zeros are
/// read as absent.
pub fn parse_bin(body: &str) -> Result<LoadReport, ReportError> {
    let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(body.trim_end_matches('='))
        .map_err(|_| ReportError::Malformed("BIN"))?;
    let p = cogmesh_proto::orca::OrcaLoadReport::decode(bytes.as_slice())
        .map_err(|_| ReportError::Malformed("BIN"))?;
    let nonzero = |key: &str, v: f64| -> Result<Option<f64>, ReportError> {
        if v == 0.0 {
            Ok(None)
        } else {
            check(key, v).map(Some)
        }
    };
    let mut r = LoadReport {
        cpu_utilization: nonzero("cpu_utilization", p.cpu_utilization)?,
        mem_utilization: nonzero("mem_utilization", p.mem_utilization)?,
        application_utilization: nonzero("application_utilization", p.application_utilization)?,
        rps_fractional: nonzero("rps_fractional", p.rps_fractional)?,
        eps: nonzero("eps", p.eps)?,
        ..Default::default()
    };
    for (k, v) in p.named_metrics {
        r.named_metrics.insert(k.clone(), check(&k, v)?);
    }
    for (k, v) in p.utilization {
        r.utilization.insert(k.clone(), check(&k, v)?);
    }
    Ok(r)
}

/// Encodes a report in the BIN form (for workloads and tests).
pub fn encode_bin(report: &cogmesh_proto::orca::OrcaLoadReport) -> String {
    base64::engine::general_purpose::STANDARD.encode(report.encode_to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(LOAD_HEADER, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn text_form() {
        let r = from_headers(&headers(&[
            "TEXT cpu_utilization=0.3, mem_utilization=0.8, named_metrics.cognitive_load=0.72, utilization.gpu=0.5",
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(r.cpu_utilization, Some(0.3));
        assert_eq!(r.mem_utilization, Some(0.8));
        assert_eq!(r.named_metrics[COGNITIVE_LOAD], 0.72);
        assert_eq!(r.utilization["gpu"], 0.5);
        assert_eq!(r.load(), Some(0.72));
    }

    #[test]
    fn json_form_with_both_spellings() {
        let r = from_headers(&headers(&[
            r#"JSON {"cpu_utilization": 0.25, "applicationUtilization": 0.6, "named_metrics": {"x": 1}}"#,
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(r.cpu_utilization, Some(0.25));
        assert_eq!(r.application_utilization, Some(0.6));
        assert_eq!(r.load(), Some(0.6));
    }

    fn bin(report: &cogmesh_proto::orca::OrcaLoadReport) -> String {
        encode_bin(report)
    }

    #[test]
    fn bin_form_and_trailer() {
        let mut p = cogmesh_proto::orca::OrcaLoadReport {
            cpu_utilization: 0.9,
            ..Default::default()
        };
        let r = from_headers(&headers(&[&format!("BIN {}", bin(&p))]))
            .unwrap()
            .unwrap();
        assert_eq!(r.load(), Some(0.9));
        p.named_metrics.insert(COGNITIVE_LOAD.into(), 0.4);
        let mut t = HeaderMap::new();
        // gRPC binary metadata may drop the padding.
        let unpadded = bin(&p).trim_end_matches('=').to_string();
        t.insert(LOAD_TRAILER, HeaderValue::from_str(&unpadded).unwrap());
        let r = from_trailers(&t).unwrap().unwrap();
        assert_eq!(r.load(), Some(0.4));
        assert_eq!(r.cpu_utilization, Some(0.9));
    }

    #[test]
    fn the_load_falls_back_in_order() {
        let r = parse_text("cpu_utilization=0.5").unwrap();
        assert_eq!(r.load(), Some(0.5));
        let r = parse_text("cpu_utilization=0.5, application_utilization=0.2").unwrap();
        assert_eq!(r.load(), Some(0.2));
        let r = parse_text("mem_utilization=0.5").unwrap();
        assert_eq!(r.load(), None);
    }

    #[test]
    fn rejects_what_is_not_exactly_one_good_report() {
        let cases: &[(&[&str], ReportError)] = &[
            (
                &["TEXT cpu_utilization=NaN"],
                ReportError::BadValue("cpu_utilization".into()),
            ),
            (
                &["TEXT cpu_utilization=inf"],
                ReportError::BadValue("cpu_utilization".into()),
            ),
            (
                &["TEXT cpu_utilization=-0.1"],
                ReportError::BadValue("cpu_utilization".into()),
            ),
            (
                &["TEXT cpu_utilization=0.1, cpu_utilization=0.2"],
                ReportError::Duplicate("cpu_utilization".into()),
            ),
            (
                &["TEXT named_metrics.a=1, named_metrics.a=2"],
                ReportError::Duplicate("named_metrics.a".into()),
            ),
            (
                &["TEXT cpu_utilization=0.1", "JSON {\"cpu_utilization\": 0.1}"],
                ReportError::SeveralForms,
            ),
            (&["TEXT garbage"], ReportError::Malformed("TEXT")),
            (&["TEXT"], ReportError::Malformed("TEXT")),
            (&["TEXT bogus=1"], ReportError::UnknownKey("bogus".into())),
            (&["XML <load/>"], ReportError::UnknownForm),
            (&["JSON {not json"], ReportError::Malformed("JSON")),
            (
                &["JSON {\"cpu_utilization\": NaN}"],
                ReportError::Malformed("JSON"),
            ),
            (
                &["JSON {\"eps\": 1, \"eps\": 2}"],
                ReportError::Duplicate("eps".into()),
            ),
            (&["BIN !!!not base64"], ReportError::Malformed("BIN")),
            (&["BIN /w=="], ReportError::Malformed("BIN")),
        ];
        for (values, expected) in cases {
            assert_eq!(
                from_headers(&headers(values)).as_ref(),
                Err(expected),
                "{values:?}"
            );
        }
        // NaN inside a binary report.
        let p = cogmesh_proto::orca::OrcaLoadReport {
            cpu_utilization: f64::NAN,
            ..Default::default()
        };
        assert_eq!(
            from_headers(&headers(&[&format!("BIN {}", bin(&p))])),
            Err(ReportError::BadValue("cpu_utilization".into()))
        );
        assert_eq!(from_headers(&HeaderMap::new()), Ok(None));
    }
}
