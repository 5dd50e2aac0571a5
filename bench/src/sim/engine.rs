//! The discrete-event core: backends with `capacity` slots and a FIFO queue, sidecars that pick
//! with a [`Sidecar`], the sidecars' response timeout, and what every request experienced.
//!
//! Time is simulated (nanoseconds from the start of the run) and advances only from event to
//! event; events at the same instant run in the order they were scheduled, so a run is a pure
//! function of its inputs. A backend reports `load = (busy + queued) / capacity` (uncapped) with
//! every response (after the request leaves it), and the sidecar sees that report only if the
//! response reaches it: a response that arrives after the timeout is dropped, report and
//! latency with it, while the backend has still spent the work.
//!
//! The scenario's timeout is the service's `response_timeout_ms` in the sidecar (the client
//! waits at least as long): when it passes, the sidecar answers 504 `upstream_timeout` and does
//! what the proxy's forwarder does with a gateway failure ([`Sidecar::gateway_failure`]: an RTT
//! sample of the wait, a load report of 1 held through the ejection time and then fresh for the
//! staleness bound, and an ejection for `GATEWAY_FAILURE_EJECTION_MS` unless the endpoint is the
//! last one available to that sidecar). The simulated backends never refuse connections, so
//! `upstream_connect` does not occur.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use cogmesh_proxy::balance::cost::retry_after_penalty;

use super::balancer::{Sidecar, Strategy};
use super::rng::Rng;
use super::workload::{Request, Scenario, MS};

/// How long a backend takes to answer 503 when its queue is full.
const REJECT_NS: u64 = MS;
/// The `Retry-After` (seconds) a full backend sends.
const RETRY_AFTER_S: u64 = 1;

/// Knobs of a run that are not part of the scenario.
#[derive(Clone, Copy, Debug)]
pub struct RunOptions {
    pub sidecars: u32,
    /// Seed of the balancers' draws (the same for every strategy).
    pub balancer_seed: u64,
    /// What the proxy does on a timeout (`true`): see [`Sidecar::gateway_failure`]. `false` is
    /// the proxy before that handling (not the proxy): a timeout only ends the request's
    /// in-flight count, the balancer learns nothing and nothing is ejected.
    pub gateway_failure_handling: bool,
    /// What-if: a load report does not go stale while requests are in flight on the endpoint.
    pub keep_load_in_flight: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    /// A backend finished serving a request.
    Done { backend: u32 },
    /// A backend with a full queue answered 503.
    Rejected { backend: u32 },
    /// The sidecar's response timeout passed (504 `upstream_timeout`, unless answered).
    Deadline,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Event {
    at_ns: u64,
    seq: u64,
    req: u32,
    kind: Kind,
}

struct Backend {
    capacity: u32,
    busy: u32,
    queue: VecDeque<u32>,
    max_queue: Option<u32>,
}

#[derive(Clone, Copy)]
struct Pending {
    endpoint: u32,
    sent_ns: u64,
    open: bool,
}

/// What one strategy's run produced.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub strategy: Strategy,
    pub requests: usize,
    pub ok: usize,
    /// Latency of every request as the client saw it, a failed one counted as the timeout.
    pub latency_ns: Vec<u64>,
    /// Latency of the successful requests only.
    pub ok_latency_ns: Vec<u64>,
    /// Per focus of the scenario: picks of its backends (in its window) and all picks there.
    pub focus_picks: Vec<(u64, u64)>,
    /// Endpoints ejected after a gateway failure, summed over the sidecars (a renewal of an
    /// ejection counts again).
    pub ejections: u64,
    pub duration_ns: u64,
}

struct Sim<'a> {
    scenario: &'a Scenario,
    requests: &'a [Request],
    opts: RunOptions,
    backends: Vec<Backend>,
    sidecars: Vec<Sidecar>,
    pending: Vec<Pending>,
    events: BinaryHeap<Reverse<Event>>,
    seq: u64,
    rng: Rng,
    out: Outcome,
}

/// Runs `strategy` over `requests` (made by `scenario.requests`).
pub fn run(scenario: &Scenario, requests: &[Request], strategy: Strategy, opts: RunOptions) -> Outcome {
    let weights: Vec<f64> = match strategy {
        Strategy::CognitiveWeighted => scenario.backends.iter().map(|b| b.weight).collect(),
        _ => vec![1.0; scenario.backends.len()],
    };
    let mut sim = Sim {
        scenario,
        requests,
        opts,
        backends: scenario
            .backends
            .iter()
            .map(|b| Backend {
                capacity: b.capacity,
                busy: 0,
                queue: VecDeque::new(),
                max_queue: b.max_queue,
            })
            .collect(),
        sidecars: (0..opts.sidecars)
            .map(|_| Sidecar::new(strategy, &weights, opts.keep_load_in_flight))
            .collect(),
        pending: Vec::with_capacity(requests.len()),
        events: BinaryHeap::new(),
        seq: 0,
        rng: Rng::new(opts.balancer_seed),
        out: Outcome {
            strategy,
            requests: requests.len(),
            ok: 0,
            latency_ns: Vec::with_capacity(requests.len()),
            ok_latency_ns: Vec::with_capacity(requests.len()),
            focus_picks: vec![(0, 0); scenario.focus.len()],
            ejections: 0,
            duration_ns: scenario.duration_ns,
        },
    };
    sim.run();
    sim.out.ejections = sim.sidecars.iter().map(Sidecar::ejections).sum();
    sim.out
}

impl Sim<'_> {
    fn schedule(&mut self, at_ns: u64, req: u32, kind: Kind) {
        self.seq += 1;
        self.events.push(Reverse(Event {
            at_ns,
            seq: self.seq,
            req,
            kind,
        }));
    }

    fn run(&mut self) {
        let mut next = 0usize;
        loop {
            let arrival = self.requests.get(next).map(|r| r.arrival_ns);
            let event = self.events.peek().map(|Reverse(e)| e.at_ns);
            match (arrival, event) {
                (None, None) => break,
                // Events due at the same instant as an arrival go first: a response that frees
                // a slot is seen before the next decision.
                (Some(a), Some(e)) if e <= a => self.event(),
                (Some(_), _) => {
                    self.arrive(next as u32);
                    next += 1;
                }
                (None, Some(_)) => self.event(),
            }
        }
    }

    fn arrive(&mut self, req: u32) {
        let r = self.requests[req as usize];
        let now = r.arrival_ns;
        let sidecar = &mut self.sidecars[r.sidecar as usize];
        let Some(endpoint) = sidecar.pick(now, &mut self.rng) else {
            // Every endpoint ejected: 503 `no_endpoints` at once, nothing sent, no pick counted.
            // (Unreachable as the proxy ejects, since it keeps one endpoint available; kept so
            // that a change there cannot panic here.)
            self.pending.push(Pending {
                endpoint: 0,
                sent_ns: now,
                open: false,
            });
            self.out.latency_ns.push(self.scenario.timeout_ns);
            return;
        };
        sidecar.start(endpoint, now);
        for (k, focus) in self.scenario.focus.iter().enumerate() {
            if focus
                .window_ns
                .is_none_or(|(from, until)| (from..until).contains(&now))
            {
                self.out.focus_picks[k].1 += 1;
                if focus.backends.contains(&endpoint) {
                    self.out.focus_picks[k].0 += 1;
                }
            }
        }
        self.pending.push(Pending {
            endpoint: endpoint as u32,
            sent_ns: now,
            open: true,
        });
        self.schedule(now + self.scenario.timeout_ns, req, Kind::Deadline);

        let b = &mut self.backends[endpoint];
        if b.busy < b.capacity {
            b.busy += 1;
            self.begin_service(endpoint, req, now);
        } else if b.max_queue.is_some_and(|q| b.queue.len() >= q as usize) {
            self.schedule(
                now + REJECT_NS,
                req,
                Kind::Rejected {
                    backend: endpoint as u32,
                },
            );
        } else {
            b.queue.push_back(req);
        }
    }

    /// Starts serving `req` on a slot already counted busy.
    fn begin_service(&mut self, backend: usize, req: u32, now: u64) {
        let slow = self.scenario.backends[backend]
            .slow
            .as_ref()
            .filter(|s| (s.from_ns..s.until_ns).contains(&now));
        let service = slow.map_or(self.requests[req as usize].service_ns, |s| s.service_ns);
        self.schedule(
            now + service,
            req,
            Kind::Done {
                backend: backend as u32,
            },
        );
    }

    fn event(&mut self) {
        let Some(Reverse(e)) = self.events.pop() else {
            return;
        };
        let now = e.at_ns;
        match e.kind {
            Kind::Done { backend } => {
                let backend = backend as usize;
                let b = &mut self.backends[backend];
                match b.queue.pop_front() {
                    Some(waiting) => self.begin_service(backend, waiting, now),
                    None => b.busy -= 1,
                }
                let b = &self.backends[backend];
                let load = (b.busy as usize + b.queue.len()) as f64 / b.capacity as f64;
                self.respond(e.req, now, load, true);
            }
            Kind::Rejected { backend } => {
                let b = &self.backends[backend as usize];
                let load = (b.busy as usize + b.queue.len()) as f64 / b.capacity as f64;
                self.respond(e.req, now, load, false);
            }
            Kind::Deadline => {
                let p = self.pending[e.req as usize];
                if !p.open {
                    return;
                }
                self.pending[e.req as usize].open = false;
                let sidecar = &mut self.sidecars[self.requests[e.req as usize].sidecar as usize];
                let endpoint = p.endpoint as usize;
                // The proxy drops the request's `InFlight` when `send` returns the timeout,
                // before the forwarder handles the failure.
                sidecar.finish(endpoint, p.sent_ns);
                if self.opts.gateway_failure_handling {
                    sidecar.gateway_failure(endpoint, now, now - p.sent_ns);
                }
                self.out.latency_ns.push(self.scenario.timeout_ns);
            }
        }
    }

    /// A response (200 if `ok`, else 503 with `Retry-After`) reaches the sidecar, if the client
    /// is still waiting for it.
    fn respond(&mut self, req: u32, now: u64, load: f64, ok: bool) {
        let p = self.pending[req as usize];
        if !p.open {
            return;
        }
        self.pending[req as usize].open = false;
        let sidecar = &mut self.sidecars[self.requests[req as usize].sidecar as usize];
        let endpoint = p.endpoint as usize;
        let latency = now - p.sent_ns;
        if ok {
            sidecar.observe_rtt(endpoint, now, latency);
        } else {
            // The forwarder's 429/503 with `Retry-After`: a back-off, not a latency sample.
            sidecar.back_off(
                endpoint,
                now,
                retry_after_penalty(RETRY_AFTER_S).as_nanos() as u64,
            );
        }
        sidecar.observe_load(endpoint, now, load);
        sidecar.finish(endpoint, p.sent_ns);
        if ok {
            self.out.ok += 1;
            self.out.latency_ns.push(latency);
            self.out.ok_latency_ns.push(latency);
        } else {
            self.out.latency_ns.push(self.scenario.timeout_ns);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::workload::{scenarios, Arrivals, BackendSpec, Focus, Service, Slow, SEC};

    fn opts() -> RunOptions {
        RunOptions {
            sidecars: 2,
            balancer_seed: 9,
            gateway_failure_handling: true,
            keep_load_in_flight: false,
        }
    }

    #[test]
    fn every_request_ends_once_and_runs_repeat_exactly() {
        for s in scenarios(4) {
            let reqs = s.requests(2, &mut Rng::new(3));
            assert_eq!(reqs.len(), s.requests(2, &mut Rng::new(3)).len());
            for k in Strategy::ALL {
                for gateway_failure_handling in [true, false] {
                    let o = RunOptions {
                        gateway_failure_handling,
                        ..opts()
                    };
                    let a = run(&s, &reqs, k, o);
                    assert_eq!(a.latency_ns.len(), reqs.len(), "{} {}", s.key, k.name());
                    assert!(a.ok <= reqs.len());
                    let b = run(&s, &reqs, k, o);
                    assert_eq!((a.ok, a.latency_ns), (b.ok, b.latency_ns));
                    assert_eq!(a.focus_picks, b.focus_picks);
                    assert_eq!(a.ejections, b.ejections);
                    if !gateway_failure_handling {
                        assert_eq!(a.ejections, 0);
                    }
                }
            }
        }
    }

    #[test]
    fn an_idle_mesh_answers_in_the_service_time() {
        let s = Scenario {
            key: "t".into(),
            title: String::new(),
            backends: vec![
                BackendSpec {
                    capacity: 1000,
                    max_queue: None,
                    slow: None,
                    weight: 1.0,
                };
                3
            ],
            service: Service::LogNormal {
                mean_ms: 10.0,
                sigma: 0.1,
            },
            arrivals: Arrivals::Poisson { load: 0.01 },
            duration_ns: 5 * SEC,
            timeout_ns: SEC,
            focus: vec![Focus {
                label: "b0".into(),
                backends: vec![0],
                window_ns: None,
            }],
            weighted_variant: false,
        };
        let reqs = s.requests(1, &mut Rng::new(1));
        let o = run(
            &s,
            &reqs,
            Strategy::RoundRobin,
            RunOptions {
                sidecars: 1,
                ..opts()
            },
        );
        assert_eq!(o.ok, reqs.len());
        let mut got = o.latency_ns.clone();
        let mut want: Vec<u64> = reqs.iter().map(|r| r.service_ns).collect();
        got.sort_unstable();
        want.sort_unstable();
        assert_eq!(got, want);
        // Round robin over 3: a third of the picks, within one.
        let (hit, all) = o.focus_picks[0];
        assert_eq!(all as usize, reqs.len());
        assert!((hit as f64 - all as f64 / 3.0).abs() <= 1.0);
    }

    #[test]
    fn a_full_queue_rejects_and_a_deadline_frees_the_client() {
        let s = Scenario {
            key: "t".into(),
            title: String::new(),
            backends: vec![BackendSpec {
                capacity: 1,
                max_queue: Some(1),
                slow: None,
                weight: 1.0,
            }],
            service: Service::LogNormal {
                mean_ms: 10_000.0,
                sigma: 0.01,
            },
            arrivals: Arrivals::Poisson { load: 0.0 },
            duration_ns: SEC,
            timeout_ns: SEC,
            focus: Vec::new(),
            weighted_variant: false,
        };
        // Three requests at once on one slot and a queue of one: one served (too slowly), one
        // queued, one rejected at once; all three fail, at the timeout latency.
        let reqs: Vec<Request> = (0..3)
            .map(|i| Request {
                arrival_ns: i,
                sidecar: 0,
                service_ns: 10 * SEC,
            })
            .collect();
        let o = run(
            &s,
            &reqs,
            Strategy::Cognitive,
            RunOptions {
                sidecars: 1,
                ..opts()
            },
        );
        assert_eq!(o.ok, 0);
        assert_eq!(o.latency_ns, vec![SEC; 3]);
    }

    /// Two backends, 0 stuck at 10 s per request, a 1 s timeout, a request every 100 ms (at
    /// 50 ms + k × 100 ms: request k + 10 arrives at the instant request k times out, and the
    /// timeout is handled first).
    fn stuck_pair() -> (Scenario, Vec<Request>) {
        let backend = |slow: bool| BackendSpec {
            capacity: 1000,
            max_queue: None,
            slow: slow.then_some(Slow {
                from_ns: 0,
                until_ns: u64::MAX,
                service_ns: 10 * SEC,
            }),
            weight: 1.0,
        };
        let s = Scenario {
            key: "t".into(),
            title: String::new(),
            backends: vec![backend(true), backend(false)],
            service: Service::LogNormal {
                mean_ms: 10.0,
                sigma: 0.1,
            },
            arrivals: Arrivals::Poisson { load: 0.0 },
            duration_ns: 30 * SEC,
            timeout_ns: SEC,
            focus: vec![
                Focus {
                    label: "before".into(),
                    backends: vec![0],
                    window_ns: Some((0, SEC)),
                },
                // The first timeout (of the request sent at 50 ms) is at 1.05 s: ejected until
                // 11.05 s.
                Focus {
                    label: "ejected".into(),
                    backends: vec![0],
                    window_ns: Some((1_050 * MS, 11_050 * MS)),
                },
            ],
            weighted_variant: false,
        };
        let reqs = (0..300)
            .map(|k| Request {
                arrival_ns: 50 * MS + k * 100 * MS,
                sidecar: 0,
                service_ns: 10 * MS,
            })
            .collect();
        (s, reqs)
    }

    #[test]
    fn a_timeout_ejects_the_endpoint_for_every_strategy() {
        let (s, reqs) = stuck_pair();
        for k in Strategy::ALL {
            let one = RunOptions {
                sidecars: 1,
                ..opts()
            };
            let o = run(&s, &reqs, k, one);
            // Nothing goes to the stuck backend while it is ejected (100 requests).
            assert_eq!(o.focus_picks[1], (0, 100), "{}", k.name());
            if k == Strategy::RoundRobin {
                // Alternating until the first timeout: 0, 1, 0, 1, … (5 of the first 10).
                assert_eq!(o.focus_picks[0], (5, 10));
            }
            // The other requests to 0 in flight then time out with only 1 available: one
            // ejection per 10 s window in which 0 got a request; at least the first.
            assert!(o.ejections >= 1, "{}", k.name());
            // Without the handling, round robin keeps alternating through the ejection window.
            let old = run(
                &s,
                &reqs,
                k,
                RunOptions {
                    gateway_failure_handling: false,
                    ..one
                },
            );
            if k == Strategy::RoundRobin {
                assert_eq!(old.focus_picks[1], (50, 100));
                assert!(o.ok > old.ok);
            }
        }
    }

    #[test]
    fn round_robin_spreads_an_ejected_turn_over_the_others() {
        // Four backends, 0 stuck: while it is ejected (1.05–11.05 s, 100 requests) its turn
        // goes to 1 and the counter then skips 1's own turn, so 1, 2 and 3 get a third each
        // (before, 1 took 0's turn and its own: half).
        let (mut s, reqs) = stuck_pair();
        let healthy = s.backends[1].clone();
        s.backends.push(healthy.clone());
        s.backends.push(healthy);
        s.focus = (0..4)
            .map(|b| Focus {
                label: format!("b{b}"),
                backends: vec![b],
                window_ns: Some((1_050 * MS, 11_050 * MS)),
            })
            .collect();
        let o = run(
            &s,
            &reqs,
            Strategy::RoundRobin,
            RunOptions {
                sidecars: 1,
                ..opts()
            },
        );
        let hits: Vec<u64> = o.focus_picks.iter().map(|&(hit, _)| hit).collect();
        assert_eq!(hits[0], 0);
        assert_eq!(hits.iter().sum::<u64>(), 100);
        assert!(hits[1..].iter().all(|&h| (33..=34).contains(&h)), "{hits:?}");
    }

    #[test]
    fn ejection_is_per_sidecar() {
        // Sidecar 0 sends the first 10 requests and ejects backend 0 at 1.05 s; sidecar 1 sends
        // the rest from 1.05 s on, has seen no failure, and alternates 0, 1, 0, … until its own
        // first request to 0 (sent at 1.05 s) times out at 2.05 s: 5 picks of the stuck
        // backend (1.05, 1.25, … 1.85 s) inside sidecar 0's ejection window, none after.
        let (s, mut reqs) = stuck_pair();
        for r in reqs.iter_mut().skip(10) {
            r.sidecar = 1;
        }
        let o = run(
            &s,
            &reqs,
            Strategy::RoundRobin,
            RunOptions {
                sidecars: 2,
                ..opts()
            },
        );
        assert_eq!(o.focus_picks[0], (5, 10));
        assert_eq!(o.focus_picks[1], (5, 100));
    }
}
