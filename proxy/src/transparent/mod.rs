//! Transparent mode: listeners that receive connections redirected by iptables (see
//! [`crate::init`]) instead of connections addressed to the proxy.
//!
//! For each captured connection this module owns, in order:
//! 1. the original destination, read with `SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST` (socket2's
//!    `original_dst_v4`/`original_dst_v6`, so no unsafe code here). A connection that was not
//!    redirected (its original destination is the listener itself) is closed: forwarding it
//!    would connect back to us.
//! 2. where it goes: outbound, to the original destination; inbound, to the same port on
//!    loopback (the local app). That target maps to a service of the routing table by a
//!    configured virtual address (`transparent.virtual_services`) or because it is one of the
//!    service's endpoints; otherwise the connection passes through untouched.
//! 3. the protocol ([`detect`]): configured opaque ports skip detection (server-speaks-first
//!    protocols such as SMTP or MySQL would otherwise wait the whole timeout); HTTP/1 and HTTP/2
//!    to a known service are served by the normal request path pinned to that service;
//!    everything else (TLS, unknown bytes, a silent client, HTTP to an unknown destination) is
//!    proxied as opaque TCP — to an endpoint of the service for a virtual address, else to the
//!    target itself.
//!
//! Listeners that are not named in `transparent.listeners` pay nothing: the accept loop checks
//! one `Option` per connection.

pub mod detect;

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tracing::debug;

use self::detect::Detected;
use crate::config::{ConfigError, Direction, ProxyConfig, ServiceConfig};
use crate::route::{EndpointOverrides, RoutingTable};

/// The outbound listener of `--transparent` (iptables redirects the app's TCP here).
pub const OUTBOUND_ADDR: &str = "0.0.0.0:4140";
/// The inbound listener of `--transparent` (iptables redirects the pod's inbound TCP here).
pub const INBOUND_ADDR: &str = "0.0.0.0:4143";
/// Their IPv6 twins (ip6tables redirects there), where the host has IPv6.
pub const OUTBOUND_ADDR_V6: &str = "[::]:4140";
pub const INBOUND_ADDR_V6: &str = "[::]:4143";

/// Turns a quick-mode configuration into `--transparent` mode: the two capture listeners (no
/// default service: the original destination picks it) and their IPv6 twins when the host has
/// IPv6, the default `transparent` section, and no placeholder service without endpoints.
pub fn quick(config: &mut ProxyConfig) {
    let listener = |name: &str, address: &str, direction| crate::config::ListenerConfig {
        name: name.into(),
        address: address.parse().expect("constant address parses"),
        direction,
        default_service: None,
        rate_limit: None,
        tls: None,
        authorization: None,
    };
    config.listeners = vec![
        listener("outbound", OUTBOUND_ADDR, Direction::Outbound),
        listener("inbound", INBOUND_ADDR, Direction::Inbound),
    ];
    if std::net::TcpListener::bind("[::1]:0").is_ok() {
        config
            .listeners
            .push(listener("outbound-v6", OUTBOUND_ADDR_V6, Direction::Outbound));
        config
            .listeners
            .push(listener("inbound-v6", INBOUND_ADDR_V6, Direction::Inbound));
    }
    config.services.retain(|s| !s.endpoints.is_empty());
    config.transparent = Some(TransparentConfig::default());
}

/// Transparent mode: the services pushed by the control plane that the configuration does not
/// name, with the defaults of a `services:` entry that gives only the name, so that captured
/// connections to their endpoints are routed (and counted) like configured ones. Sorted by
/// name; empty without a `transparent` section.
pub fn pushed_services(config: &ProxyConfig, overrides: &EndpointOverrides) -> Vec<ServiceConfig> {
    if config.transparent.is_none() {
        return Vec::new();
    }
    let mut names: Vec<&String> = overrides
        .keys()
        .filter(|n| !config.services.iter().any(|s| &s.name == *n))
        .collect();
    names.sort();
    names
        .into_iter()
        .filter_map(|name| {
            let mut entry = serde_yaml_ng::Mapping::new();
            entry.insert("name".into(), name.as_str().into());
            serde_yaml_ng::from_value(serde_yaml_ng::Value::Mapping(entry)).ok()
        })
        .collect()
}

/// How long a captured connection may take to send enough bytes to recognise its protocol
/// before it is proxied as opaque TCP.
pub const DEFAULT_DETECT_TIMEOUT_MS: u64 = 1_000;

/// Ports whose protocol has the server speak first (FTP, SSH, SMTP, POP3, IMAP, submission,
/// MySQL): detection would only wait for the timeout there.
pub const DEFAULT_OPAQUE_PORTS: [u16; 7] = [21, 22, 25, 110, 143, 587, 3306];

/// The `transparent:` section of `proxy.yaml`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TransparentConfig {
    /// Names of the listeners that receive redirected connections (default `outbound`,
    /// `inbound`, `outbound-v6` and `inbound-v6`, those that exist). Their `direction` says
    /// what to do with them.
    #[serde(default = "default_listeners")]
    pub listeners: Vec<String>,
    #[serde(default = "default_detect_timeout_ms")]
    pub detect_timeout_ms: u64,
    /// Destination ports proxied as opaque TCP without detection.
    #[serde(default = "default_opaque_ports")]
    pub opaque_ports: Vec<u16>,
    /// Service addresses that are no endpoint (a Kubernetes ClusterIP, a VIP): outbound
    /// connections to them go to the service's endpoints.
    #[serde(default)]
    pub virtual_services: Vec<VirtualService>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VirtualService {
    pub service: String,
    pub address: SocketAddr,
}

fn default_listeners() -> Vec<String> {
    ["outbound", "inbound", "outbound-v6", "inbound-v6"]
        .map(String::from)
        .to_vec()
}
fn default_detect_timeout_ms() -> u64 {
    DEFAULT_DETECT_TIMEOUT_MS
}
fn default_opaque_ports() -> Vec<u16> {
    DEFAULT_OPAQUE_PORTS.to_vec()
}

impl Default for TransparentConfig {
    fn default() -> Self {
        TransparentConfig {
            listeners: default_listeners(),
            detect_timeout_ms: DEFAULT_DETECT_TIMEOUT_MS,
            opaque_ports: default_opaque_ports(),
            virtual_services: Vec::new(),
        }
    }
}

impl TransparentConfig {
    /// Checks the section against the rest of the configuration.
    pub fn validate(&self, config: &ProxyConfig, file: &str) -> Result<(), ConfigError> {
        let err = |field: String, reason: String| ConfigError {
            file: file.to_string(),
            field: format!("transparent.{field}"),
            reason,
        };
        let explicit = self.listeners != default_listeners();
        let mut found = 0;
        for (i, name) in self.listeners.iter().enumerate() {
            if config.listeners.iter().any(|l| &l.name == name) {
                found += 1;
            } else if explicit {
                let known: Vec<&str> = config.listeners.iter().map(|l| l.name.as_str()).collect();
                return Err(err(
                    format!("listeners[{i}]"),
                    format!("no listener named {name:?} (known: {known:?})"),
                ));
            }
        }
        if found == 0 {
            return Err(err(
                "listeners".into(),
                "names no listener: name the listeners that receive redirected connections".into(),
            ));
        }
        if self.detect_timeout_ms == 0 {
            return Err(err("detect_timeout_ms".into(), "must be greater than 0".into()));
        }
        for (i, p) in self.opaque_ports.iter().enumerate() {
            if *p == 0 {
                return Err(err(format!("opaque_ports[{i}]"), "port must not be 0".into()));
            }
        }
        for (i, v) in self.virtual_services.iter().enumerate() {
            if !config.services.iter().any(|s| s.name == v.service) {
                return Err(err(
                    format!("virtual_services[{i}].service"),
                    format!("no service named {:?}", v.service),
                ));
            }
            if self.virtual_services[..i].iter().any(|o| o.address == v.address) {
                return Err(err(
                    format!("virtual_services[{i}].address"),
                    format!("duplicate address {}", v.address),
                ));
            }
        }
        Ok(())
    }
}

// === metrics ===

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DetectLabels {
    direction: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ForwardLabels {
    direction: &'static str,
    destination: &'static str,
}

/// `protocol_detect_total{direction,result}`: captured connections by detection outcome
/// (`http1`, `http2`, `tls`, `opaque`, `opaque_port` — skipped by configuration —, `timeout`,
/// `closed`); `transparent_connection_total{direction,destination}`: captured connections by
/// where they went (`service` over HTTP, `service_tcp`, `passthrough`, or `refused`: not
/// redirected or without an original destination).
#[derive(Clone, Default)]
pub struct TransparentMetrics {
    detect: Family<DetectLabels, Counter>,
    forward: Family<ForwardLabels, Counter>,
}

impl TransparentMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = TransparentMetrics::default();
        registry.register(
            "protocol_detect",
            "Captured connections by protocol detection outcome",
            m.detect.clone(),
        );
        registry.register(
            "transparent_connection",
            "Captured connections by where they were sent",
            m.forward.clone(),
        );
        m
    }
}

/// Where a captured connection went: the `destination` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Destination {
    Service,
    ServiceTcp,
    Passthrough,
    Refused,
}

impl Destination {
    const ALL: [Destination; 4] = [
        Destination::Service,
        Destination::ServiceTcp,
        Destination::Passthrough,
        Destination::Refused,
    ];

    fn label(self) -> &'static str {
        match self {
            Destination::Service => "service",
            Destination::ServiceTcp => "service_tcp",
            Destination::Passthrough => "passthrough",
            Destination::Refused => "refused",
        }
    }
}

// === impl Capture ===

/// The transparent handling of one listener, built once per worker and listener; counters are
/// resolved here so a connection only increments atomics.
pub struct Capture {
    direction: Direction,
    detect_timeout: Duration,
    connect_timeout: Duration,
    opaque_ports: Vec<u16>,
    virtual_services: HashMap<SocketAddr, Arc<str>>,
    detected: Vec<(Detected, Counter)>,
    forwarded: Vec<(Destination, Counter)>,
}

impl Capture {
    /// The capture of listener `index`, if the configuration makes it transparent.
    pub fn for_listener(
        config: &ProxyConfig,
        index: usize,
        metrics: &TransparentMetrics,
    ) -> Option<Arc<Self>> {
        let t = config.transparent.as_ref()?;
        let listener = &config.listeners[index];
        if !t.listeners.contains(&listener.name) {
            return None;
        }
        let direction = listener.direction.as_str();
        Some(Arc::new(Capture {
            direction: listener.direction,
            detect_timeout: Duration::from_millis(t.detect_timeout_ms),
            connect_timeout: Duration::from_millis(config.connect_timeout_ms),
            opaque_ports: t.opaque_ports.clone(),
            virtual_services: t
                .virtual_services
                .iter()
                .map(|v| (v.address, Arc::from(v.service.as_str())))
                .collect(),
            detected: handles(&Detected::ALL, &metrics.detect, |d| DetectLabels {
                direction,
                result: d.label(),
            }),
            forwarded: handles(&Destination::ALL, &metrics.forward, |d| ForwardLabels {
                direction,
                destination: d.label(),
            }),
        }))
    }

    fn count_detected(&self, d: Detected) {
        count(&self.detected, d);
    }

    fn count_forwarded(&self, d: Destination) {
        count(&self.forwarded, d);
    }

    /// Handles one captured connection until it ends; `serve_http` serves it as HTTP through the
    /// listener's request path, pinned to the named service.
    pub async fn handle<F, Fut>(&self, stream: TcpStream, table: Arc<RoutingTable>, serve_http: F)
    where
        F: FnOnce(TcpStream, Option<Arc<str>>) -> Fut,
        Fut: Future<Output = ()>,
    {
        let dst = match original_destination(&stream) {
            Ok(dst) => dst,
            Err(e) => {
                debug!("captured connection without an original destination: {e}");
                self.count_forwarded(Destination::Refused);
                return;
            }
        };
        let target = match self.direction {
            Direction::Outbound => dst,
            Direction::Inbound => SocketAddr::new(loopback(dst.ip()), dst.port()),
        };
        let detected = if self.opaque_ports.contains(&dst.port()) {
            Detected::OpaquePort
        } else {
            detect::detect(&stream, self.detect_timeout).await
        };
        self.count_detected(detected);
        if detected == Detected::Closed {
            return;
        }
        let resolved = self.resolve(&table, target);
        if let (true, Some((_, name, _))) = (detected.is_http(), &resolved) {
            self.count_forwarded(Destination::Service);
            drop(table);
            return serve_http(stream, Some(Arc::clone(name))).await;
        }
        let upstream = match &resolved {
            Some((index, _, true)) => table.services[*index].endpoints.pick(None).map(|e| e.addr),
            _ => Some(target),
        };
        drop(table);
        let Some(upstream) = upstream else {
            debug!(%target, "no endpoint for the captured connection's service");
            self.count_forwarded(Destination::Refused);
            return;
        };
        self.count_forwarded(if resolved.is_some() {
            Destination::ServiceTcp
        } else {
            Destination::Passthrough
        });
        self.splice(stream, upstream).await;
    }

    /// The service `target` belongs to: its index, its name and whether `target` is a virtual
    /// address (else an endpoint). A scan per connection, not per request.
    fn resolve(&self, table: &RoutingTable, target: SocketAddr) -> Option<(usize, Arc<str>, bool)> {
        if let Some(name) = self.virtual_services.get(&target) {
            let index = table.services.iter().position(|s| *s.name == **name)?;
            return Some((index, Arc::clone(name), true));
        }
        table.services.iter().enumerate().find_map(|(i, s)| {
            s.endpoints
                .endpoints()
                .iter()
                .any(|e| e.addr == target)
                .then(|| (i, Arc::from(s.name.as_str()), false))
        })
    }

    /// Copies bytes both ways between the client and `upstream` until both sides close.
    async fn splice(&self, mut stream: TcpStream, upstream: SocketAddr) {
        let connect = tokio::time::timeout(self.connect_timeout, TcpStream::connect(upstream)).await;
        let mut up = match connect {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return debug!(%upstream, "captured connection: connect failed: {e}"),
            Err(_) => return debug!(%upstream, "captured connection: connect timed out"),
        };
        let _ = up.set_nodelay(true);
        if let Err(e) = tokio::io::copy_bidirectional(&mut stream, &mut up).await {
            debug!(%upstream, "captured connection ended: {e}");
        }
    }
}

/// One counter per label value, resolved up front.
fn handles<K: Copy, L>(keys: &[K], family: &Family<L, Counter>, labels: impl Fn(K) -> L) -> Vec<(K, Counter)>
where
    L: Clone + std::hash::Hash + Eq,
{
    keys.iter()
        .map(|k| (*k, family.get_or_create(&labels(*k)).clone()))
        .collect()
}

fn count<K: PartialEq>(handles: &[(K, Counter)], key: K) {
    if let Some((_, c)) = handles.iter().find(|(k, _)| *k == key) {
        c.inc();
    }
}

/// The address the client connected to before iptables redirected it. Fails for a connection
/// that was not redirected: its "original" destination is the listener itself.
pub fn original_destination(stream: &TcpStream) -> std::io::Result<SocketAddr> {
    let local = stream.local_addr()?;
    let socket = socket2::SockRef::from(stream);
    let dst = match local {
        SocketAddr::V4(_) => socket.original_dst_v4()?,
        SocketAddr::V6(_) => socket.original_dst_v6()?,
    };
    let dst = dst
        .as_socket()
        .ok_or_else(|| std::io::Error::other("original destination is not an IP address"))?;
    if dst == local {
        return Err(std::io::Error::other(format!(
            "{local}: connection was not redirected (it is addressed to the listener)"
        )));
    }
    Ok(dst)
}

fn loopback(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_connection_that_was_not_redirected_has_no_original_destination() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        // Without a NAT entry the kernel reports ENOENT, or (with one) the listener itself.
        assert!(original_destination(&server).is_err());
    }

    #[test]
    fn quick_mode_captures_on_both_listeners() {
        let mut config = ProxyConfig::quick(
            OUTBOUND_ADDR.parse().unwrap(),
            Vec::new(),
            "127.0.0.1:4191".parse().unwrap(),
        );
        quick(&mut config);
        let names: Vec<&str> = config.listeners.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names[..2], ["outbound", "inbound"]);
        assert!(config.services.is_empty(), "the placeholder service is gone");
        config.validate("<command line>").unwrap();
        let t = config.transparent.as_ref().unwrap();
        for (i, l) in config.listeners.iter().enumerate() {
            assert!(t.listeners.contains(&l.name));
            assert!(Capture::for_listener(&config, i, &TransparentMetrics::default()).is_some());
        }
    }

    #[test]
    fn pushed_services_are_routed_in_transparent_mode_only() {
        let endpoint: SocketAddr = "10.0.0.5:8080".parse().unwrap();
        let overrides: EndpointOverrides = [("reasoning".to_string(), vec![(endpoint, 1.0)])].into();
        let mut config = ProxyConfig::quick(
            OUTBOUND_ADDR.parse().unwrap(),
            Vec::new(),
            "127.0.0.1:4191".parse().unwrap(),
        );
        let metrics = crate::metrics::Metrics::new();
        let plain = RoutingTable::build_with(&config, None, &metrics, &overrides, 1, None);
        assert!(!plain.services.iter().any(|s| s.name == "reasoning"));

        quick(&mut config);
        let table = RoutingTable::build_with(&config, None, &metrics, &overrides, 1, None);
        let names: Vec<&str> = table.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["reasoning"]);
        let capture = Capture::for_listener(&config, 0, &metrics.transparent).unwrap();
        let (index, name, virtual_address) = capture.resolve(&table, endpoint).unwrap();
        assert_eq!((index, &*name, virtual_address), (0, "reasoning", false));
        assert!(capture
            .resolve(&table, "10.0.0.6:8080".parse().unwrap())
            .is_none());
    }

    #[test]
    fn validation_names_the_field() {
        let mut config = ProxyConfig::quick(
            "127.0.0.1:4140".parse().unwrap(),
            vec!["127.0.0.1:8080".parse().unwrap()],
            "127.0.0.1:4191".parse().unwrap(),
        );
        let t = TransparentConfig {
            virtual_services: vec![VirtualService {
                service: "nope".into(),
                address: "10.0.0.1:80".parse().unwrap(),
            }],
            ..Default::default()
        };
        assert!(t.validate(&config, "proxy.yaml").is_err());
        config.transparent = Some(TransparentConfig {
            listeners: vec!["missing".into()],
            ..Default::default()
        });
        let e = config.validate("proxy.yaml").unwrap_err();
        assert_eq!(e.field, "transparent.listeners[0]");
        config.transparent = Some(TransparentConfig::default());
        config.validate("proxy.yaml").unwrap();
    }
}
