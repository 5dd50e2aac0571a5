use super::*;

#[test]
fn pair_is_always_distinct_and_covers_every_pair() {
    let n = 4;
    let mut seen = std::collections::HashSet::new();
    for r1 in 0..n {
        for r2 in 0..n - 1 {
            let (a, b) = pair(n, r1, r2);
            assert_ne!(a, b);
            assert!(a < n && b < n);
            seen.insert((a, b));
        }
    }
    // n × (n − 1) ordered pairs, each drawn by exactly one (r1, r2).
    assert_eq!(seen.len(), n * (n - 1));
    assert_eq!(pair(3, 1, 1), (1, 2));
    assert_eq!(pair(3, 1, 0), (1, 0));
}

#[test]
fn ewma_takes_peaks_at_once_and_decays_toward_lower_samples() {
    assert_eq!(decayed_ewma(10.0, 50.0, 0.0), 50.0);
    // Δt = τ: decay = e^-1.
    let d = (-1.0f64).exp();
    assert!((decayed_ewma(100.0, 0.0, DECAY_SECS) - 100.0 * d).abs() < 1e-9);
    // Δt = 0: the estimate does not move toward a lower sample.
    assert_eq!(decayed_ewma(100.0, 10.0, 0.0), 100.0);
}

#[tokio::test(start_paused = true)]
async fn peak_ewma_on_a_paused_clock() {
    let e = PeakEwma::new();
    assert_eq!(e.estimate_ns(), DEFAULT_RTT_MS * 1e6);
    tokio::time::advance(Duration::from_secs(10)).await;
    e.observe(Duration::from_millis(100)); // a peak: replaces the estimate
    assert_eq!(e.estimate_ns(), 100e6);
    tokio::time::advance(Duration::from_secs(10)).await;
    e.observe(Duration::from_millis(10));
    let expected = 100e6 * (-1.0f64).exp() + 10e6 * (1.0 - (-1.0f64).exp());
    assert!(
        (e.estimate_ns() - expected).abs() < 1.0,
        "{} vs {expected}",
        e.estimate_ns()
    );
}

fn addrs(n: u16) -> Vec<SocketAddr> {
    (0..n)
        .map(|i| SocketAddr::from(([127, 0, 0, 1], 9000 + i)))
        .collect()
}

#[test]
fn rebuild_keeps_statistics_of_endpoints_that_stay() {
    let a = addrs(3);
    let first = EndpointSet::rebuild(None, &a, BalancerKind::P2cEwma);
    let guard = InFlight::start(Arc::clone(&first.endpoints()[1]));
    let second = EndpointSet::rebuild(Some(&first), &a[1..], BalancerKind::P2cEwma);
    assert_eq!(second.endpoints().len(), 2);
    assert_eq!(second.endpoints()[0].in_flight(), 1);
    drop(guard);
    assert_eq!(second.endpoints()[0].in_flight(), 0);
}

#[test]
fn round_robin_cycles() {
    let set = EndpointSet::rebuild(None, &addrs(3), BalancerKind::RoundRobin);
    let picks: Vec<u16> = (0..6).map(|_| set.pick().unwrap().addr.port()).collect();
    assert_eq!(picks, vec![9000, 9001, 9002, 9000, 9001, 9002]);
}

#[test]
fn p2c_avoids_the_loaded_endpoint() {
    let set = EndpointSet::rebuild(None, &addrs(2), BalancerKind::P2cEwma);
    let _busy: Vec<_> = (0..5)
        .map(|_| InFlight::start(Arc::clone(&set.endpoints()[0])))
        .collect();
    for _ in 0..100 {
        assert_eq!(set.pick().unwrap().addr.port(), 9001);
    }
}

#[test]
fn empty_set_picks_nothing() {
    assert!(EndpointSet::rebuild(None, &[], BalancerKind::P2cEwma)
        .pick()
        .is_none());
}
