use std::time::Duration;

use tokio::time::{advance, Instant};

use super::*;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[tokio::test(start_paused = true)]
async fn bucket_allows_the_burst_then_one_per_interval() {
    // 10/s, burst 5: five at once, then one every 100 ms.
    let b = Bucket::new(10, 5);
    let remaining: Vec<u32> = (0..5).map(|_| b.try_take(Instant::now()).remaining).collect();
    assert_eq!(remaining, [4, 3, 2, 1, 0]);
    let d = b.try_take(Instant::now());
    assert_eq!(
        d,
        Decision {
            allowed: false,
            limit: 5,
            remaining: 0,
            reset: ms(500),
            retry_after: ms(100),
        }
    );
    assert_eq!(header_secs(d.retry_after), 1);
    advance(ms(99)).await;
    assert!(!b.try_take(Instant::now()).allowed);
    advance(ms(1)).await;
    let d = b.try_take(Instant::now());
    assert_eq!((d.allowed, d.remaining, d.reset), (true, 0, ms(500)));
    // After a full second of quiet the bucket is full again: burst of five once more.
    advance(Duration::from_secs(1)).await;
    let allowed = (0..8).filter(|_| b.try_take(Instant::now()).allowed).count();
    assert_eq!(allowed, 5);
}

#[tokio::test(start_paused = true)]
async fn bucket_admits_exactly_the_rate_over_a_window() {
    // 1000/s with burst 1000, offered 3000/s for 10 s (one request every 1/3 ms): the bucket
    // admits its burst plus one token per whole millisecond elapsed by the last request
    // (at 9 999.67 ms): 1000 + 9 999.
    let b = Bucket::new(1000, 1000);
    let mut admitted = 0;
    for i in 0..30_000u64 {
        if b.try_take(Instant::now()).allowed {
            admitted += 1;
        }
        // 333_333 or 333_334 ns, so 3 steps are exactly 1 ms.
        let step = if i % 3 == 2 { 333_334 } else { 333_333 };
        advance(Duration::from_nanos(step)).await;
    }
    assert_eq!(admitted, 1000 + 9_999);
}

fn limiter(yaml_key: Option<ClientKey>) -> RateLimiter {
    RateLimiter::new(
        RateLimitConfig {
            requests_per_second: 1,
            burst: Some(2),
            key: yaml_key,
        },
        Counter::default(),
    )
}

#[tokio::test(start_paused = true)]
async fn keyed_limiter_keeps_one_bucket_per_client() {
    let l = limiter(Some(ClientKey::Header("x-api-key".into())));
    let mut a = http::HeaderMap::new();
    a.insert("x-api-key", "a".parse().unwrap());
    let mut b = http::HeaderMap::new();
    b.insert("x-api-key", "b".parse().unwrap());
    let now = Instant::now();
    let got: Vec<bool> = [&a, &a, &a, &b, &b, &b]
        .iter()
        .map(|h| l.check(h, ip(b"10.0.0.1"), now).allowed)
        .collect();
    assert_eq!(got, [true, true, false, true, true, false]);
    assert_eq!(l.limited.get(), 2);

    let l = limiter(Some(ClientKey::ClientIp));
    let none = http::HeaderMap::new();
    let got: Vec<bool> = [b"1", b"1", b"1", b"2"]
        .iter()
        .map(|a| l.check(&none, ip(*a), now).allowed)
        .collect();
    assert_eq!(got, [true, true, false, true]);

    // By mTLS identity: each SPIFFE ID has its bucket; peers without one share another.
    let l = limiter(Some(ClientKey::Identity));
    let peer = |id| Client {
        ip: b"10.0.0.1",
        identity: id,
    };
    let (a, b) = (Some("spiffe://m/ns/a/sa/a"), Some("spiffe://m/ns/b/sa/b"));
    let got: Vec<bool> = [a, a, a, b, None, None, None]
        .iter()
        .map(|id| l.check(&none, peer(*id), now).allowed)
        .collect();
    assert_eq!(got, [true, true, false, true, true, true, false]);
}

fn ip(ip: &[u8]) -> Client<'_> {
    Client { ip, identity: None }
}

#[tokio::test(start_paused = true)]
async fn unkeyed_limiter_is_shared_and_survives_reuse_with_the_same_config() {
    let l = Arc::new(limiter(None));
    let none = http::HeaderMap::new();
    assert!(l.check(&none, ip(b"1"), Instant::now()).allowed);
    assert!(l.check(&none, ip(b"2"), Instant::now()).allowed);
    let same = RateLimiter::reuse_or_new(Some(&l), &l.config.clone(), Counter::default);
    assert!(
        !same.check(&none, ip(b"3"), Instant::now()).allowed,
        "a reload must not refill"
    );
    let changed = RateLimitConfig {
        requests_per_second: 5,
        ..l.config.clone()
    };
    let fresh = RateLimiter::reuse_or_new(Some(&l), &changed, Counter::default);
    assert!(fresh.check(&none, ip(b"3"), Instant::now()).allowed);
}

#[test]
fn config_is_range_checked() {
    let c = RateLimitConfig {
        requests_per_second: 0,
        burst: None,
        key: None,
    };
    assert_eq!(c.check().unwrap_err().0, "requests_per_second");
    let c = RateLimitConfig {
        requests_per_second: 1,
        burst: None,
        key: Some(ClientKey::Header("bad header".into())),
    };
    assert_eq!(
        c.check(),
        Err((
            "key.header",
            "\"bad header\" is not a valid HTTP header name".to_string()
        ))
    );
}

#[test]
fn keys_are_spelled_client_ip_or_a_header() {
    let parse = |s: &str| serde_yaml_ng::from_str::<RateLimitConfig>(s).map_err(|e| e.to_string());
    assert_eq!(
        parse("{ requests_per_second: 5, key: client_ip }").unwrap().key,
        Some(ClientKey::ClientIp)
    );
    assert_eq!(
        parse("{ requests_per_second: 5, key: { header: x-api-key } }")
            .unwrap()
            .key,
        Some(ClientKey::Header("x-api-key".into()))
    );
    assert!(parse("{ requests_per_second: 5, key: client_port }").is_err());
    assert!(parse("{ requests_per_second: 5, rate: 3 }")
        .unwrap_err()
        .contains("unknown field `rate`"));
}
