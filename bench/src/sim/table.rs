//! Summaries of a scenario's runs: percentiles, success rate, goodput, gateway-failure
//! ejections, the p99 ratios against `round_robin` and `least_request`, printed as one aligned
//! table per scenario.

use super::balancer::Strategy;
use super::engine::Outcome;
use super::workload::Scenario;

/// Nearest-rank percentile (`q` in `[0, 1]`) of `sorted`, in milliseconds.
pub fn percentile_ms(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1] as f64 / 1e6
}

/// One row of a table.
#[derive(Debug, Clone)]
pub struct Row {
    pub strategy: Strategy,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub ok_p99: f64,
    pub success: f64,
    pub goodput: f64,
    pub ejections: u64,
    pub focus: Vec<f64>,
}

impl Row {
    pub fn from_outcome(mut o: Outcome) -> Row {
        o.latency_ns.sort_unstable();
        o.ok_latency_ns.sort_unstable();
        Row {
            strategy: o.strategy,
            p50: percentile_ms(&o.latency_ns, 0.50),
            p99: percentile_ms(&o.latency_ns, 0.99),
            p999: percentile_ms(&o.latency_ns, 0.999),
            ok_p99: percentile_ms(&o.ok_latency_ns, 0.99),
            success: o.ok as f64 / o.requests.max(1) as f64,
            goodput: o.ok as f64 / (o.duration_ns as f64 / 1e9),
            ejections: o.ejections,
            focus: o
                .focus_picks
                .iter()
                .map(|&(hit, all)| hit as f64 / all.max(1) as f64)
                .collect(),
        }
    }
}

fn ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn ratio(v: f64, base: Option<f64>) -> String {
    match base {
        Some(b) if b > 0.0 => format!("{:.2}", v / b),
        _ => "-".into(),
    }
}

/// The table of one scenario, as text (header, rule, one line per row).
pub fn render(scenario: &Scenario, rows: &[Row]) -> String {
    let base = |s: Strategy| rows.iter().find(|r| r.strategy == s).map(|r| (r.p99, r.ok_p99));
    let (rr, lr) = (base(Strategy::RoundRobin), base(Strategy::LeastRequest));
    let mut header: Vec<String> = [
        "strategy",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "success %",
        "goodput/s",
        "p99/rr",
        "p99/lr",
        "ok p99 ms",
        "ok/rr",
        "ok/lr",
        "ejections",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    header.extend(scenario.focus.iter().map(|f| format!("{} %", f.label)));
    let mut lines: Vec<Vec<String>> = vec![header];
    for r in rows {
        let mut line = vec![
            r.strategy.name().to_string(),
            ms(r.p50),
            ms(r.p99),
            ms(r.p999),
            format!("{:.2}", r.success * 100.0),
            format!("{:.0}", r.goodput),
            ratio(r.p99, rr.map(|b| b.0)),
            ratio(r.p99, lr.map(|b| b.0)),
            ms(r.ok_p99),
            ratio(r.ok_p99, rr.map(|b| b.1)),
            ratio(r.ok_p99, lr.map(|b| b.1)),
            r.ejections.to_string(),
        ];
        line.extend(r.focus.iter().map(|f| format!("{:.1}", f * 100.0)));
        lines.push(line);
    }
    let cols = lines[0].len();
    let width: Vec<usize> = (0..cols)
        .map(|c| lines.iter().map(|l| l[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for (i, line) in lines.iter().enumerate() {
        let cells: Vec<String> = line
            .iter()
            .enumerate()
            .map(|(c, cell)| {
                if c == 0 {
                    format!("{cell:<w$}", w = width[c])
                } else {
                    format!("{cell:>w$}", w = width[c])
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
        if i == 0 {
            let total = width.iter().sum::<usize>() + 2 * (cols - 1);
            out.push_str(&"-".repeat(total));
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u64> = (1..=1000).map(|i| i * 1_000_000).collect();
        assert_eq!(percentile_ms(&v, 0.5), 500.0);
        assert_eq!(percentile_ms(&v, 0.99), 990.0);
        assert_eq!(percentile_ms(&v, 0.999), 999.0);
        assert_eq!(percentile_ms(&v[..1], 0.99), 1.0);
        assert!(percentile_ms(&[], 0.5).is_nan());
    }
}
