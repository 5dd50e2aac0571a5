//! The samples of a run and the tables printed from them.
//!
//! Owns: [`Sample`] (one proxy, one protocol, one worker count, one round), medians over rounds,
//! "added over direct" (per round: proxied minus the direct case of the same round, then the
//! median), the cogmesh-to-peer ratios, and plain-text table layout.

use std::fmt::Write as _;

use serde::Serialize;

use crate::load::{Latency, Throughput};
use crate::peers::{Kind, Proto};

#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub round: usize,
    pub workers: usize,
    pub kind: Kind,
    pub proto: Proto,
    pub latency: Option<Latency>,
    pub throughput: Option<Throughput>,
    /// CPU seconds of the proxy's processes per 1000 requests during the open-loop run.
    pub cpu_s_per_1k_at_rate: Option<f64>,
    /// The same during the closed-loop (maximum throughput) run.
    pub cpu_s_per_1k_at_max: Option<f64>,
    /// Sum of VmRSS over the proxy's processes once it is ready, KiB.
    pub rss_idle_kib: Option<u64>,
    /// Sum of VmHWM over the proxy's processes after all its load runs, KiB.
    pub rss_peak_kib: Option<u64>,
    /// CPU used by other processes on the machine during the measured runs (the larger of the
    /// two), in cores: a build beside the bench shows here.
    pub foreign_cpu_cores: Option<f64>,
    pub error: Option<String>,
}

/// Foreign CPU above which a sample is marked as disturbed.
pub const DISTURBED_CORES: f64 = 0.25;

impl Sample {
    pub fn new(round: usize, workers: usize, kind: Kind, proto: Proto) -> Sample {
        Sample {
            round,
            workers,
            kind,
            proto,
            latency: None,
            throughput: None,
            cpu_s_per_1k_at_rate: None,
            cpu_s_per_1k_at_max: None,
            rss_idle_kib: None,
            rss_peak_kib: None,
            foreign_cpu_cores: None,
            error: None,
        }
    }

    /// One line for the progress log.
    pub fn summary(&self) -> String {
        let mut line = format!(
            "round {} N={} {:<8} {:<8}",
            self.round + 1,
            self.workers,
            self.kind.name(),
            self.proto.label()
        );
        if let Some(l) = &self.latency {
            let _ = write!(
                line,
                " p50 {:.0}µs p99 {:.0}µs p99.9 {:.0}µs",
                l.p50_us, l.p99_us, l.p999_us
            );
            if l.failed > 0 {
                let _ = write!(line, " ({} failed: {})", l.failed, l.failures);
            }
        }
        if let Some(t) = &self.throughput {
            let _ = write!(line, " | {:.0} req/s", t.rps);
            if t.errors > 0 {
                let _ = write!(line, " ({} errors)", t.errors);
            }
        }
        if let Some(cpu) = self.cpu_s_per_1k_at_max {
            let _ = write!(line, " | {cpu:.4} CPU s/1k");
        }
        if let (Some(idle), Some(peak)) = (self.rss_idle_kib, self.rss_peak_kib) {
            let _ = write!(line, " | RSS {} → {} MiB", mib(idle), mib(peak));
        }
        if let Some(foreign) = self.foreign_cpu_cores.filter(|f| *f > DISTURBED_CORES) {
            let _ = write!(line, " | disturbed: other processes used {foreign:.2} cores");
        }
        if let Some(err) = &self.error {
            let _ = write!(line, " | FAILED: {}", err.lines().next().unwrap_or_default());
        }
        line
    }
}

/// One head-to-head run: cogmesh and one peer at the same time, each under an open-loop client
/// of its own at the same rate, in front of the same upstream. Whatever disturbs the machine
/// meanwhile disturbs both.
#[derive(Debug, Clone, Serialize)]
pub struct Duel {
    pub round: usize,
    pub workers: usize,
    pub proto: Proto,
    pub peer: Kind,
    /// The protocol cogmesh and the peer speak to the upstream, in that order.
    pub upstream: [Proto; 2],
    pub cogmesh: Option<Latency>,
    pub other: Option<Latency>,
    pub error: Option<String>,
}

impl Duel {
    pub fn new(round: usize, workers: usize, proto: Proto, peer: Kind) -> Duel {
        Duel {
            round,
            workers,
            proto,
            peer,
            upstream: [proto; 2],
            cogmesh: None,
            other: None,
            error: None,
        }
    }

    /// The upstream protocol, as "h2c", or "HTTP/1.1 / h2c" (cogmesh's / the peer's) when they differ.
    pub fn upstream_label(&self) -> String {
        match self.upstream {
            [mine, theirs] if mine == theirs => mine.label().to_string(),
            [mine, theirs] => format!("{} / {}", mine.label(), theirs.label()),
        }
    }

    /// One line for the progress log.
    pub fn summary(&self) -> String {
        let mut line = format!(
            "round {} N={} head to head {:<8} cogmesh vs {} (upstream {}):",
            self.round + 1,
            self.workers,
            self.proto.label(),
            self.peer.name(),
            self.upstream_label()
        );
        let percentiles = |l: &Latency| format!("{:.0}/{:.0}/{:.0}", l.p50_us, l.p99_us, l.p999_us);
        if let (Some(c), Some(o)) = (&self.cogmesh, &self.other) {
            let _ = write!(line, " p50/p99/p99.9 {} vs {} µs", percentiles(c), percentiles(o));
        }
        if let Some(err) = &self.error {
            let _ = write!(line, " | FAILED: {}", err.lines().next().unwrap_or_default());
        }
        line
    }

    /// (cogmesh's, the peer's) value, for a run that completed.
    fn both(&self, value: impl Fn(&Latency) -> f64) -> Option<(f64, f64)> {
        match (&self.cogmesh, &self.other, &self.error) {
            (Some(c), Some(o), None) => Some((value(c), value(o))),
            _ => None,
        }
    }
}

/// The completed duels of N workers, a protocol and a peer.
fn duels_of(duels: &[Duel], workers: usize, proto: Proto, peer: Kind) -> impl Iterator<Item = &Duel> {
    duels
        .iter()
        .filter(move |d| d.workers == workers && d.proto == proto && d.peer == peer && d.error.is_none())
}

/// One throughput duel: cogmesh and one peer both running in front of the same upstream, and
/// the same closed loop sent to each in turn, in the order cogmesh, peer, peer, cogmesh (peer
/// first on odd rounds). A drift of the machine during the round weighs on both sides alike, so
/// the pair of means compares the proxies where two solo runs minutes apart compare the machine.
#[derive(Debug, Clone, Serialize)]
pub struct RateDuel {
    pub round: usize,
    pub workers: usize,
    pub proto: Proto,
    pub peer: Kind,
    /// Requests per second of each of cogmesh's runs, in the order they ran.
    pub cogmesh: Vec<f64>,
    /// The same for the peer.
    pub other: Vec<f64>,
    pub error: Option<String>,
}

impl RateDuel {
    pub fn new(round: usize, workers: usize, proto: Proto, peer: Kind) -> RateDuel {
        RateDuel {
            round,
            workers,
            proto,
            peer,
            cogmesh: Vec::new(),
            other: Vec::new(),
            error: None,
        }
    }

    /// One line for the progress log.
    pub fn summary(&self) -> String {
        let mut line = format!(
            "round {} N={} throughput in turn {:<8} cogmesh vs {}:",
            self.round + 1,
            self.workers,
            self.proto.label(),
            self.peer.name(),
        );
        let runs = |rps: &[f64]| {
            rps.iter()
                .map(|r| format!("{r:.0}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = write!(line, " {} vs {} req/s", runs(&self.cogmesh), runs(&self.other));
        if let Some(err) = &self.error {
            let _ = write!(line, " | FAILED: {}", err.lines().next().unwrap_or_default());
        }
        line
    }
}

/// A run that pairs cogmesh with one peer in a round: (cogmesh's value, the peer's value).
trait Paired {
    fn key(&self) -> (usize, usize, Proto, Kind);
    fn pair(&self) -> Option<(f64, f64)>;
}

impl Paired for Duel {
    fn key(&self) -> (usize, usize, Proto, Kind) {
        (self.round, self.workers, self.proto, self.peer)
    }

    /// The two p99s, µs.
    fn pair(&self) -> Option<(f64, f64)> {
        self.both(|l| l.p99_us)
    }
}

impl Paired for RateDuel {
    fn key(&self) -> (usize, usize, Proto, Kind) {
        (self.round, self.workers, self.proto, self.peer)
    }

    /// The mean requests per second of each side.
    fn pair(&self) -> Option<(f64, f64)> {
        let mean = |rps: &[f64]| (!rps.is_empty()).then(|| rps.iter().sum::<f64>() / rps.len() as f64);
        match &self.error {
            None => Some((mean(&self.cogmesh)?, mean(&self.other)?)),
            Some(_) => None,
        }
    }
}

/// The pairs of one peer, N and protocol, round by round.
fn pairs_of<T: Paired>(runs: &[T], workers: usize, proto: Proto, peer: Kind) -> Vec<(usize, (f64, f64))> {
    runs.iter()
        .filter(|r| {
            let (_, w, p, k) = r.key();
            (w, p, k) == (workers, proto, peer)
        })
        .filter_map(|r| Some((r.key().0, r.pair()?)))
        .collect()
}

pub fn median(mut values: Vec<f64>) -> Option<f64> {
    values.retain(|v| v.is_finite());
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    })
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

/// A table with right-aligned columns (the first two left-aligned).
struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn render(&self) -> String {
        let columns = self.header.len();
        let width = |i: usize| {
            self.rows
                .iter()
                .filter_map(|row| row.get(i))
                .chain([&self.header[i]])
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        };
        let widths: Vec<usize> = (0..columns).map(width).collect();
        let mut out = String::new();
        for row in [&self.header].into_iter().chain(&self.rows) {
            let mut line = String::from(" ");
            for (i, cell) in row.iter().enumerate() {
                let pad = widths[i].saturating_sub(cell.chars().count());
                if i < 2 {
                    line.push_str(cell);
                    line.push_str(&" ".repeat(pad));
                } else {
                    line.push_str(&" ".repeat(pad));
                    line.push_str(cell);
                }
                line.push_str("  ");
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// What the tables need to know about the run besides the samples.
pub struct Setup {
    pub rounds: usize,
    pub workers: Vec<usize>,
    pub kinds: Vec<Kind>,
    pub rate: u32,
    pub latency_secs: f64,
    pub latency_connections: usize,
    pub throughput_secs: f64,
    pub connections: usize,
    pub threads: usize,
    pub h2c_throughput: bool,
    /// Whether the solo runs (tables 1–3) were made; not with `--head-to-head-only`.
    pub solo: bool,
}

impl Setup {
    /// The protocols with a closed-loop (maximum throughput) run.
    fn throughput_protos(&self) -> &'static [Proto] {
        if self.h2c_throughput {
            &[Proto::H1, Proto::H2c]
        } else {
            &[Proto::H1]
        }
    }
}

struct View<'a> {
    samples: &'a [Sample],
}

impl View<'_> {
    fn of(&self, workers: usize, kind: Kind, proto: Proto) -> impl Iterator<Item = &Sample> {
        self.samples
            .iter()
            .filter(move |s| s.workers == workers && s.kind == kind && s.proto == proto && s.error.is_none())
    }

    fn median(
        &self,
        workers: usize,
        kind: Kind,
        proto: Proto,
        value: impl Fn(&Sample) -> Option<f64>,
    ) -> Option<f64> {
        median(self.of(workers, kind, proto).filter_map(value).collect())
    }

    fn values(
        &self,
        workers: usize,
        kind: Kind,
        proto: Proto,
        value: impl Fn(&Sample) -> Option<f64>,
    ) -> Vec<f64> {
        self.of(workers, kind, proto).filter_map(value).collect()
    }

    /// Median over rounds of (this kind's value − direct's value in the same round).
    fn added(
        &self,
        workers: usize,
        kind: Kind,
        proto: Proto,
        value: impl Fn(&Latency) -> f64,
    ) -> Option<f64> {
        let diffs = self
            .of(workers, kind, proto)
            .filter_map(|s| {
                let mine = value(s.latency.as_ref()?);
                let direct = self
                    .of(workers, Kind::Direct, proto)
                    .find(|d| d.round == s.round)?;
                Some(mine - value(direct.latency.as_ref()?))
            })
            .collect();
        median(diffs)
    }

    /// (cogmesh's value, `kind`'s value) for each round in which both have one.
    fn pairs(
        &self,
        workers: usize,
        kind: Kind,
        proto: Proto,
        value: impl Fn(&Sample) -> Option<f64>,
    ) -> Vec<(f64, f64)> {
        self.of(workers, Kind::Cogmesh, proto)
            .filter_map(|cogmesh| {
                let theirs = self.of(workers, kind, proto).find(|s| s.round == cogmesh.round)?;
                Some((value(cogmesh)?, value(theirs)?))
            })
            .collect()
    }

    /// "k/m": of the m rounds in which cogmesh and every peer have a value, the k in which
    /// `holds(cogmesh's value, peer's value)` for every peer.
    fn rounds_held(
        &self,
        workers: usize,
        proto: Proto,
        peers: &[Kind],
        value: impl Fn(&Sample) -> Option<f64>,
        holds: impl Fn(f64, f64) -> bool,
    ) -> String {
        let (mut held, mut complete) = (0, 0);
        for cogmesh in self.of(workers, Kind::Cogmesh, proto) {
            let Some(mine) = value(cogmesh) else { continue };
            let theirs: Option<Vec<f64>> = peers
                .iter()
                .map(|&k| {
                    self.of(workers, k, proto)
                        .find(|s| s.round == cogmesh.round)
                        .and_then(&value)
                })
                .collect();
            let Some(theirs) = theirs else { continue };
            complete += 1;
            if theirs.iter().all(|&p| holds(mine, p)) {
                held += 1;
            }
        }
        format!("{held}/{complete}")
    }

    fn failures(&self, workers: usize, kind: Kind, proto: Proto) -> usize {
        self.samples
            .iter()
            .filter(|s| s.workers == workers && s.kind == kind && s.proto == proto && s.error.is_some())
            .count()
    }
}

/// The idle memory target, MiB.
pub const IDLE_RSS_TARGET_MIB: f64 = 10.0;

/// Table 4: the targets cell by cell. The verdict compares the medians of the tables
/// above; "rounds" counts the rounds in which the target held between that round's own samples
/// (each proxy measured minutes apart at most), which tells a steady result from a coin toss on
/// a noisy machine.
fn targets(setup: &Setup, view: &View<'_>, duels: &[Duel], rate_duels: &[RateDuel]) -> String {
    let peers: Vec<Kind> = setup
        .kinds
        .iter()
        .copied()
        .filter(|k| !matches!(k, Kind::Direct | Kind::Cogmesh))
        .collect();
    if !setup.kinds.contains(&Kind::Cogmesh) || peers.is_empty() {
        return String::new();
    }
    let mut table = Table::new(&["N", "target", "cogmesh", "best peer", "verdict", "rounds held"]);
    let p99 = |s: &Sample| s.latency.as_ref().map(|l| l.p99_us);
    let rps = |s: &Sample| s.throughput.as_ref().map(|t| t.rps);
    for &workers in &setup.workers {
        for proto in [Proto::H1, Proto::H2c] {
            if setup.solo {
                let added = |kind| view.added(workers, kind, proto, |l| l.p99_us);
                let (mine, best) = (added(Kind::Cogmesh), best_peer(&peers, added, f64::total_cmp));
                table.row(vec![
                    workers.to_string(),
                    format!("added p99 {} below every peer's", proto.label()),
                    signed(mine),
                    best.map_or_else(|| "-".into(), |(k, v)| format!("{} {v:+.0}", k.name())),
                    verdict(mine, best.map(|b| b.1), |c, p| c < p),
                    view.rounds_held(workers, proto, &peers, p99, |c, p| c < p),
                ]);
            }
            let target = format!("p99 {} below every peer's, head to head", proto.label());
            if let Some(row) = paired_target(workers, proto, &peers, duels, target, Better::Lower) {
                table.row(row);
            }
            let target = format!("throughput {} at least every peer's, in turn", proto.label());
            if let Some(row) = paired_target(workers, proto, &peers, rate_duels, target, Better::AtLeast) {
                table.row(row);
            }
        }
        if !setup.solo {
            continue;
        }
        for &proto in setup.throughput_protos() {
            let median_rps = |kind| view.median(workers, kind, proto, rps);
            let (mine, best) = (
                median_rps(Kind::Cogmesh),
                best_peer(&peers, median_rps, |a, b| b.total_cmp(a)),
            );
            table.row(vec![
                workers.to_string(),
                format!("throughput {} at least the best peer's", proto.label()),
                opt(mine, 0),
                best.map_or_else(|| "-".into(), |(k, v)| format!("{} {v:.0}", k.name())),
                verdict(mine, best.map(|b| b.1), |c, p| c >= p),
                view.rounds_held(workers, proto, &peers, rps, |c, p| c >= p),
            ]);
        }
        let idle = |s: &Sample| s.rss_idle_kib.map(|kib| kib as f64 / 1024.0);
        let idle_values = view.values(workers, Kind::Cogmesh, Proto::H1, idle);
        let held = format!(
            "{}/{}",
            idle_values.iter().filter(|v| **v < IDLE_RSS_TARGET_MIB).count(),
            idle_values.len()
        );
        let median_idle = median(idle_values);
        table.row(vec![
            workers.to_string(),
            format!("idle RSS under {IDLE_RSS_TARGET_MIB:.0} MiB"),
            opt(median_idle, 1),
            String::new(),
            verdict(median_idle, Some(IDLE_RSS_TARGET_MIB), |c, limit| c < limit),
            held,
        ]);
    }
    format!(
        "\n4. The issue's targets — verdict on the medians above; rounds held: in how many rounds \
         the target held between that round's own samples\n{}",
        table.render()
    )
}

/// Which way a paired target points.
#[derive(Clone, Copy)]
enum Better {
    /// cogmesh's value below the peer's (latency).
    Lower,
    /// cogmesh's value at least the peer's (throughput).
    AtLeast,
}

impl Better {
    fn holds(self, mine: f64, theirs: f64) -> bool {
        match self {
            Better::Lower => mine < theirs,
            Better::AtLeast => mine >= theirs,
        }
    }
}

/// A head-to-head row of the targets: the target held against every peer. The closest peer is
/// shown (the one whose median cogmesh's is nearest to missing, by the ratio of the two); the
/// verdict is on each peer's medians, and a round holds when the target held against every peer
/// in that round.
fn paired_target<T: Paired>(
    workers: usize,
    proto: Proto,
    peers: &[Kind],
    runs: &[T],
    target: String,
    better: Better,
) -> Option<Vec<String>> {
    let medians: Vec<(Kind, f64, f64)> = peers
        .iter()
        .filter_map(|&peer| {
            let (mine, theirs): (Vec<f64>, Vec<f64>) = pairs_of(runs, workers, proto, peer)
                .into_iter()
                .map(|(_, pair)| pair)
                .unzip();
            Some((peer, median(mine)?, median(theirs)?))
        })
        .collect();
    let ratio_of = |m: &&(Kind, f64, f64)| m.1 / m.2;
    let closest = match better {
        Better::Lower => medians.iter().max_by(|a, b| ratio_of(a).total_cmp(&ratio_of(b))),
        Better::AtLeast => medians.iter().min_by(|a, b| ratio_of(a).total_cmp(&ratio_of(b))),
    }?;
    let met = medians.len() == peers.len()
        && medians
            .iter()
            .all(|(_, mine, theirs)| better.holds(*mine, *theirs));
    let rounds: std::collections::BTreeSet<usize> = runs.iter().map(|r| r.key().0).collect();
    let (mut held, mut complete) = (0, 0);
    for round in rounds {
        let results: Option<Vec<(f64, f64)>> = peers
            .iter()
            .map(|&peer| {
                pairs_of(runs, workers, proto, peer)
                    .into_iter()
                    .find(|(r, _)| *r == round)
                    .map(|(_, pair)| pair)
            })
            .collect();
        let Some(results) = results else { continue };
        complete += 1;
        if results.iter().all(|(mine, theirs)| better.holds(*mine, *theirs)) {
            held += 1;
        }
    }
    Some(vec![
        workers.to_string(),
        target,
        format!("{:.0}", closest.1),
        format!("{} {:.0}", closest.0.name(), closest.2),
        if met { "met" } else { "missed" }.to_string(),
        format!("{held}/{complete}"),
    ])
}

/// Table 5: each duel's medians side by side.
fn head_to_head(setup: &Setup, duels: &[Duel]) -> String {
    if duels.is_empty() {
        return String::new();
    }
    let mut table = Table::new(&[
        "N",
        "peer",
        "protocol",
        "upstream",
        "cogmesh p50/p99/p99.9",
        "peer p50/p99/p99.9",
        "cogmesh÷peer p99",
        "rounds cogmesh's p99 lower",
        "sign test",
    ]);
    for &workers in &setup.workers {
        for proto in [Proto::H1, Proto::H2c] {
            let peers = setup
                .kinds
                .iter()
                .filter(|k| !matches!(k, Kind::Direct | Kind::Cogmesh));
            for &peer in peers.chain([&Kind::Cogmesh]) {
                let runs: Vec<&Duel> = duels_of(duels, workers, proto, peer).collect();
                if runs.is_empty() {
                    continue;
                }
                let med = |value: fn(&Latency) -> f64| -> (Option<f64>, Option<f64>) {
                    let (mine, theirs) = runs.iter().filter_map(|d| d.both(value)).unzip();
                    (median(mine), median(theirs))
                };
                let [p50, p99, p999] = [
                    |l: &Latency| l.p50_us,
                    |l: &Latency| l.p99_us,
                    |l: &Latency| l.p999_us,
                ]
                .map(med);
                let mine = [p50.0, p99.0, p999.0].map(|v| opt(v, 0)).join("/");
                let theirs = [p50.1, p99.1, p999.1].map(|v| opt(v, 0)).join("/");
                let pairs: Vec<(f64, f64)> = runs.iter().filter_map(|d| d.both(|l| l.p99_us)).collect();
                let (lower, sign) = rounds_ahead(&pairs, Better::Lower);
                let name = match peer {
                    Kind::Cogmesh => "cogmesh (control)".to_string(),
                    _ => peer.name().to_string(),
                };
                table.row(vec![
                    workers.to_string(),
                    name,
                    proto.label().to_string(),
                    runs[0].upstream_label(),
                    mine,
                    theirs,
                    ratio(p99.0, p99.1),
                    format!("{lower}/{}", runs.len()),
                    sign,
                ]);
            }
        }
    }
    format!(
        "\n5. Head to head — cogmesh and one peer at the same time, each under its own open loop of \
         {} req/s ({} connections, {:.0} s), same upstream, spoken to in the same protocol \
         (upstream: cogmesh's / the peer's where they differ); absolute µs, median of the rounds; \
         control: cogmesh against a second cogmesh, the method's own spread; sign test: \
         whether cogmesh's p99 was lower (or higher) in more rounds than chance gives two equal \
         proxies, two-sided, at 5 %\n{}",
        setup.rate,
        setup.latency_connections,
        setup.latency_secs,
        table.render()
    )
}

/// Table 6: the throughput duels, each peer's round means against cogmesh's.
fn throughput_in_turn(setup: &Setup, rate_duels: &[RateDuel]) -> String {
    if rate_duels.is_empty() {
        return String::new();
    }
    let mut table = Table::new(&[
        "N",
        "peer",
        "protocol",
        "cogmesh req/s",
        "peer req/s",
        "cogmesh÷peer",
        "rounds cogmesh more",
        "sign test",
        "failed",
    ]);
    for &workers in &setup.workers {
        for proto in [Proto::H1, Proto::H2c] {
            for &peer in setup
                .kinds
                .iter()
                .filter(|k| !matches!(k, Kind::Direct | Kind::Cogmesh))
            {
                let failed = rate_duels
                    .iter()
                    .filter(|d| (d.workers, d.proto, d.peer) == (workers, proto, peer) && d.error.is_some())
                    .count();
                let pairs: Vec<(f64, f64)> = pairs_of(rate_duels, workers, proto, peer)
                    .into_iter()
                    .map(|(_, pair)| pair)
                    .collect();
                if pairs.is_empty() && failed == 0 {
                    continue;
                }
                let (more, sign) = rounds_ahead(&pairs, Better::AtLeast);
                let (mine, theirs): (Vec<f64>, Vec<f64>) = pairs.iter().copied().unzip();
                let (mine, theirs) = (median(mine), median(theirs));
                table.row(vec![
                    workers.to_string(),
                    peer.name().to_string(),
                    proto.label().to_string(),
                    opt(mine, 0),
                    opt(theirs, 0),
                    ratio(mine, theirs),
                    format!("{more}/{}", pairs.len()),
                    sign,
                    failed.to_string(),
                ]);
            }
        }
    }
    format!(
        "\n6. Throughput in turn — cogmesh and one peer both running, the same closed loop ({} \
         connections, {:.0} s a run) sent to each in turn, cogmesh, peer, peer, cogmesh (peer first \
         in odd rounds); req/s: median over the rounds of each side's mean; sign test: whether \
         cogmesh served more in more rounds than chance gives two equal proxies, two-sided, at 5 %\n{}",
        setup.connections,
        setup.throughput_secs,
        table.render()
    )
}

/// The chance that two equal proxies split the rounds at least as unevenly as `lower` to
/// `higher` (rounds with equal p99s left out): the two-sided exact sign test.
fn sign_test(lower: usize, higher: usize) -> f64 {
    let n = lower + higher;
    let fewer = lower.min(higher);
    // P(X <= fewer) for X ~ Binomial(n, 1/2), summed term by term: C(n, i+1) = C(n, i)(n-i)/(i+1).
    let (mut term, mut tail) = (0.5f64.powi(n as i32), 0.0);
    for i in 0..=fewer {
        tail += term;
        term *= (n - i) as f64 / (i + 1) as f64;
    }
    (2.0 * tail).min(1.0)
}

/// Of (cogmesh's, the peer's) pairs, the rounds in which cogmesh was ahead (lower, or more), and
/// the sign test's verdict on ahead against behind (equal rounds left out).
fn rounds_ahead(pairs: &[(f64, f64)], better: Better) -> (usize, String) {
    let count = |cmp: fn(&f64, &f64) -> bool| pairs.iter().filter(|(mine, theirs)| cmp(mine, theirs)).count();
    let (below, above) = (count(f64::lt), count(f64::gt));
    match better {
        Better::Lower => (below, sign_test_verdict(below, above, ["lower", "higher"])),
        Better::AtLeast => (above, sign_test_verdict(above, below, ["more", "fewer"])),
    }
}

/// `words[0]` (cogmesh ahead in `wins` rounds) or `words[1]` (behind in `losses`) when the sign
/// test rejects equal proxies at 5 %, else "tie"; with p.
fn sign_test_verdict(wins: usize, losses: usize, words: [&str; 2]) -> String {
    let p = sign_test(wins, losses);
    let word = match (p < 0.05, wins > losses) {
        (false, _) => "tie",
        (true, true) => words[0],
        (true, false) => words[1],
    };
    if p < 0.001 {
        format!("{word}, p < 0.001")
    } else {
        format!("{word}, p {p:.3}")
    }
}

/// The peer with the best median (first in `order`), and that median.
fn best_peer(
    peers: &[Kind],
    value: impl Fn(Kind) -> Option<f64>,
    order: impl Fn(&f64, &f64) -> std::cmp::Ordering,
) -> Option<(Kind, f64)> {
    peers
        .iter()
        .filter_map(|&k| value(k).map(|v| (k, v)))
        .min_by(|a, b| order(&a.1, &b.1))
}

fn verdict(cogmesh: Option<f64>, bar: Option<f64>, holds: impl Fn(f64, f64) -> bool) -> String {
    match (cogmesh, bar) {
        (Some(c), Some(b)) if holds(c, b) => "met".into(),
        (Some(_), Some(_)) => "missed".into(),
        _ => "-".into(),
    }
}

fn opt(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "-".to_string(), |v| format!("{v:.decimals$}"))
}

fn signed(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_string(), |v| format!("{v:+.0}"))
}

/// cogmesh ÷ peer for a peer's row (blank on cogmesh's own row).
fn vs_cogmesh(kind: Kind, cogmesh: Option<f64>, peer: Option<f64>) -> String {
    if kind == Kind::Cogmesh {
        String::new()
    } else {
        ratio(cogmesh, peer)
    }
}

/// cogmesh ÷ peer, when both are there and positive.
fn ratio(cogmesh: Option<f64>, peer: Option<f64>) -> String {
    match (cogmesh, peer) {
        (Some(c), Some(p)) if c > 0.0 && p > 0.0 => format!("{:.2}", c / p),
        _ => "-".to_string(),
    }
}

fn spread(values: &[f64]) -> String {
    if values.len() < 2 {
        return "-".to_string();
    }
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{lo:.0}–{hi:.0}")
}

/// Tables 1–3, from the runs of one proxy at a time.
fn solo_tables(setup: &Setup, view: &View<'_>) -> String {
    let mut out = String::new();
    let rounds = format!(
        "median of {} round{}",
        setup.rounds,
        if setup.rounds == 1 { "" } else { "s" }
    );
    let failed_note = |workers, kind, proto| {
        let failed = view.failures(workers, kind, proto);
        if failed > 0 {
            format!(" ({failed} failed)")
        } else {
            String::new()
        }
    };

    for proto in [Proto::H1, Proto::H2c] {
        let _ = writeln!(
            out,
            "\n1. Latency added over direct, {} — open loop {} req/s, oha --latency-correction, {} \
             connections, {:.0} s; µs, proxied − direct of the same round, {rounds}; \
             direct row: absolute µs",
            proto.label(),
            setup.rate,
            setup.latency_connections,
            setup.latency_secs
        );
        let mut table = Table::new(&[
            "N",
            "proxy",
            "p50",
            "p99",
            "p99.9",
            "p99 ×direct",
            "cogmesh÷peer p50/p99/p99.9",
            "failed req",
        ]);
        for &workers in &setup.workers {
            for &kind in &setup.kinds {
                let lat =
                    |f: fn(&Latency) -> f64| view.median(workers, kind, proto, |s| s.latency.as_ref().map(f));
                let failed: u64 = view
                    .of(workers, kind, proto)
                    .filter_map(|s| s.latency.as_ref().map(|l| l.failed))
                    .sum();
                let name = format!("{}{}", kind.name(), failed_note(workers, kind, proto));
                if kind == Kind::Direct {
                    table.row(vec![
                        workers.to_string(),
                        name,
                        opt(lat(|l| l.p50_us), 0),
                        opt(lat(|l| l.p99_us), 0),
                        opt(lat(|l| l.p999_us), 0),
                        "1.00".into(),
                        String::new(),
                        failed.to_string(),
                    ]);
                    continue;
                }
                let added = |k: Kind, f: fn(&Latency) -> f64| view.added(workers, k, proto, f);
                let ratios = [
                    |l: &Latency| l.p50_us,
                    |l: &Latency| l.p99_us,
                    |l: &Latency| l.p999_us,
                ]
                .map(|f| ratio(added(Kind::Cogmesh, f), added(kind, f)))
                .join("/");
                let ratios = if kind == Kind::Cogmesh {
                    String::new()
                } else {
                    ratios
                };
                let direct_p99 = view.median(workers, Kind::Direct, proto, |s| {
                    s.latency.as_ref().map(|l| l.p99_us)
                });
                table.row(vec![
                    workers.to_string(),
                    name,
                    signed(added(kind, |l| l.p50_us)),
                    signed(added(kind, |l| l.p99_us)),
                    signed(added(kind, |l| l.p999_us)),
                    ratio(lat(|l| l.p99_us), direct_p99),
                    ratios,
                    failed.to_string(),
                ]);
            }
        }
        out.push_str(&table.render());
    }

    for &proto in setup.throughput_protos() {
        let tool = match proto {
            Proto::H1 => format!("wrk -t {}", setup.threads),
            Proto::H2c => format!("h2load -t {} -m 1", setup.threads),
        };
        let _ = writeln!(
            out,
            "\n2. Maximum throughput, {} — closed loop, {tool} -c {}, {:.0} s; req/s, {rounds}; \
             rounds cogmesh more: rounds in which cogmesh served more than the peer in that round; \
             sign test: whether in more rounds than chance gives two equal proxies, two-sided, at 5 %",
            proto.label(),
            setup.connections,
            setup.throughput_secs
        );
        let mut table = Table::new(&[
            "N",
            "proxy",
            "req/s",
            "×direct",
            "cogmesh÷peer",
            "rounds cogmesh more",
            "sign test",
            "min–max",
            "errors",
        ]);
        let rps_of = |s: &Sample| s.throughput.as_ref().map(|t| t.rps);
        for &workers in &setup.workers {
            let rps = |kind| view.median(workers, kind, proto, rps_of);
            for &kind in &setup.kinds {
                let errors: u64 = view
                    .of(workers, kind, proto)
                    .filter_map(|s| s.throughput.as_ref().map(|t| t.errors))
                    .sum();
                let (vs, more, sign) = if matches!(kind, Kind::Direct | Kind::Cogmesh) {
                    Default::default()
                } else {
                    let pairs = view.pairs(workers, kind, proto, rps_of);
                    let (more, sign) = rounds_ahead(&pairs, Better::AtLeast);
                    (
                        ratio(rps(Kind::Cogmesh), rps(kind)),
                        format!("{more}/{}", pairs.len()),
                        sign,
                    )
                };
                table.row(vec![
                    workers.to_string(),
                    format!("{}{}", kind.name(), failed_note(workers, kind, proto)),
                    opt(rps(kind), 0),
                    ratio(rps(kind), rps(Kind::Direct)),
                    vs,
                    more,
                    sign,
                    spread(&view.values(workers, kind, proto, rps_of)),
                    errors.to_string(),
                ]);
            }
        }
        out.push_str(&table.render());
    }

    let _ = writeln!(
        out,
        "\n3. CPU seconds per 1000 requests (utime+stime of all the proxy's processes) and RSS \
         (MiB, summed over processes; peak = VmHWM after the load runs), {rounds}"
    );
    let mut header = vec!["N", "proxy", "CPU@max h1", "cogmesh÷peer"];
    if setup.h2c_throughput {
        header.push("CPU@max h2c");
    }
    header.extend([
        "CPU@rate h1",
        "CPU@rate h2c",
        "RSS idle",
        "RSS peak h1",
        "cogmesh÷peer",
        "RSS peak h2c",
    ]);
    let mut table = Table::new(&header);
    for &workers in &setup.workers {
        for &kind in setup.kinds.iter().filter(|k| **k != Kind::Direct) {
            let cpu_max = |kind, proto| view.median(workers, kind, proto, |s| s.cpu_s_per_1k_at_max);
            let cpu_rate = |proto| view.median(workers, kind, proto, |s| s.cpu_s_per_1k_at_rate);
            let mem = |kind, proto, f: fn(&Sample) -> Option<u64>| {
                view.median(workers, kind, proto, |s| f(s).map(|kib| kib as f64 / 1024.0))
            };
            let peak = |kind| mem(kind, Proto::H1, |s| s.rss_peak_kib);
            let mut row = vec![
                workers.to_string(),
                kind.name().to_string(),
                opt(cpu_max(kind, Proto::H1), 4),
                vs_cogmesh(kind, cpu_max(Kind::Cogmesh, Proto::H1), cpu_max(kind, Proto::H1)),
            ];
            if setup.h2c_throughput {
                row.push(opt(cpu_max(kind, Proto::H2c), 4));
            }
            row.extend([
                opt(cpu_rate(Proto::H1), 4),
                opt(cpu_rate(Proto::H2c), 4),
                opt(mem(kind, Proto::H1, |s| s.rss_idle_kib), 1),
                opt(peak(kind), 1),
                vs_cogmesh(kind, peak(Kind::Cogmesh), peak(kind)),
                opt(mem(kind, Proto::H2c, |s| s.rss_peak_kib), 1),
            ]);
            table.row(row);
        }
    }
    out.push_str(&table.render());
    out
}

pub fn render(setup: &Setup, samples: &[Sample], duels: &[Duel], rate_duels: &[RateDuel]) -> String {
    let view = View { samples };
    let mut out = String::new();
    if setup.solo {
        out.push_str(&solo_tables(setup, &view));
    }
    out.push_str(&targets(setup, &view, duels, rate_duels));
    out.push_str(&head_to_head(setup, duels));
    out.push_str(&throughput_in_turn(setup, rate_duels));
    let disturbed: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.foreign_cpu_cores.is_some_and(|f| f > DISTURBED_CORES))
        .collect();
    if !disturbed.is_empty() {
        let _ = writeln!(
            out,
            "\nwarning: {} of {} cases ran while other processes on the machine used more than \
             {DISTURBED_CORES:.2} cores (worst {:.2}); their latency tails and throughput are \
             suspect (cores used by others in each):",
            disturbed.len(),
            samples.len(),
            disturbed
                .iter()
                .filter_map(|s| s.foreign_cpu_cores)
                .fold(0.0, f64::max)
        );
        // One line per round and N: "round 2 N=1: envoy h2c 1.70, nginx HTTP/1.1 0.31".
        let mut groups: Vec<((usize, usize), Vec<String>)> = Vec::new();
        for sample in disturbed {
            let key = (sample.round, sample.workers);
            let item = format!(
                "{} {} {:.2}",
                sample.kind.name(),
                sample.proto.label(),
                sample.foreign_cpu_cores.unwrap_or(0.0)
            );
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, items)) => items.push(item),
                None => groups.push((key, vec![item])),
            }
        }
        for ((round, workers), items) in groups {
            let _ = writeln!(out, "  round {} N={workers}: {}", round + 1, items.join(", "));
        }
    }
    out.push_str(
        "\nN = worker threads/processes of each proxy. cogmesh÷peer: below 1 means cogmesh adds \
         less latency / uses less CPU or memory; above 1 in the throughput table means cogmesh \
         serves more. CPU@max is measured during the closed-loop run, CPU@rate during the \
         open-loop run (it includes the proxy's idle work, and /proc counts in 10 ms ticks).\n",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(vec![f64::NAN, 5.0]), Some(5.0));
    }

    fn sample(round: usize, kind: Kind, p50: f64, rps: f64, cpu: f64) -> Sample {
        let mut s = Sample::new(round, 1, kind, Proto::H1);
        s.latency = Some(Latency {
            p50_us: p50,
            p99_us: p50 * 2.0,
            p999_us: p50 * 4.0,
            rps: 1000.0,
            ok: 5000,
            ..Latency::default()
        });
        s.throughput = Some(Throughput {
            requests: (rps * 5.0) as u64,
            secs: 5.0,
            rps,
            errors: 0,
        });
        if kind != Kind::Direct {
            s.cpu_s_per_1k_at_max = Some(cpu);
            s.rss_idle_kib = Some(4096);
            s.rss_peak_kib = Some(8192);
        }
        s
    }

    /// Two rounds at N = 1 of direct, cogmesh and `peer`, with the default loads.
    fn two_rounds_of(peer: Kind) -> Setup {
        Setup {
            rounds: 2,
            workers: vec![1],
            kinds: vec![Kind::Direct, Kind::Cogmesh, peer],
            rate: 1000,
            latency_secs: 5.0,
            latency_connections: 16,
            throughput_secs: 5.0,
            connections: 64,
            threads: 2,
            h2c_throughput: false,
            solo: true,
        }
    }

    #[test]
    fn added_latency_pairs_rounds_and_ratios_compare_to_cogmesh() {
        let samples = vec![
            sample(0, Kind::Direct, 50.0, 80_000.0, 0.0),
            sample(0, Kind::Cogmesh, 70.0, 40_000.0, 0.020),
            sample(0, Kind::Envoy, 130.0, 20_000.0, 0.040),
            sample(1, Kind::Direct, 60.0, 80_000.0, 0.0),
            sample(1, Kind::Cogmesh, 80.0, 44_000.0, 0.020),
            sample(1, Kind::Envoy, 140.0, 22_000.0, 0.040),
        ];
        let mut samples = samples;
        samples[2].foreign_cpu_cores = Some(1.5);
        samples[4].foreign_cpu_cores = Some(0.1);
        let view = View { samples: &samples };
        assert_eq!(view.added(1, Kind::Cogmesh, Proto::H1, |l| l.p50_us), Some(20.0));
        assert_eq!(view.added(1, Kind::Envoy, Proto::H1, |l| l.p50_us), Some(80.0));
        let setup = two_rounds_of(Kind::Envoy);
        let text = render(&setup, &samples, &[], &[]);
        // cogmesh adds 20 µs at p50, envoy 80: ratio 0.25; throughput 42k vs 21k: ratio 2.00.
        assert!(text.contains("0.25/"), "{text}");
        assert!(text.contains("2.00"), "{text}");
        assert!(text.contains("40000–44000"), "{text}");
        // CPU: 0.020 vs 0.040 s per 1000 requests.
        assert!(text.contains("0.0200"), "{text}");
        assert!(text.contains("0.50"), "{text}");
        // Only the case above the threshold is listed as disturbed.
        assert!(text.contains("1 of 6 cases"), "{text}");
        assert!(text.contains("  round 1 N=1: envoy HTTP/1.1 1.50\n"), "{text}");
    }

    #[test]
    fn throughput_pairs_each_round_of_a_peer_with_cogmesh_s_and_weighs_them_by_sign_test() {
        // Seven rounds: cogmesh 50k each time; HAProxy 45k in six and 55k in one; nginx 40k in
        // all seven, but its run of round 6 failed, which counts nowhere.
        let mut samples = Vec::new();
        for round in 0..7 {
            samples.push(sample(round, Kind::Direct, 50.0, 90_000.0, 0.0));
            samples.push(sample(round, Kind::Cogmesh, 70.0, 50_000.0, 0.02));
            let haproxy = if round == 2 { 55_000.0 } else { 45_000.0 };
            samples.push(sample(round, Kind::Haproxy, 70.0, haproxy, 0.02));
            let mut nginx = sample(round, Kind::Nginx, 70.0, 40_000.0, 0.02);
            if round == 6 {
                nginx.error = Some("wrk exited".into());
            }
            samples.push(nginx);
        }
        let mut setup = two_rounds_of(Kind::Nginx);
        setup.kinds.insert(2, Kind::Haproxy);
        setup.rounds = 7;
        let text = render(&setup, &samples, &[], &[]);
        let row = |needle: &str| cells(&text, "2. ", needle)[2..].to_vec();
        // 6 of 7: p = 2 × 8/128, a tie at 5 %; 6 of 6: p = 2/64.
        assert_eq!(
            row("haproxy  "),
            ["45000", "0.50", "1.11", "6/7", "tie, p 0.125", "45000–55000", "0"]
        );
        assert_eq!(
            row("nginx (1 failed)"),
            [
                "40000",
                "0.44",
                "1.25",
                "6/6",
                "more, p 0.031",
                "40000–40000",
                "0"
            ]
        );
        // cogmesh and direct are not compared with themselves.
        assert_eq!(row("cogmesh  "), ["50000", "0.56", "50000–50000", "0"]);
    }

    #[test]
    fn targets_give_the_verdict_on_medians_and_count_the_rounds_each_held() {
        // cogmesh: p99 140 then 180 µs (added 40, 80: median 60); nginx 160 both (added 60).
        // Throughput: cogmesh 40k then 44k (median 42k); nginx 42k both.
        let samples = vec![
            sample(0, Kind::Direct, 50.0, 80_000.0, 0.0),
            sample(0, Kind::Cogmesh, 70.0, 40_000.0, 0.020),
            sample(0, Kind::Nginx, 80.0, 42_000.0, 0.020),
            sample(1, Kind::Direct, 50.0, 80_000.0, 0.0),
            sample(1, Kind::Cogmesh, 90.0, 44_000.0, 0.020),
            sample(1, Kind::Nginx, 80.0, 42_000.0, 0.020),
        ];
        let setup = two_rounds_of(Kind::Nginx);
        let text = render(&setup, &samples, &[], &[]);
        let line = |target: &str| cells(&text, "", target);
        // A tie is not "below": missed on the medians, held in the first round only.
        assert_eq!(
            line("added p99 HTTP/1.1"),
            [
                "1",
                "added p99 HTTP/1.1 below every peer's",
                "+60",
                "nginx +60",
                "missed",
                "1/2"
            ]
        );
        // No h2c samples: no verdict, no rounds.
        assert_eq!(line("added p99 h2c")[4..], ["-", "0/0"]);
        // A tie is "at least": met on the medians, held in the second round only.
        assert_eq!(
            line("throughput HTTP/1.1"),
            [
                "1",
                "throughput HTTP/1.1 at least the best peer's",
                "42000",
                "nginx 42000",
                "met",
                "1/2"
            ]
        );
        assert_eq!(line("idle RSS")[2..], ["4.0", "met", "2/2"]);
    }

    /// The cells of the first line of `text` that contains `needle`, from the line starting with
    /// `from` on.
    fn cells(text: &str, from: &str, needle: &str) -> Vec<String> {
        let line = text
            .lines()
            .skip_while(|l| !l.starts_with(from))
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line for {needle:?} in {text}"));
        line.split("  ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(String::from)
            .collect()
    }

    fn duel(round: usize, peer: Kind, cogmesh_p99: f64, peer_p99: f64) -> Duel {
        let latency = |p99_us: f64| Latency {
            p50_us: p99_us / 2.0,
            p99_us,
            p999_us: p99_us * 2.0,
            rps: 1000.0,
            ok: 5000,
            ..Latency::default()
        };
        let mut d = Duel::new(round, 1, Proto::H1, peer);
        d.cogmesh = Some(latency(cogmesh_p99));
        d.other = Some(latency(peer_p99));
        d
    }

    #[test]
    fn head_to_head_compares_each_duel_and_names_the_closest_peer() {
        let mut setup = two_rounds_of(Kind::Nginx);
        setup.kinds.push(Kind::Haproxy);
        setup.kinds.sort();
        // nginx: cogmesh lower in round 1 (400 < 500), higher in round 2 (600 > 450).
        // HAProxy: cogmesh lower in round 1; its run of round 2 failed, which counts nowhere, so
        // round 2 has no verdict.
        let mut failed = duel(1, Kind::Haproxy, 1.0, 9999.0);
        failed.error = Some("oha exited".into());
        let duels = vec![
            duel(0, Kind::Nginx, 400.0, 500.0),
            duel(0, Kind::Haproxy, 300.0, 900.0),
            duel(1, Kind::Nginx, 600.0, 450.0),
            failed,
            duel(0, Kind::Cogmesh, 500.0, 520.0),
            duel(1, Kind::Cogmesh, 510.0, 490.0),
        ];
        let text = render(&setup, &[], &duels, &[]);
        let cells = |needle: &str| cells(&text, "4. ", needle);
        // nginx: medians 500 vs 475 (ratio 1.05): the closest peer, and the target is missed.
        assert_eq!(
            cells("head to head"),
            [
                "1",
                "p99 HTTP/1.1 below every peer's, head to head",
                "500",
                "nginx 475",
                "missed",
                "1/1"
            ]
        );
        assert_eq!(
            cells("nginx  ")[2..],
            [
                "HTTP/1.1",
                "HTTP/1.1",
                "250/500/1000",
                "238/475/950",
                "1.05",
                "1/2",
                "tie, p 1.000"
            ]
        );
        assert_eq!(
            cells("haproxy  ")[2..],
            [
                "HTTP/1.1",
                "HTTP/1.1",
                "150/300/600",
                "450/900/1800",
                "0.33",
                "1/1",
                "tie, p 1.000"
            ]
        );
        // The control is a row of table 5, not a peer of the target.
        assert_eq!(
            cells("cogmesh (control)")[2..],
            [
                "HTTP/1.1",
                "HTTP/1.1",
                "252/505/1010",
                "252/505/1010",
                "1.00",
                "1/2",
                "tie, p 1.000"
            ]
        );
    }

    #[test]
    fn head_to_head_target_needs_every_peer_below() {
        let setup = two_rounds_of(Kind::Nginx);
        let duels = vec![
            duel(0, Kind::Nginx, 400.0, 500.0),
            duel(1, Kind::Nginx, 420.0, 450.0),
        ];
        let text = render(&setup, &[], &duels, &[]);
        let line = text.lines().find(|l| l.contains("head to head")).unwrap();
        assert!(line.contains("met") && line.ends_with("2/2"), "{text}");
        // Without duels there is neither the table nor the row.
        assert!(!render(&setup, &[], &[], &[]).contains("head to head"));
    }

    #[test]
    fn sign_test_is_the_exact_two_sided_binomial() {
        // No rounds, or an even split: nothing against equal proxies.
        assert_eq!(sign_test(0, 0), 1.0);
        assert_eq!(sign_test(3, 3), 1.0);
        // 4 of 4: 2 × 1/16.
        assert!((sign_test(4, 0) - 0.125).abs() < 1e-12);
        // 13 of 16: 2 × (1 + 16 + 120 + 560) / 65536; symmetric in its arguments.
        let p = 2.0 * 697.0 / 65536.0;
        assert!((sign_test(13, 3) - p).abs() < 1e-12);
        assert!((sign_test(3, 13) - p).abs() < 1e-12);
        let words = ["lower", "higher"];
        assert_eq!(sign_test_verdict(13, 3, words), "lower, p 0.021");
        assert_eq!(sign_test_verdict(3, 13, words), "higher, p 0.021");
        assert_eq!(sign_test_verdict(11, 5, words), "tie, p 0.210");
        assert_eq!(sign_test_verdict(12, 0, words), "lower, p < 0.001");
        assert_eq!(sign_test_verdict(0, 12, ["more", "fewer"]), "fewer, p < 0.001");
    }

    #[test]
    fn head_to_head_only_shows_the_duels_and_their_targets() {
        let mut setup = two_rounds_of(Kind::Nginx);
        setup.solo = false;
        setup.rounds = 6;
        // cogmesh lower in all 6 rounds: p = 2/64, "lower". Here (made up) cogmesh spoke h2c to
        // the upstream and nginx HTTP/1.1: the upstream column says so.
        let duels: Vec<Duel> = (0..6)
            .map(|r| Duel {
                upstream: [Proto::H2c, Proto::H1],
                ..duel(r, Kind::Nginx, 400.0, 500.0)
            })
            .collect();
        let text = render(&setup, &[], &duels, &[]);
        for absent in [
            "1. Latency added",
            "2. Maximum throughput",
            "3. CPU seconds",
            "added p99",
            "idle RSS",
        ] {
            assert!(!text.contains(absent), "{absent:?} in:\n{text}");
        }
        assert_eq!(
            cells(&text, "4. ", "head to head"),
            [
                "1",
                "p99 HTTP/1.1 below every peer's, head to head",
                "400",
                "nginx 500",
                "met",
                "6/6"
            ]
        );
        assert_eq!(cells(&text, "5. ", "nginx  ")[3], "h2c / HTTP/1.1");
        assert_eq!(cells(&text, "5. ", "nginx  ")[7..], ["6/6", "lower, p 0.031"]);
    }

    fn rate_duel(round: usize, peer: Kind, proto: Proto, cogmesh: [f64; 2], other: [f64; 2]) -> RateDuel {
        RateDuel {
            cogmesh: cogmesh.to_vec(),
            other: other.to_vec(),
            ..RateDuel::new(round, 1, proto, peer)
        }
    }

    #[test]
    fn throughput_in_turn_compares_each_side_s_mean_round_by_round() {
        let mut setup = two_rounds_of(Kind::Nginx);
        setup.kinds.insert(2, Kind::Haproxy);
        setup.solo = false;
        setup.rounds = 6;
        let mut rate_duels = Vec::new();
        for round in 0..6 {
            // HAProxy: cogmesh's mean 41k against 40k in every round (its runs 40k and 42k: the
            // mean, not either run, decides). nginx: cogmesh ahead in 4, behind in 2.
            rate_duels.push(rate_duel(
                round,
                Kind::Haproxy,
                Proto::H1,
                [40e3, 42e3],
                [39e3, 41e3],
            ));
            let nginx = if round < 4 { 38e3 } else { 44e3 };
            rate_duels.push(rate_duel(
                round,
                Kind::Nginx,
                Proto::H1,
                [41e3, 41e3],
                [nginx, nginx],
            ));
        }
        // A failed duel counts nowhere but in its column.
        let mut failed = rate_duel(6, Kind::Nginx, Proto::H1, [1.0, 1.0], [9e9, 9e9]);
        failed.error = Some("nginx: 3 errors in 100 requests".into());
        rate_duels.push(failed);
        let text = render(&setup, &[], &[], &rate_duels);
        let row = |needle: &str| cells(&text, "6. ", needle)[2..].to_vec();
        assert_eq!(
            row("haproxy  "),
            ["HTTP/1.1", "41000", "40000", "1.02", "6/6", "more, p 0.031", "0"]
        );
        assert_eq!(
            row("nginx  "),
            ["HTTP/1.1", "41000", "38000", "1.08", "4/6", "tie, p 0.688", "1"]
        );
        // The target: at least every peer's on the medians; the closest peer is HAProxy (1.02);
        // a round holds when cogmesh served more than both: rounds 1–4.
        assert_eq!(
            cells(&text, "4. ", "in turn"),
            [
                "1",
                "throughput HTTP/1.1 at least every peer's, in turn",
                "41000",
                "haproxy 40000",
                "met",
                "4/6"
            ]
        );
        // No h2c duels: no h2c rows.
        assert!(!text.contains("throughput h2c"), "{text}");
        assert!(text
            .lines()
            .skip_while(|l| !l.starts_with("6. "))
            .all(|l| !l.contains("h2c  ")));
    }

    #[test]
    fn throughput_in_turn_misses_when_a_peer_served_more() {
        let setup = two_rounds_of(Kind::Haproxy);
        let rate_duels = vec![
            rate_duel(0, Kind::Haproxy, Proto::H2c, [30e3, 30e3], [33e3, 33e3]),
            rate_duel(1, Kind::Haproxy, Proto::H2c, [30e3, 30e3], [29e3, 29e3]),
        ];
        let text = render(&setup, &[], &[], &rate_duels);
        assert_eq!(
            cells(&text, "4. ", "in turn")[2..],
            ["30000", "haproxy 31000", "missed", "1/2"]
        );
        // Without throughput duels there is neither the table nor the row.
        let text = render(&setup, &[], &[], &[]);
        assert!(!text.contains("in turn"), "{text}");
    }

    #[test]
    fn ratio_needs_two_positive_values() {
        assert_eq!(ratio(Some(1.0), Some(4.0)), "0.25");
        assert_eq!(ratio(Some(1.0), Some(-4.0)), "-");
        assert_eq!(ratio(None, Some(4.0)), "-");
    }

    #[test]
    fn table_aligns_columns() {
        let mut table = Table::new(&["N", "proxy", "req/s"]);
        table.row(vec!["1".into(), "cogmesh".into(), "42000".into()]);
        table.row(vec!["2".into(), "nginx".into(), "7".into()]);
        let text = table.render();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[1].len(), lines[2].len());
        assert!(lines[2].ends_with("    7"));
    }
}
