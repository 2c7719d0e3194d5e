//! One cell of the sweep (VMM x mode x guest RAM x workload x link) and one run of it
//! under Popek: a destination and a source `popek` process, the guest's `migrate`
//! workload, `popek migrate`, and the figures both report.

use crate::net::Net;
pub use popek_tools::procs::Proc;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// What the guest does while it moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// Nothing stamped (the guest only reads its clock).
    Idle,
    /// A 64 MiB working set stamped at full speed.
    Dirty,
    /// A 64 MiB working set stamped at `--rate` pages per second.
    Rate,
    /// All memory above 16 MiB stamped once, then only read, pass after pass.
    Read,
    /// All memory above 16 MiB stamped at full speed.
    WriteAll,
}

impl Workload {
    /// Whether a stop-and-copy of this workload moves all of memory (its speed is then
    /// the link's, the figure the loopback probe compares with).
    pub fn moves_all_memory(&self) -> bool {
        matches!(self, Workload::Read | Workload::WriteAll)
    }
}

impl std::fmt::Display for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Workload::Idle => "idle",
            Workload::Dirty => "dirty 64M",
            Workload::Rate => "rate",
            Workload::Read => "read all",
            Workload::WriteAll => "write all",
        })
    }
}

impl Workload {
    /// The guest's command line for it.
    pub fn cmdline(self, rate: u64) -> String {
        let work = match self {
            Workload::Idle => "pages=0".to_string(),
            Workload::Dirty => "pages=16384".to_string(),
            Workload::Rate => format!("pages=16384 rate={rate}"),
            Workload::Read => "pages=all access=read".to_string(),
            Workload::WriteAll => "pages=all".to_string(),
        };
        format!("test=migrate {work} seconds=300")
    }
}

/// One cell's coordinates.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Cell {
    pub vmm: &'static str,
    pub mode: String,
    pub memory: String,
    pub workload: Workload,
    pub link: crate::net::Link,
}

impl Cell {
    pub fn name(&self) -> String {
        format!("{} {} {} {} {}", self.vmm, self.mode, self.memory, self.workload, self.link)
    }

    /// The same coordinates as `other`'s, under `vmm` (a side-by-side partner).
    pub fn is_partner(&self, other: &Cell, vmm: &str) -> bool {
        self.vmm == vmm
            && self.mode == other.mode
            && self.memory == other.memory
            && self.workload == other.workload
            && self.link == other.link
    }
}

/// What one migration measured.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Sample {
    /// Source paused -> destination running, end to end.
    pub downtime_ms: f64,
    /// Source paused -> destination resumed, each stamped on this host's clock: how QEMU
    /// measures its own downtime (its STOP and RESUME events); Popek's `downtime_ms` also
    /// counts its Running message's way back.
    pub downtime_by_events_ms: Option<f64>,
    /// The longest gap in the guest's own progress (Popek's workload only).
    pub blackout_ms: Option<f64>,
    pub total_ms: f64,
    /// Bytes on the wire, and what compression took out of them (Popek).
    pub bytes: f64,
    pub compression_saved: f64,
    /// Pages sent per pre-copy round (Popek).
    pub round_pages: Vec<f64>,
    /// Pre-copy rounds (QEMU: its dirty-bitmap syncs).
    pub rounds: f64,
    /// Post-copy request-to-install latency.
    pub fault_p50_us: Option<f64>,
    pub fault_p99_us: Option<f64>,
    /// Where the downtime went (Popek's report; QEMU has none).
    pub breakdown: Option<Breakdown>,
    /// The guest's own throughput around the move (Popek's workload only).
    pub throughput: Option<Throughput>,
}

/// What Popek's guest workload says of its throughput, in pages stamped (or verified)
/// per ms: `migrate: throughput (pages/ms): before the move B, first pass after it F,
/// 100 passes after it A`. In post-copy the first pass runs while memory still arrives.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Throughput {
    pub before: f64,
    pub first_pass_after: f64,
    pub after: f64,
}

impl Throughput {
    /// From the guest's console output; `None` without the line.
    pub fn of(console: &str) -> Option<Throughput> {
        let line = console.lines().find_map(|l| l.split("migrate: throughput (pages/ms): ").nth(1))?;
        let number = |label: &str| -> Option<f64> {
            line.split(label)
                .nth(1)?
                .split(|c: char| c == ',' || c.is_whitespace())
                .find(|w| !w.is_empty())?
                .parse()
                .ok()
        };
        Some(Throughput {
            before: number("before the move ")?,
            first_pass_after: number("first pass after it ")?,
            after: number("100 passes after it ")?,
        })
    }
}

/// The parts of one Popek downtime, in ms, as its report gives them (see
/// `downtime_breakdown_ms` in docs/migration.md).
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Breakdown {
    /// Pausing the vCPUs, each saving its own state.
    pub pause: f64,
    /// Saving and sending the machine state (post-copy: with the switch).
    pub state: f64,
    /// The last dirty pages and Complete (pre-copy and stop-and-copy).
    pub final_memory: f64,
    /// Until the destination's Running arrived.
    pub until_running: f64,
    /// The destination's own part: the state arrived -> Running sent.
    pub destination_restore: f64,
}

impl Breakdown {
    /// From a `popek migrate` report; `None` when a part is missing.
    fn of(report: &serde_json::Value) -> Option<Breakdown> {
        let part = |name: &str| report["downtime_breakdown_ms"][name].as_f64();
        Some(Breakdown {
            pause: part("pause")?,
            state: part("state")?,
            final_memory: part("final_memory")?,
            until_running: part("until_running")?,
            destination_restore: report["destination_restore_ms"].as_f64()?,
        })
    }
}

/// Runs one Popek migration of `cell`.
pub fn run_popek(
    popek: &Path,
    cell: &Cell,
    net: &Net,
    dir: &Path,
    port: u16,
    (rate, prealloc, tls): (u64, bool, Option<&crate::pki::Pki>),
) -> Result<Sample, String> {
    let api = dir.join("api.sock").display().to_string();
    let to = format!("tcp:{}", net.destination(port));
    let mut dst_args = vec!["run", "--no-stdin", "--insecure", "--incoming", &to];
    if prealloc {
        dst_args.extend(["--prealloc", "--memory", &cell.memory]);
    }
    if let Some(pki) = tls {
        dst_args.extend(pki.destination.iter().map(String::as_str));
    }
    let mut dst = Proc::spawn(&net.prefix(1), popek, &dst_args, dir, "dst")?;
    let cmdline = cell.workload.cmdline(rate);
    let mut src_args = vec!["run", "--no-stdin", "-m", &cell.memory, "--api-socket", &api, "--cmdline", &cmdline];
    if let Some(pki) = tls {
        src_args.extend(pki.source.iter().map(String::as_str));
    }
    let mut src = Proc::spawn(&net.prefix(0), popek, &src_args, dir, "src")?;
    src.wait_for("migrate: ready", Duration::from_secs(60))?;
    dst.wait_for("waiting for a migration", Duration::from_secs(60))?;
    // The workload runs a moment first, so any dirtying is at full speed.
    std::thread::sleep(Duration::from_millis(200));
    let out = Command::new(popek)
        .args(["migrate", "--api-socket", &api, "--to", &to, "--mode", &cell.mode, "--downtime-limit", "1"])
        .output()
        .map_err(|e| e.to_string())?;
    let reply: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("bad reply from popek migrate: {e}"))?;
    let report = reply.get("report").ok_or_else(|| format!("migration failed: {}", reply["error"]))?;
    dst.wait(Duration::from_secs(120)).ok_or("the destination did not finish")?;
    let guest = dst.stdout();
    if !guest.contains("verified: ok") {
        return Err(format!("the guest's self-check failed: {}", guest.lines().last().unwrap_or("")));
    }
    let blackout_us: Option<f64> =
        guest.split("longest pause ").nth(1).and_then(|r| r.split_whitespace().next()).and_then(|v| v.parse().ok());
    let f = |v: &serde_json::Value| v.as_f64();
    let postcopy = &report["postcopy"]["destination"];
    let round_pages: Vec<f64> =
        report["rounds"].as_array().map(|r| r.iter().filter_map(|x| x["pages"].as_f64()).collect()).unwrap_or_default();
    Ok(Sample {
        rounds: round_pages.len() as f64,
        downtime_ms: f(&report["downtime_ms"]).unwrap_or(f64::NAN),
        downtime_by_events_ms: f(&report["downtime_by_events_ms"]),
        blackout_ms: blackout_us.map(|us| us / 1e3),
        total_ms: f(&report["total_ms"]).unwrap_or(f64::NAN),
        bytes: f(&report["memory"]["bytes_on_wire"]).unwrap_or(0.0) + f(&report["state_bytes"]).unwrap_or(0.0),
        compression_saved: f(&report["memory"]["compression_saved"]).unwrap_or(0.0),
        round_pages,
        fault_p50_us: f(&postcopy["fault_latency_p50_us"]),
        fault_p99_us: f(&postcopy["fault_latency_p99_us"]),
        breakdown: Breakdown::of(report),
        throughput: Throughput::of(&guest),
    })
}

#[cfg(test)]
mod tests {
    use super::Throughput;

    #[test]
    fn the_guests_throughput_line_is_read() {
        let console = "migrate: ready\nmigrate: throughput (pages/ms): before the move 812, first pass after it 95, 100 passes after it 790\nmigrate: moved";
        let t = Throughput::of(console).expect("a throughput line");
        assert_eq!((t.before, t.first_pass_after, t.after), (812.0, 95.0, 790.0));
        assert!(Throughput::of("migrate: moved").is_none());
        assert!(Throughput::of("migrate: throughput (pages/ms): before the move x, first pass after it 1").is_none());
    }
}
