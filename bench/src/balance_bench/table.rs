//! The tables printed per scenario: medians over rounds per strategy and offered load, the
//! ratios of cognitive's p99 to round robin's and to Envoy LEAST_REQUEST's, the targets
//! with PASS / FAIL (printed, never asserted), and what each strategy did per endpoint.
//!
//! Pure: samples in, text out.

use std::fmt::Write as _;

use super::measure::{EndpointRun, Sample};
use super::proxies::Variant;
use super::{Level, Scenario};

/// Foreign CPU above which a run is marked as disturbed.
pub const DISTURBED_CORES: f64 = 0.10;
/// Throughputs within this fraction count as equal in the targets ("at equal or higher
/// throughput"): an open-loop run at a fixed rate delivers what it offers, give or take noise.
pub const EQUAL_THROUGHPUT: f64 = 0.01;

pub use cogmesh_bench::report::median;

/// Medians over the successful runs of one strategy at one level.
#[derive(Debug, Clone)]
pub struct Summary {
    pub runs: usize,
    pub offered: f64,
    pub goodput: f64,
    pub success: f64,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub cpu_us: Option<f64>,
    pub groups: Vec<EndpointRun>,
}

pub fn summarize(samples: &[&Sample]) -> Option<Summary> {
    let ok: Vec<&&Sample> = samples.iter().filter(|s| s.error.is_none()).collect();
    if ok.is_empty() {
        return None;
    }
    let med = |f: &dyn Fn(&Sample) -> f64| median(ok.iter().map(|s| f(s)).collect()).unwrap_or(f64::NAN);
    let med_opt = |f: &dyn Fn(&Sample) -> Option<f64>| median(ok.iter().filter_map(|s| f(s)).collect());
    let groups = ok[0]
        .groups
        .iter()
        .enumerate()
        .map(|(i, first)| {
            let of = |f: &dyn Fn(&EndpointRun) -> Option<f64>| {
                median(ok.iter().filter_map(|s| s.groups.get(i).and_then(f)).collect())
            };
            EndpointRun {
                name: first.name.clone(),
                slots: first.slots,
                received: of(&|g| Some(g.received as f64)).unwrap_or(0.0).round() as u64,
                rejected: of(&|g| Some(g.rejected as f64)).unwrap_or(0.0).round() as u64,
                share: of(&|g| Some(g.share)).unwrap_or(f64::NAN),
                window_share: of(&|g| g.window_share),
                demand: of(&|g| g.demand),
                orca_load: of(&|g| g.orca_load),
                orca_fresh: of(&|g| g.orca_fresh),
                rtt_ewma_ms: of(&|g| g.rtt_ewma_ms),
                in_flight: of(&|g| g.in_flight),
                ejected: of(&|g| g.ejected),
                cost_ms: of(&|g| g.cost_ms),
            }
        })
        .collect();
    Some(Summary {
        runs: ok.len(),
        offered: med(&|s| s.offered_rps),
        goodput: med(&|s| s.goodput_rps),
        success: med(&|s| s.success()),
        p50: med(&|s| s.p50_ms),
        p99: med(&|s| s.p99_ms),
        p999: med(&|s| s.p999_ms),
        cpu_us: med_opt(&|s| s.proxy_cpu_us_per_req),
        groups,
    })
}

/// Milliseconds with a precision that suits their size.
/// A cost in ms: as [`ms`] up to a million, then in scientific notation (past the knee the
/// cognitive cost grows exponentially with the load).
pub fn cost(v: f64) -> String {
    if v.is_finite() && v >= 1e6 {
        format!("{v:.1e}")
    } else {
        ms(v)
    }
}

pub fn ms(v: f64) -> String {
    if !v.is_finite() {
        "-".into()
    } else if v < 10.0 {
        format!("{v:.2}")
    } else if v < 1000.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}

fn pct(v: f64, decimals: usize) -> String {
    if v.is_finite() {
        format!("{:.*}", decimals, v * 100.0)
    } else {
        "-".into()
    }
}

fn opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map_or_else(|| "-".into(), f)
}

/// Aligned columns: the first left-aligned, the others right-aligned; two spaces between.
pub fn layout(header: &[&str], rows: &[Vec<String>], indent: &str) -> String {
    let columns = header.len();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate().take(columns) {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| -> String {
        let mut out = String::from(indent);
        for (i, cell) in cells.iter().enumerate() {
            let pad = widths[i].saturating_sub(cell.chars().count());
            if i == 0 {
                out.push_str(cell);
                out.push_str(&" ".repeat(pad));
            } else {
                out.push_str("  ");
                out.push_str(&" ".repeat(pad));
                out.push_str(cell);
            }
        }
        out.trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

fn verdict(pass: bool) -> &'static str {
    if pass {
        "PASS"
    } else {
        "FAIL"
    }
}

/// The p99 ratio of cognitive to `peer` and whether the target holds: ratio at most
/// `limit` at equal (within [`EQUAL_THROUGHPUT`]) or higher throughput.
pub fn p99_target(cog: &Summary, peer: &Summary, limit: f64) -> (f64, bool) {
    let ratio = cog.p99 / peer.p99;
    let throughput = cog.goodput >= peer.goodput * (1.0 - EQUAL_THROUGHPUT);
    (ratio, ratio.is_finite() && ratio <= limit && throughput)
}

/// Everything printed for one scenario.
pub fn render(scenario: &Scenario, variants: &[Variant], samples: &[Sample]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "\n{}", scenario.title);
    for line in &scenario.details {
        let _ = writeln!(out, "  {line}");
    }
    for level in &scenario.levels {
        render_level(&mut out, scenario, level, variants, samples);
    }
    out
}

fn render_level(
    out: &mut String,
    scenario: &Scenario,
    level: &Level,
    variants: &[Variant],
    samples: &[Sample],
) {
    let summaries: Vec<(Variant, Option<Summary>)> = variants
        .iter()
        .map(|&v| {
            let mine: Vec<&Sample> = samples
                .iter()
                .filter(|s| s.level == level.key && s.variant == v)
                .collect();
            (v, summarize(&mine))
        })
        .collect();
    let get = |v: Variant| {
        summaries
            .iter()
            .find(|(x, _)| *x == v)
            .and_then(|(_, s)| s.as_ref())
    };
    let _ = writeln!(
        out,
        "\n  ({}) offered {} rps = {} % of capacity — medians over {} round(s)",
        level.key, level.rate, level.percent, scenario.rounds
    );
    let slow = scenario.slow.is_some();
    let mut header = vec![
        "strategy",
        "offered rps",
        "achieved rps",
        "success %",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
    ];
    let share_header = if slow {
        "→slow % (while slow)".to_string()
    } else {
        format!(
            "share % {}",
            scenario
                .groups
                .iter()
                .map(|(n, _)| n.split(' ').next().unwrap_or(n))
                .collect::<Vec<_>>()
                .join("/")
        )
    };
    header.push(&share_header);
    header.extend(["proxy CPU µs/req", "runs"]);
    let rows: Vec<Vec<String>> = summaries
        .iter()
        .map(|(v, s)| match s {
            None => {
                let mut row = vec![v.label().to_string()];
                row.extend(std::iter::repeat_n("-".to_string(), header.len() - 2));
                row.push("0".into());
                row
            }
            Some(s) => {
                let share = if slow {
                    s.groups
                        .first()
                        .map_or("-".into(), |g| opt(g.window_share, |w| pct(w, 1)))
                } else {
                    s.groups
                        .iter()
                        .map(|g| pct(g.share, 0))
                        .collect::<Vec<_>>()
                        .join("/")
                };
                vec![
                    v.label().to_string(),
                    format!("{:.0}", s.offered),
                    format!("{:.1}", s.goodput),
                    pct(s.success, 2),
                    ms(s.p50),
                    ms(s.p99),
                    ms(s.p999),
                    share,
                    opt(s.cpu_us, |c| format!("{c:.0}")),
                    s.runs.to_string(),
                ]
            }
        })
        .collect();
    out.push_str(&layout(&header, &rows, "  "));

    // Ratios and targets.
    let cog = get(Variant::Cognitive);
    let rr = get(Variant::RoundRobin);
    let envoy = get(Variant::EnvoyLeastRequest);
    let p2c = get(Variant::P2cEwma);
    let ratio = |peer: Option<&Summary>| match (cog, peer) {
        (Some(c), Some(p)) => format!("{:.2}", c.p99 / p.p99),
        _ => "n/a".into(),
    };
    let _ = writeln!(
        out,
        "  cognitive p99 ÷ round_robin p99 = {}; ÷ Envoy LEAST_REQUEST p99 = {}",
        ratio(rr),
        ratio(envoy)
    );
    if slow {
        match cog {
            Some(c) => {
                let _ = writeln!(
                    out,
                    "  target: cognitive success ≥ 99.9 %: {} % → {}",
                    pct(c.success, 3),
                    verdict(c.success >= 0.999)
                );
            }
            None => out.push_str("  target: cognitive success ≥ 99.9 %: n/a (no cognitive run)\n"),
        }
        match (cog, p2c) {
            (Some(c), Some(p)) => {
                let _ = writeln!(
                    out,
                    "  target: cognitive p99.9 below p2c_ewma's: {} vs {} ms → {}",
                    ms(c.p999),
                    ms(p.p999),
                    verdict(c.p999 < p.p999)
                );
            }
            _ => out.push_str("  target: cognitive p99.9 below p2c_ewma's: n/a\n"),
        }
    } else {
        for (peer, name, limit) in [(rr, "round_robin", 0.5), (envoy, "Envoy LEAST_REQUEST", 0.8)] {
            match (cog, peer) {
                (Some(c), Some(p)) => {
                    let (r, pass) = p99_target(c, p, limit);
                    let _ = writeln!(
                        out,
                        "  target: cognitive p99 ≤ {limit}× {name}'s at ≥ its throughput: {r:.2}×, \
                         {:.1} vs {:.1} rps → {}",
                        c.goodput,
                        p.goodput,
                        verdict(pass)
                    );
                }
                _ => {
                    let _ = writeln!(out, "  target: cognitive p99 ≤ {limit}× {name}'s: n/a");
                }
            }
        }
    }

    // Per endpoint.
    let _ = writeln!(
        out,
        "\n  per endpoint{}: share of requests, 503s (queue full), demand = mean (busy+queued)/slots \
         at the workload; for cogmesh what the proxy held: ORCA load (0 when none or stale; fresh % \
         of samples), RTT EWMA, in-flight, ejected % of samples, and the median cognitive cost \
         rtt × (in-flight + 1) × load factor of that view (1/(1 − load) up to 7/8, then \
         8·e^(8·(load − 7/8)))",
        if slow { ", while slow" } else { "" }
    );
    let header = [
        "strategy",
        "endpoint",
        "share %",
        "503s",
        "demand",
        "ORCA load",
        "fresh %",
        "rtt ewma ms",
        "in-flight",
        "ejected %",
        "cost ms",
    ];
    let mut rows = Vec::new();
    for (v, s) in &summaries {
        let Some(s) = s else { continue };
        for (i, g) in s.groups.iter().enumerate() {
            rows.push(vec![
                if i == 0 {
                    v.label().to_string()
                } else {
                    String::new()
                },
                g.name.clone(),
                pct(
                    if slow {
                        g.window_share.unwrap_or(f64::NAN)
                    } else {
                        g.share
                    },
                    1,
                ),
                g.rejected.to_string(),
                opt(g.demand, |d| format!("{d:.2}")),
                opt(g.orca_load, |l| format!("{l:.2}")),
                opt(g.orca_fresh, |f| pct(f, 0)),
                opt(g.rtt_ewma_ms, ms),
                opt(g.in_flight, |f| format!("{f:.1}")),
                opt(g.ejected, |e| pct(e, 0)),
                opt(g.cost_ms, cost),
            ]);
        }
    }
    out.push_str(&layout(&header, &rows, "  "));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(goodput: f64, p99: f64) -> Summary {
        Summary {
            runs: 1,
            offered: 560.0,
            goodput,
            success: 1.0,
            p50: 20.0,
            p99,
            p999: p99 * 2.0,
            cpu_us: None,
            groups: Vec::new(),
        }
    }

    #[test]
    fn costs_past_a_million_are_in_scientific_notation() {
        assert_eq!(cost(922.8), "922.8");
        assert_eq!(cost(618539.0), "618539");
        assert_eq!(cost(48893763798022506526344606109401088.0), "4.9e34");
        assert_eq!(cost(f64::INFINITY), "-");
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(vec![f64::NAN]), None);
    }

    #[test]
    fn p99_target_needs_the_ratio_and_the_throughput() {
        let peer = summary(560.0, 100.0);
        assert_eq!(p99_target(&summary(560.0, 50.0), &peer, 0.5), (0.5, true));
        // 0.5 % less throughput counts as equal; 2 % less does not.
        assert!(p99_target(&summary(557.2, 40.0), &peer, 0.5).1);
        assert!(!p99_target(&summary(548.0, 40.0), &peer, 0.5).1);
        assert!(!p99_target(&summary(600.0, 51.0), &peer, 0.5).1);
        assert!(!p99_target(&summary(600.0, f64::NAN), &peer, 0.5).1);
    }

    #[test]
    fn layout_aligns_columns() {
        let text = layout(
            &["name", "n"],
            &[vec!["a".into(), "1".into()], vec!["long".into(), "100".into()]],
            "",
        );
        assert_eq!(text, "name    n\na       1\nlong  100\n");
    }

    #[test]
    fn ms_precision_follows_size() {
        assert_eq!(ms(1.234), "1.23");
        assert_eq!(ms(21.26), "21.3");
        assert_eq!(ms(1003.4), "1003");
        assert_eq!(ms(f64::NAN), "-");
    }
}
