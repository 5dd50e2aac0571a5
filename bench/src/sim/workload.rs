//! What the simulated mesh is asked to do: service-time distributions, arrival processes, the
//! backends of a scenario, and the three scenarios of the balancer issue.
//!
//! A request's cost is drawn once, with the request, from the workload's own random stream, so
//! every strategy is run on exactly the same requests (common random numbers): differences
//! between strategies come from their decisions, not from luck.

use super::rng::Rng;

pub const MS: u64 = 1_000_000;
pub const SEC: u64 = 1_000_000_000;

/// How long one request keeps a backend slot busy.
#[derive(Clone, Debug)]
pub enum Service {
    /// Log-normal with the given mean and shape σ (of the underlying normal).
    LogNormal { mean_ms: f64, sigma: f64 },
    /// Exponential with the given mean (what `cogmesh workload --service-time-dist
    /// exponential` draws).
    Exponential { mean_ms: f64 },
    /// With probability `p_long` the `long` distribution, else the `short` one: most requests
    /// are cheap, a few are expensive, and nothing on the wire tells them apart.
    Bimodal {
        p_long: f64,
        short: Box<Service>,
        long: Box<Service>,
    },
}

impl Service {
    pub fn mean_ms(&self) -> f64 {
        match self {
            Service::LogNormal { mean_ms, .. } | Service::Exponential { mean_ms } => *mean_ms,
            Service::Bimodal { p_long, short, long } => {
                p_long * long.mean_ms() + (1.0 - p_long) * short.mean_ms()
            }
        }
    }

    pub fn sample_ns(&self, rng: &mut Rng) -> u64 {
        match self {
            Service::LogNormal { mean_ms, sigma } => {
                let mu = mean_ms.ln() - sigma * sigma / 2.0;
                ((mu + sigma * rng.normal()).exp() * MS as f64).max(1.0) as u64
            }
            Service::Exponential { mean_ms } => (rng.exp(*mean_ms) * MS as f64).max(1.0) as u64,
            Service::Bimodal { p_long, short, long } => {
                if rng.unit() < *p_long {
                    long.sample_ns(rng)
                } else {
                    short.sample_ns(rng)
                }
            }
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Service::LogNormal { mean_ms, sigma } => format!("log-normal mean {mean_ms} ms σ {sigma}"),
            Service::Exponential { mean_ms } => format!("exponential mean {mean_ms} ms"),
            Service::Bimodal { p_long, short, long } => format!(
                "{:.1}% {} + {:.1}% {}",
                (1.0 - p_long) * 100.0,
                short.describe(),
                p_long * 100.0,
                long.describe()
            ),
        }
    }
}

/// When requests arrive, as multiples of the mesh's total capacity (requests per second the
/// backends complete when every slot is busy).
#[derive(Clone, Debug)]
pub enum Arrivals {
    Poisson {
        load: f64,
    },
    /// Markov-modulated Poisson with two states: `on` at `on_load`, `off` at `off_load`, each
    /// held for an exponential time with the given mean.
    OnOff {
        on_load: f64,
        off_load: f64,
        mean_on_s: f64,
        mean_off_s: f64,
    },
}

impl Arrivals {
    pub fn mean_load(&self) -> f64 {
        match self {
            Arrivals::Poisson { load } => *load,
            Arrivals::OnOff {
                on_load,
                off_load,
                mean_on_s,
                mean_off_s,
            } => (on_load * mean_on_s + off_load * mean_off_s) / (mean_on_s + mean_off_s),
        }
    }

    /// Arrival times in `[0, duration_ns)` for a mesh of `capacity_rps`.
    pub fn times(&self, capacity_rps: f64, duration_ns: u64, rng: &mut Rng) -> Vec<u64> {
        let mut out = Vec::new();
        let end = duration_ns as f64 / SEC as f64;
        match self {
            Arrivals::Poisson { load } => {
                let mean_gap = 1.0 / (load * capacity_rps);
                let mut t = rng.exp(mean_gap);
                while t < end {
                    out.push((t * SEC as f64) as u64);
                    t += rng.exp(mean_gap);
                }
            }
            Arrivals::OnOff {
                on_load,
                off_load,
                mean_on_s,
                mean_off_s,
            } => {
                // Start in a state drawn from the stationary distribution.
                let mut on = rng.unit() < mean_on_s / (mean_on_s + mean_off_s);
                let mut t = 0.0;
                let hold = |on: bool, rng: &mut Rng| rng.exp(if on { *mean_on_s } else { *mean_off_s });
                let mut state_end = hold(on, rng);
                while t < end {
                    let rate = if on { on_load } else { off_load } * capacity_rps;
                    let next = t + rng.exp(1.0 / rate);
                    if next >= state_end {
                        // Memoryless: restart the draw at the switch.
                        t = state_end;
                        on = !on;
                        state_end = t + hold(on, rng);
                    } else {
                        t = next;
                        if t < end {
                            out.push((t * SEC as f64) as u64);
                        }
                    }
                }
            }
        }
        out
    }

    pub fn describe(&self, capacity_rps: f64) -> String {
        match self {
            Arrivals::Poisson { load } => {
                format!(
                    "Poisson at {:.0}% of capacity ({:.0} rps)",
                    load * 100.0,
                    load * capacity_rps
                )
            }
            Arrivals::OnOff {
                on_load,
                off_load,
                mean_on_s,
                mean_off_s,
            } => format!(
                "on/off MMPP: {:.0}% of capacity for ~{mean_on_s} s, {:.0}% for ~{mean_off_s} s \
                 (mean {:.0}%, {:.0} rps)",
                on_load * 100.0,
                off_load * 100.0,
                self.mean_load() * 100.0,
                self.mean_load() * capacity_rps
            ),
        }
    }
}

/// A period during which every request a backend starts takes a fixed time.
#[derive(Clone, Debug)]
pub struct Slow {
    pub from_ns: u64,
    pub until_ns: u64,
    pub service_ns: u64,
}

#[derive(Clone, Debug)]
pub struct BackendSpec {
    /// Requests served at once; the rest wait in a FIFO queue.
    pub capacity: u32,
    /// Requests that may wait; one more is answered 503 with `Retry-After: 1` (`None`: unbounded).
    pub max_queue: Option<u32>,
    pub slow: Option<Slow>,
    /// The weight a control plane that knows the capacities would push (used by `cognitive_w`).
    pub weight: f64,
}

/// The backends whose share of the picks a scenario reports, optionally only within a window.
#[derive(Clone, Debug)]
pub struct Focus {
    pub label: String,
    pub backends: Vec<usize>,
    pub window_ns: Option<(u64, u64)>,
}

#[derive(Clone, Debug)]
pub struct Scenario {
    pub key: String,
    pub title: String,
    pub backends: Vec<BackendSpec>,
    pub service: Service,
    pub arrivals: Arrivals,
    pub duration_ns: u64,
    /// The sidecars' response timeout (the client waits at least as long): a request not
    /// answered by then fails (504, a gateway failure for the balancer) and frees the client.
    pub timeout_ns: u64,
    pub focus: Vec<Focus>,
    /// Also run `cognitive_w` (weights pushed by the control plane).
    pub weighted_variant: bool,
}

/// One request of the stream: when it arrives, at which sidecar, and what it costs.
#[derive(Clone, Copy, Debug)]
pub struct Request {
    pub arrival_ns: u64,
    pub sidecar: u32,
    pub service_ns: u64,
}

impl Scenario {
    pub fn slots(&self) -> u32 {
        self.backends.iter().map(|b| b.capacity).sum()
    }

    /// Requests per second the backends complete with every slot busy (at the nominal service
    /// time: a slow period is not subtracted).
    pub fn capacity_rps(&self) -> f64 {
        self.slots() as f64 / (self.service.mean_ms() / 1e3)
    }

    pub fn requests(&self, sidecars: u32, rng: &mut Rng) -> Vec<Request> {
        let times = self.arrivals.times(self.capacity_rps(), self.duration_ns, rng);
        times
            .into_iter()
            .map(|arrival_ns| Request {
                arrival_ns,
                sidecar: rng.below(sidecars as usize) as u32,
                service_ns: self.service.sample_ns(rng),
            })
            .collect()
    }

    pub fn describe(&self, sidecars: u32) -> String {
        let mut caps: Vec<String> = Vec::new();
        for b in &self.backends {
            caps.push(b.capacity.to_string());
        }
        let b0 = &self.backends[0];
        let queue = match b0.max_queue {
            Some(q) => format!(", queue ≤ {}× slots then 503 Retry-After: 1", q / b0.capacity),
            None => ", unbounded queues".to_string(),
        };
        format!(
            "{} backends, slots [{}]{queue}; service {}; {}; timeout {} s; {sidecars} sidecar(s); {} s",
            self.backends.len(),
            caps.join(" "),
            self.service.describe(),
            self.arrivals.describe(self.capacity_rps()),
            self.timeout_ns as f64 / SEC as f64,
            self.duration_ns / SEC
        )
    }
}

/// The scenarios of the issue, for a run of `duration_s` seconds.
pub fn scenarios(duration_s: u64) -> Vec<Scenario> {
    let duration_ns = duration_s * SEC;
    let lognormal = Service::LogNormal {
        mean_ms: 50.0,
        sigma: 0.8,
    };

    // (a) 11 equal backends, backend 0 stuck at 2 s per request for the middle half of the run.
    let (from_ns, until_ns) = (duration_ns / 4, duration_ns * 3 / 4);
    let slow_backends = (0..11)
        .map(|i| BackendSpec {
            capacity: 4,
            max_queue: None,
            slow: (i == 0).then_some(Slow {
                from_ns,
                until_ns,
                service_ns: 2 * SEC,
            }),
            weight: 1.0,
        })
        .collect();
    let a = Scenario {
        key: "a".into(),
        title: format!(
            "(a) one backend at 2 s per request from {} s to {} s",
            from_ns / SEC,
            until_ns / SEC
        ),
        backends: slow_backends,
        service: lognormal.clone(),
        arrivals: Arrivals::Poisson { load: 0.7 },
        duration_ns,
        timeout_ns: SEC,
        // Its share of the picks is shown for the first 10 s of the slow period (its last
        // healthy load report is still fresh at first, then each sidecar's first timeout
        // ejects it for 10 s, `GATEWAY_FAILURE_EJECTION_MS`) and for the rest, when it keeps
        // returning from ejection with a stale load report and a decayed latency estimate.
        focus: [(from_ns, from_ns + 10 * SEC), (from_ns + 10 * SEC, until_ns)]
            .into_iter()
            .filter(|(from, until)| from < until)
            .map(|(from, until)| Focus {
                label: format!("→slow {}–{} s", from / SEC, until / SEC),
                backends: vec![0],
                window_ns: Some((from, until)),
            })
            .collect(),
        weighted_variant: false,
    };

    // (b) capacities 1:2:4, two backends of each, reporting load; queues bounded.
    let hetero = |load: f64, tag: &str| {
        let backends = [4u32, 4, 8, 8, 16, 16]
            .iter()
            .map(|&capacity| BackendSpec {
                capacity,
                max_queue: Some(4 * capacity),
                slow: None,
                weight: capacity as f64,
            })
            .collect();
        Scenario {
            key: format!("b{tag}"),
            title: format!("(b) capacities 1:2:4 at {:.0}% load", load * 100.0),
            backends,
            service: lognormal.clone(),
            arrivals: Arrivals::Poisson { load },
            duration_ns,
            timeout_ns: 5 * SEC,
            focus: vec![
                Focus {
                    label: "→4-slot".into(),
                    backends: vec![0, 1],
                    window_ns: None,
                },
                Focus {
                    label: "→16-slot".into(),
                    backends: vec![4, 5],
                    window_ns: None,
                },
            ],
            weighted_variant: true,
        }
    };

    // (c) bursts of mostly cheap requests with rare expensive ones, on equal backends.
    let bursty_backends = (0..8)
        .map(|_| BackendSpec {
            capacity: 8,
            max_queue: None,
            slow: None,
            weight: 1.0,
        })
        .collect();
    let c = Scenario {
        key: "c".into(),
        title: "(c) bursty arrivals, rare expensive requests".into(),
        backends: bursty_backends,
        service: Service::Bimodal {
            p_long: 0.005,
            short: Box::new(Service::LogNormal {
                mean_ms: 20.0,
                sigma: 0.5,
            }),
            long: Box::new(Service::LogNormal {
                mean_ms: 2000.0,
                sigma: 0.3,
            }),
        },
        arrivals: Arrivals::OnOff {
            on_load: 1.3,
            off_load: 0.35,
            mean_on_s: 1.0,
            mean_off_s: 2.0,
        },
        duration_ns,
        timeout_ns: 5 * SEC,
        focus: Vec::new(),
        weighted_variant: false,
    };

    // (r80, r100, ra) the shapes `balance-bench` runs for real (one proxy: `--sidecars 1`), as
    // long as a measured run there plus its warm-up: 10 s of workloads of 2, 4 and 8 slots
    // with queues of 64 and exponential 20 ms service times; 20 s of eleven 4-slot workloads,
    // one of them at 2 s per request for the middle half. (Not scaled by `duration_s`.)
    let exponential = Service::Exponential { mean_ms: 20.0 };
    let real_b = |load: f64, tag: &str| {
        let backends = [2u32, 4, 8]
            .iter()
            .map(|&capacity| BackendSpec {
                capacity,
                max_queue: Some(64),
                slow: None,
                weight: capacity as f64,
            })
            .collect();
        Scenario {
            key: format!("r{tag}"),
            title: format!(
                "(b as balance-bench runs it) capacities 1:2:4 at {:.0}% load",
                load * 100.0
            ),
            backends,
            service: exponential.clone(),
            arrivals: Arrivals::Poisson { load },
            duration_ns: 10 * SEC,
            timeout_ns: 15 * SEC,
            focus: vec![
                Focus {
                    label: "→2-slot".into(),
                    backends: vec![0],
                    window_ns: None,
                },
                Focus {
                    label: "→8-slot".into(),
                    backends: vec![2],
                    window_ns: None,
                },
            ],
            weighted_variant: true,
        }
    };
    let (from_ns, until_ns) = (5 * SEC, 15 * SEC);
    let ra = Scenario {
        key: "ra".into(),
        title: format!(
            "(a as balance-bench runs it) one of 11 workloads at 2 s per request from {} s to {} s",
            from_ns / SEC,
            until_ns / SEC
        ),
        backends: (0..11)
            .map(|i| BackendSpec {
                capacity: 4,
                max_queue: Some(64),
                slow: (i == 0).then_some(Slow {
                    from_ns,
                    until_ns,
                    service_ns: 2 * SEC,
                }),
                weight: 1.0,
            })
            .collect(),
        service: exponential.clone(),
        arrivals: Arrivals::Poisson { load: 0.7 },
        duration_ns: 20 * SEC,
        timeout_ns: SEC,
        focus: vec![Focus {
            label: "→slow".into(),
            backends: vec![0],
            window_ns: Some((from_ns, until_ns)),
        }],
        weighted_variant: false,
    };

    vec![
        a,
        hetero(0.8, "80"),
        hetero(1.0, "100"),
        c,
        real_b(0.8, "80"),
        real_b(1.0, "100"),
        ra,
    ]
}
