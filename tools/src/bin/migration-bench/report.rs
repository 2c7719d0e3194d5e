//! What a sweep prints and writes: the Markdown table, JSON, JUnit XML and SVG plots.

use crate::cell::{Breakdown, Cell, Sample, Throughput};
use plotters::prelude::*;
use popek_tools::Stats;
use std::path::Path;

/// A finished cell: its runs, failures and verdict.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Outcome {
    pub cell: Cell,
    pub samples: Vec<Sample>,
    pub failures: Vec<String>,
    /// Why the gate failed this cell (empty: passed).
    pub gate: Vec<String>,
    pub seconds: f64,
}

impl Outcome {
    fn stat(&self, f: impl Fn(&Sample) -> Option<f64>) -> Option<Stats> {
        Stats::of(&self.samples.iter().filter_map(f).filter(|v| v.is_finite()).collect::<Vec<_>>())
    }

    pub fn downtime(&self) -> Option<Stats> {
        self.stat(|s| Some(s.downtime_ms))
    }

    pub fn total(&self) -> Option<Stats> {
        self.stat(|s| Some(s.total_ms))
    }

    /// JSON for one cell: coordinates and statistics.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "vmm": self.cell.vmm, "mode": self.cell.mode, "memory": self.cell.memory,
            "workload": self.cell.workload.to_string(), "link": self.cell.link.to_string(),
            "runs": self.samples.len(), "failures": self.failures, "gate": self.gate,
            "downtime_ms": self.downtime(), "downtime_by_events_ms": self.stat(|s| s.downtime_by_events_ms),
            "guest_blackout_ms": self.stat(|s| s.blackout_ms),
            "total_ms": self.total(), "mb_sent": self.stat(|s| Some(s.bytes / 1e6)),
            "mb_saved_by_compression": self.stat(|s| Some(s.compression_saved / 1e6)),
            "rounds": self.stat(|s| Some(s.rounds)),
            "fault_latency_p50_us": self.stat(|s| s.fault_p50_us), "fault_latency_p99_us": self.stat(|s| s.fault_p99_us),
            "round_pages": self.samples.first().map(|s| s.round_pages.clone()),
            "guest_throughput_pages_per_ms": self.throughput().map(named),
            "downtime_breakdown_ms": self.breakdown().map(named),
        })
    }

    /// Statistics of the guest's throughput before, during and after the move, named as
    /// in the JSON; `None` for cells without it (QEMU's).
    fn throughput(&self) -> Option<Vec<(&'static str, Stats)>> {
        self.parts::<Throughput>(
            |s| s.throughput.as_ref(),
            &[("before", |t| t.before), ("first_pass_after", |t| t.first_pass_after), ("after", |t| t.after)],
        )
    }

    /// Statistics of each part of the downtime, named as in the JSON; `None` for cells
    /// without a breakdown (QEMU's).
    fn breakdown(&self) -> Option<Vec<(&'static str, Stats)>> {
        self.parts::<Breakdown>(
            |s| s.breakdown.as_ref(),
            &[
                ("pause", |b| b.pause),
                ("state", |b| b.state),
                ("final_memory", |b| b.final_memory),
                ("until_running", |b| b.until_running),
                ("destination_restore", |b| b.destination_restore),
            ],
        )
    }

    /// Statistics of each named field of a per-run record (`get`), or `None` when no run
    /// has one.
    fn parts<T>(&self, get: fn(&Sample) -> Option<&T>, fields: &[Field<T>]) -> Option<Vec<(&'static str, Stats)>> {
        fields.iter().map(|&(name, field)| Some((name, self.stat(|s| get(s).map(field))?))).collect()
    }
}

/// A named field of a per-run record.
type Field<T> = (&'static str, fn(&T) -> f64);

/// Named statistics as a JSON object.
fn named(parts: Vec<(&'static str, Stats)>) -> serde_json::Map<String, serde_json::Value> {
    parts.into_iter().map(|(name, stats)| (name.to_string(), serde_json::json!(stats))).collect()
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.digits$}"))
}

/// The Markdown table, one row per cell.
pub fn table(outcomes: &[Outcome]) -> String {
    let mut t = String::from(
        "| vmm | mode | RAM | workload | link | runs | downtime median (ms) | p95 | min | max | guest blackout (ms) | total (ms) | MB sent | rounds | fault p50/p99 (us) |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for o in outcomes {
        let c = &o.cell;
        let d = o.downtime();
        let m = |s: Option<Stats>| s.map(|s| s.median);
        let faults = match (m(o.stat(|s| s.fault_p50_us)), m(o.stat(|s| s.fault_p99_us))) {
            (Some(a), Some(b)) => format!("{a:.0}/{b:.0}"),
            _ => "-".into(),
        };
        let runs = if o.failures.is_empty() {
            o.samples.len().to_string()
        } else {
            format!("{} ({} failed)", o.samples.len(), o.failures.len())
        };
        t += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            c.vmm,
            c.mode,
            c.memory,
            c.workload,
            c.link,
            runs,
            opt(d.map(|s| s.median), 2),
            opt(d.map(|s| s.p95), 2),
            opt(d.map(|s| s.min), 2),
            opt(d.map(|s| s.max), 2),
            opt(m(o.stat(|s| s.blackout_ms)), 2),
            opt(m(o.total()), 1),
            opt(m(o.stat(|s| Some(s.bytes / 1e6))), 1),
            opt(m(o.stat(|s| Some(s.rounds))), 0),
            faults,
        );
    }
    t
}

/// What Popek is held to against QEMU in every cell where both ran: at most this share of
/// QEMU's downtime...
pub const TARGET_DOWNTIME_RATIO: f64 = 0.5;
/// ...and a total time no longer than QEMU's.
pub const TARGET_TOTAL_RATIO: f64 = 1.0;

/// One cell where both VMMs ran: the medians and their ratios (Popek's over QEMU's).
struct Versus<'a> {
    popek: &'a Outcome,
    /// Popek's downtime end to end (until its source read Running), QEMU's.
    downtime: (f64, f64),
    /// Popek's downtime by events (until its destination resumed), the way QEMU's own is
    /// measured.
    by_events: Option<f64>,
    total: (f64, f64),
}

impl Versus<'_> {
    fn downtime_ratio(&self) -> f64 {
        self.downtime.0 / self.downtime.1
    }

    fn by_events_ratio(&self) -> Option<f64> {
        self.by_events.map(|e| e / self.downtime.1)
    }

    fn total_ratio(&self) -> f64 {
        self.total.0 / self.total.1
    }

    /// Whether a downtime ratio meets the target, with the total's.
    fn meets(&self, downtime_ratio: f64) -> bool {
        downtime_ratio <= TARGET_DOWNTIME_RATIO && self.total_ratio() <= TARGET_TOTAL_RATIO
    }

    /// The target met with the end-to-end downtime.
    fn met(&self) -> bool {
        self.meets(self.downtime_ratio())
    }

    /// The target met with the by-events downtime (`None` without it).
    fn met_by_events(&self) -> Option<bool> {
        self.by_events_ratio().map(|r| self.meets(r))
    }

    fn json(&self) -> serde_json::Value {
        let cell = &self.popek.cell;
        serde_json::json!({
            "mode": cell.mode, "memory": cell.memory, "workload": cell.workload.to_string(),
            "link": cell.link.to_string(),
            "downtime_ms": {"popek": self.downtime.0, "qemu": self.downtime.1},
            "popek_downtime_by_events_ms": self.by_events,
            "total_ms": {"popek": self.total.0, "qemu": self.total.1},
            "downtime_ratio": self.downtime_ratio(), "downtime_by_events_ratio": self.by_events_ratio(),
            "total_ratio": self.total_ratio(),
            "meets_target": self.met(), "meets_target_by_events": self.met_by_events(),
        })
    }
}

/// The cells where both VMMs ran, with medians.
fn versus(outcomes: &[Outcome]) -> Vec<Versus<'_>> {
    let mut pairs = Vec::new();
    for p in outcomes.iter().filter(|o| o.cell.vmm == "popek") {
        let Some(q) = outcomes.iter().find(|o| o.cell.is_partner(&p.cell, "qemu")) else { continue };
        let (Some(pd), Some(qd), Some(pt), Some(qt)) = (p.downtime(), q.downtime(), p.total(), q.total()) else {
            continue;
        };
        let by_events = p.stat(|s| s.downtime_by_events_ms).map(|s| s.median);
        pairs.push(Versus { popek: p, downtime: (pd.median, qd.median), by_events, total: (pt.median, qt.median) });
    }
    pairs
}

/// The comparison for the JSON summary: one entry per cell where both ran.
pub fn comparison_json(outcomes: &[Outcome]) -> Vec<serde_json::Value> {
    versus(outcomes).iter().map(Versus::json).collect()
}

/// Popek against QEMU, cell by cell (where both ran): the ratios of the medians, and
/// whether the cell meets the target (`TARGET_DOWNTIME_RATIO`, `TARGET_TOTAL_RATIO`).
/// Popek's downtime twice: end to end (until its source read Running) and by events
/// (until its destination resumed), the way QEMU's own is measured.
pub fn comparison(outcomes: &[Outcome]) -> Option<String> {
    let head =
        "| mode | RAM | workload | link | downtime popek (ms) | downtime qemu (ms) | popek/qemu | popek by events (ms) | by events/qemu | total popek (ms) | total qemu (ms) | popek/qemu | target |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
    let pairs = versus(outcomes);
    let mut rows: Vec<String> = pairs
        .iter()
        .map(|v| {
            let cell = &v.popek.cell;
            let target = match (v.met(), v.met_by_events()) {
                (true, _) => "met",
                (false, Some(true)) => "met by events",
                _ => "missed",
            };
            format!(
                "| {} | {} | {} | {} | {:.2} | {:.2} | {:.2} | {} | {} | {:.1} | {:.1} | {:.2} | {target} |\n",
                cell.mode,
                cell.memory,
                cell.workload,
                cell.link,
                v.downtime.0,
                v.downtime.1,
                v.downtime_ratio(),
                opt(v.by_events, 2),
                opt(v.by_events_ratio(), 2),
                v.total.0,
                v.total.1,
                v.total_ratio()
            )
        })
        .collect();
    if !rows.is_empty() {
        let met = pairs.iter().filter(|v| v.met()).count();
        let by_events = pairs.iter().filter(|v| v.met_by_events() == Some(true)).count();
        rows.push(format!(
            "\nTarget (downtime at most {TARGET_DOWNTIME_RATIO} of QEMU's, total at most {TARGET_TOTAL_RATIO} of it): met in {met} of {} cells end to end, {by_events} by events.\n",
            pairs.len()
        ));
    }
    section(head, &rows)
}

/// The guest's throughput around the move, per Popek cell whose guest stamps pages:
/// medians before the move, in its first pass after (post-copy: while memory still
/// arrives) and over the 100 passes after, and the first pass against before.
pub fn guest_throughput(outcomes: &[Outcome]) -> Option<String> {
    let head = "| vmm | mode | RAM | workload | link | before (pages/ms) | first pass after | 100 passes after | first/before |\n\
         |---|---|---|---|---|---|---|---|---|\n";
    let mut rows = Vec::new();
    for o in outcomes {
        let Some(&[(_, before), (_, first), (_, after)]) = o.throughput().as_deref() else { continue };
        let (before, first, after) = (before.median, first.median, after.median);
        if before <= 0.0 {
            continue; // an idle guest stamps nothing
        }
        let c = &o.cell;
        rows.push(format!(
            "| {} | {} | {} | {} | {} | {before:.0} | {first:.0} | {after:.0} | {:.2} |\n",
            c.vmm,
            c.mode,
            c.memory,
            c.workload,
            c.link,
            first / before
        ));
    }
    section(head, &rows)
}

/// Where each Popek cell's downtime went: the median of each part (with several runs the
/// medians need not add up to the median downtime).
pub fn downtime_parts(outcomes: &[Outcome]) -> Option<String> {
    let head = "| vmm | mode | RAM | workload | link | downtime (ms) | pause | state | last memory | until Running | of which destination |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n";
    let mut rows = Vec::new();
    for o in outcomes {
        let (Some(parts), Some(downtime)) = (o.breakdown(), o.downtime()) else { continue };
        let c = &o.cell;
        let medians: Vec<String> = parts.iter().map(|(_, s)| format!("{:.3}", s.median)).collect();
        rows.push(format!(
            "| {} | {} | {} | {} | {} | {:.3} | {} |\n",
            c.vmm,
            c.mode,
            c.memory,
            c.workload,
            c.link,
            downtime.median,
            medians.join(" | ")
        ));
    }
    section(head, &rows)
}

/// Stop-and-copy throughput of the cells that move every page (`write all`, `read all`)
/// against the loopback probes taken before and after the sweep: the share of the
/// link's one-stream rate the migration reached, counting the memory moved (what
/// compression took out of the bytes on the wire included). `probes`: bytes per second.
pub fn loopback_share(outcomes: &[Outcome], probes: &[f64]) -> Option<String> {
    let (low, high) = probes.iter().fold((f64::MAX, 0f64), |(lo, hi), &p| (lo.min(p), hi.max(p)));
    if probes.is_empty() || low <= 0.0 {
        return None;
    }
    let head =
        "| vmm | RAM | workload | link | MB moved | MB on the wire | total (ms) | GB/s moved | share of the slower probe | of the faster |\n\
         |---|---|---|---|---|---|---|---|---|---|\n";
    let mut rows = Vec::new();
    // The probe measures loopback: cells on other links would compare with the wrong rate.
    let whole = |o: &&Outcome| {
        o.cell.mode == "stop-copy" && o.cell.workload.moves_all_memory() && o.cell.link.to_string() == "loopback"
    };
    for o in outcomes.iter().filter(whole) {
        let moved = o.stat(|s| Some(s.bytes + s.compression_saved));
        let (Some(moved), Some(wire), Some(total)) = (moved, o.stat(|s| Some(s.bytes)), o.total()) else { continue };
        let rate = moved.median / (total.median / 1e3);
        rows.push(format!(
            "| {} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.2} | {:.0}% | {:.0}% |\n",
            o.cell.vmm,
            o.cell.memory,
            o.cell.workload,
            o.cell.link,
            moved.median / 1e6,
            wire.median / 1e6,
            total.median,
            rate / 1e9,
            rate / low * 100.0,
            rate / high * 100.0
        ));
    }
    section(head, &rows)
}

/// Each TLS cell against the same cell in the clear: total time, throughput and downtime.
pub fn tls_cost(outcomes: &[Outcome]) -> Option<String> {
    let head =
        "| mode | RAM | workload | link | total plain (ms) | total TLS (ms) | TLS/plain | MB/s plain | MB/s TLS | downtime plain (ms) | downtime TLS (ms) |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n";
    let mut rows = Vec::new();
    for tls in outcomes.iter().filter(|o| o.cell.vmm == "popek-tls") {
        let Some(plain) = outcomes.iter().find(|o| o.cell.is_partner(&tls.cell, "popek")) else { continue };
        let rate = |o: &Outcome| o.stat(|s| Some(s.bytes / 1e6 / (s.total_ms / 1e3))).map(|s| s.median);
        let (Some(pt), Some(tt), Some(pd), Some(td)) = (plain.total(), tls.total(), plain.downtime(), tls.downtime())
        else {
            continue;
        };
        rows.push(format!(
            "| {} | {} | {} | {} | {:.1} | {:.1} | {:.2} | {} | {} | {:.2} | {:.2} |\n",
            tls.cell.mode,
            tls.cell.memory,
            tls.cell.workload,
            tls.cell.link,
            pt.median,
            tt.median,
            tt.median / pt.median,
            opt(rate(plain), 0),
            opt(rate(tls), 0),
            pd.median,
            td.median
        ));
    }
    section(head, &rows)
}

/// A Markdown table: `head` (its header and separator lines) and `rows`; none without rows.
fn section(head: &str, rows: &[String]) -> Option<String> {
    (!rows.is_empty()).then(|| format!("{head}{}", rows.concat()))
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// JUnit XML: one test case per cell; a cell fails when a run failed or the gate did.
pub fn junit(outcomes: &[Outcome]) -> String {
    let failed = outcomes.iter().filter(|o| !o.failures.is_empty() || !o.gate.is_empty()).count();
    let mut x = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuite name=\"popek-migration-bench\" tests=\"{}\" failures=\"{failed}\">\n",
        outcomes.len()
    );
    for o in outcomes {
        let name = xml_escape(&format!("{} {} {}", o.cell.memory, o.cell.workload, o.cell.link));
        let class = xml_escape(&format!("{}.{}", o.cell.vmm, o.cell.mode));
        x += &format!("  <testcase classname=\"{class}\" name=\"{name}\" time=\"{:.3}\">", o.seconds);
        let problems: Vec<String> = o.failures.iter().chain(&o.gate).cloned().collect();
        if !problems.is_empty() {
            x += &format!("<failure message=\"{}\"/>", xml_escape(&problems.join("; ")));
        }
        x += "</testcase>\n";
    }
    x + "</testsuite>\n"
}

const COLORS: [RGBColor; 8] = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK, RGBColor(255, 140, 0), RGBColor(128, 0, 128)];

/// `downtime.svg`: median downtime per mode, one line per VMM, RAM size, workload and
/// link; `rounds.svg`: pages sent per pre-copy round (first run of each cell with rounds).
pub fn plots(outcomes: &[Outcome], dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let mut modes: Vec<&str> = Vec::new();
    for o in outcomes {
        if !modes.contains(&o.cell.mode.as_str()) {
            modes.push(&o.cell.mode);
        }
    }
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for o in outcomes {
        let key = format!("{} {} {} {}", o.cell.vmm, o.cell.memory, o.cell.workload, o.cell.link);
        let x = modes.iter().position(|m| *m == o.cell.mode).unwrap_or(0) as f64;
        let Some(d) = o.downtime() else { continue };
        match series.iter_mut().find(|(k, _)| *k == key) {
            Some((_, points)) => points.push((x, d.median)),
            None => series.push((key, vec![(x, d.median)])),
        }
    }
    let top = series.iter().flat_map(|(_, p)| p.iter().map(|p| p.1)).fold(1.0f64, f64::max) * 1.1;
    let path = dir.join("downtime.svg");
    let root = SVGBackend::new(&path, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Migration downtime (median, ms) per mode", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5f64..(modes.len() as f64 - 0.5), (0.01f64..top).log_scale())
        .map_err(|e| err(&e))?;
    let labels = modes.clone();
    chart
        .configure_mesh()
        .x_labels(modes.len())
        .x_label_formatter(&move |x| labels.get(x.round() as usize).map_or(String::new(), |m| m.to_string()))
        .y_desc("downtime (ms, log)")
        .draw()
        .map_err(|e| err(&e))?;
    for (i, (key, points)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)).point_size(4))
            .map_err(|e| err(&e))?
            .label(key.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
    }
    chart.configure_series_labels().border_style(BLACK).background_style(WHITE).draw().map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;

    let rounds: Vec<(String, Vec<f64>)> = outcomes
        .iter()
        .filter_map(|o| {
            let r = o.samples.first()?.round_pages.clone();
            (r.len() > 1).then(|| (o.cell.name(), r))
        })
        .collect();
    let path = dir.join("rounds.svg");
    let root = SVGBackend::new(&path, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let longest = rounds.iter().map(|r| r.1.len()).max().unwrap_or(1) as f64;
    let most = rounds.iter().flat_map(|r| r.1.iter().copied()).fold(1.0f64, f64::max) * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption("Pages sent per pre-copy round (first run of each cell)", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..longest, (1f64..most).log_scale())
        .map_err(|e| err(&e))?;
    chart.configure_mesh().x_desc("round").y_desc("pages (log)").draw().map_err(|e| err(&e))?;
    for (i, (key, pages)) in rounds.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let points: Vec<(f64, f64)> = pages.iter().enumerate().map(|(r, p)| (r as f64, p.max(1.0))).collect();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)).point_size(3))
            .map_err(|e| err(&e))?
            .label(key.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
    }
    if !rounds.is_empty() {
        chart.configure_series_labels().border_style(BLACK).background_style(WHITE).draw().map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
