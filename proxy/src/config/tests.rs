use super::*;

const GOOD: &str = r#"
admin: 127.0.0.1:9991
workers: 2
listeners:
  - name: outbound
    address: 127.0.0.1:4140
    default_service: web
services:
  - name: web
    endpoints: ["127.0.0.1:8080", "127.0.0.1:8081"]
  - name: api
    protocol: http2
    response_timeout_ms: 500
routes:
  - match: { host: api.local, path_prefix: /v1, headers: { x-tenant: a } }
    service: api
"#;

#[test]
fn parses_a_full_file_with_defaults() {
    let c = ProxyConfig::from_yaml("proxy.yaml", GOOD).unwrap();
    assert_eq!(c.workers, 2);
    assert_eq!(c.listeners[0].direction, Direction::Outbound);
    assert_eq!(c.services[0].endpoints.len(), 2);
    assert_eq!(c.services[0].response_timeout_ms, DEFAULT_RESPONSE_TIMEOUT_MS);
    assert_eq!(c.services[1].protocol, UpstreamProtocol::Http2);
    assert_eq!(c.routes[0].matches.headers["x-tenant"], "a");
    assert_eq!(c.connect_timeout_ms, DEFAULT_CONNECT_TIMEOUT_MS);
}

fn err(text: &str) -> ConfigError {
    ProxyConfig::from_yaml("proxy.yaml", text).unwrap_err()
}

#[test]
fn unknown_field_names_its_path() {
    let e = err(&GOOD.replace("    protocol: http2", "    protocl: http2"));
    assert_eq!(e.file, "proxy.yaml");
    assert_eq!(e.field, "services[1].protocl");
    assert!(e.reason.contains("unknown field `protocl`"), "{e}");
}

#[test]
fn bad_address_names_its_path() {
    let e = err(&GOOD.replace("127.0.0.1:8081", "127.0.0.1:notaport"));
    assert_eq!(e.field, "services[0].endpoints[1]");
    assert!(e.reason.contains("invalid socket address"), "{e}");
}

#[test]
fn route_to_missing_service_is_refused() {
    let e = err(&GOOD.replace("    service: api", "    service: nope"));
    assert_eq!(
        e.to_string(),
        r#"proxy.yaml: routes[0].service: no service named "nope" (known: "api", "web")"#
    );
}

#[test]
fn default_service_must_exist() {
    let e = err(&GOOD.replace("default_service: web", "default_service: gone"));
    assert_eq!(e.field, "listeners[0].default_service");
}

#[test]
fn zero_workers_is_refused() {
    let e = err(&GOOD.replace("workers: 2", "workers: 0"));
    assert_eq!(
        e.to_string(),
        "proxy.yaml: workers: must be between 1 and 1024, got 0"
    );
}

#[test]
fn duplicate_endpoint_and_listener_on_admin_port_are_refused() {
    let e = err(&GOOD.replace("127.0.0.1:8081", "127.0.0.1:8080"));
    assert_eq!(e.field, "services[0].endpoints[1]");
    let e = err(&GOOD.replace("address: 127.0.0.1:4140", "address: 127.0.0.1:9991"));
    assert_eq!(e.field, "listeners[0].address");
}

#[test]
fn quick_mode_is_valid() {
    let c = ProxyConfig::quick(
        "127.0.0.1:4140".parse().unwrap(),
        vec!["127.0.0.1:8080".parse().unwrap()],
        default_admin(),
    );
    c.validate("<command line>").unwrap();
    assert_eq!(c.listeners[0].default_service.as_deref(), Some(QUICK_SERVICE));
}

#[test]
fn the_shipped_example_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/local/proxy.yaml");
    let c = ProxyConfig::from_file(Path::new(path)).unwrap();
    assert_eq!(c.services.len(), 2);
}

const CACHED: &str = r#"
listeners:
  - { name: out, address: "127.0.0.1:4140" }
services:
  - { name: web, endpoints: ["127.0.0.1:8080"] }
routes:
  - name: api
    match: { path_prefix: /api }
    service: web
    compression: { encodings: [gzip, br], min_size: 10 }
    cache: { max_bytes: 1000, max_entry_bytes: 100, default_ttl_ms: 5000 }
  - service: web
    compression: {}
    cache: {}
"#;

#[test]
fn compression_and_cache_parse_with_defaults() {
    use crate::compress::Encoding;
    let c = ProxyConfig::from_yaml("proxy.yaml", CACHED).unwrap();
    let z = c.routes[0].compression.as_ref().unwrap();
    assert_eq!(z.encodings, [Encoding::Gzip, Encoding::Brotli]);
    assert_eq!(z.min_size, 10);
    assert_eq!(z.content_types, default_content_types());
    assert!(!z.decompress_requests);
    let cache = c.routes[0].cache.as_ref().unwrap();
    assert_eq!(
        (cache.max_bytes, cache.max_entry_bytes, cache.default_ttl_ms),
        (1000, 100, 5000)
    );
    let z = c.routes[1].compression.as_ref().unwrap();
    assert_eq!(z.encodings, DEFAULT_ENCODINGS);
    assert_eq!(z.min_size, DEFAULT_COMPRESSION_MIN_SIZE_BYTES);
    let cache = c.routes[1].cache.as_ref().unwrap();
    assert_eq!(cache.max_bytes, DEFAULT_CACHE_MAX_BYTES);
    assert_eq!(cache.max_entry_bytes, DEFAULT_CACHE_MAX_ENTRY_BYTES);
    assert_eq!(cache.default_ttl_ms, 0);
}

#[test]
fn compression_and_cache_errors_name_their_field() {
    let e = ProxyConfig::from_yaml("proxy.yaml", &CACHED.replace("[gzip, br]", "[gzip, lzma]")).unwrap_err();
    assert_eq!(e.field, "routes[0].compression.encodings[1]");
    assert!(e.reason.contains("unknown variant `lzma`"), "{e}");
    let e = ProxyConfig::from_yaml("proxy.yaml", &CACHED.replace("[gzip, br]", "[gzip, gzip]")).unwrap_err();
    assert_eq!(
        e.to_string(),
        r#"proxy.yaml: routes[0].compression.encodings[1]: duplicate encoding "gzip""#
    );
    let e = ProxyConfig::from_yaml(
        "proxy.yaml",
        &CACHED.replace("compression: {}", "compression: { content_types: [json] }"),
    )
    .unwrap_err();
    assert_eq!(e.field, "routes[1].compression.content_types[0]");
    let e = ProxyConfig::from_yaml(
        "proxy.yaml",
        &CACHED.replace("max_entry_bytes: 100", "max_entry_bytes: 2000"),
    )
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "proxy.yaml: routes[0].cache.max_entry_bytes: must be between 1 and max_bytes (1000), got 2000"
    );
    let e =
        ProxyConfig::from_yaml("proxy.yaml", &CACHED.replace("cache: {}", "cache: { ttl: 5 }")).unwrap_err();
    assert_eq!(e.field, "routes[1].cache.ttl");
    assert!(e.reason.contains("unknown field `ttl`"), "{e}");
}

#[test]
fn resilience_settings_have_envoy_defaults_and_are_validated_with_their_path() {
    let c = ProxyConfig::from_yaml("proxy.yaml", GOOD).unwrap();
    assert_eq!(c.limits.max_request_header_bytes, 60 * 1024);
    assert_eq!(c.limits.max_request_headers, 100);
    assert_eq!(c.services[0].circuit_breaker.max_requests, 1024);
    assert_eq!(c.services[0].circuit_breaker.max_retries, 3);
    assert_eq!(c.services[0].outlier_detection.consecutive_failures, 5);
    assert_eq!(c.admission, None);
    let cases = [
        (
            GOOD.replace(
                "    response_timeout_ms: 500",
                "    response_timeout_ms: 500\n    circuit_breaker: { max_requests: 0 }",
            ),
            "proxy.yaml: services[1].circuit_breaker.max_requests: must be greater than 0",
        ),
        (
            GOOD.replace(
                "    default_service: web",
                "    default_service: web\n    rate_limit: { requests_per_second: 0 }",
            ),
            "proxy.yaml: listeners[0].rate_limit.requests_per_second: must be greater than 0",
        ),
        (
            GOOD.replace(
                "    service: api",
                "    service: api\n    rate_limit: { requests_per_second: 5, key: { header: \"a b\" } }",
            ),
            "proxy.yaml: routes[0].rate_limit.key.header: \"a b\" is not a valid HTTP header name",
        ),
        (
            GOOD.replace("workers: 2", "workers: 2\nadmission: { max_concurrency: 0 }"),
            "proxy.yaml: admission.max_concurrency: must be greater than 0",
        ),
        (
            GOOD.replace(
                "workers: 2",
                "workers: 2\nlimits: { max_request_header_bytes: 100 }",
            ),
            "proxy.yaml: limits.max_request_header_bytes: must be at least 8192, got 100",
        ),
        (
            GOOD.replace(
                "    response_timeout_ms: 500",
                "    response_timeout_ms: 500\n    outlier_detection: { max_ejection_percent: 101 }",
            ),
            "proxy.yaml: services[1].outlier_detection.max_ejection_percent: must be at most 100, got 101",
        ),
    ];
    for (text, expected) in cases {
        assert_eq!(err(&text).to_string(), expected);
    }
    let e = err(&GOOD.replace(
        "workers: 2",
        "workers: 2\nadmission: { max_concurrency: 5, queue: 3 }",
    ));
    assert_eq!(e.field, "admission.queue");
}
