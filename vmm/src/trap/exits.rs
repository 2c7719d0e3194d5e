//! Every VM exit gets a kind and, where it has one, a target (port, address, MSR); each is
//! counted per vCPU. `popek run --stats` prints the counts, `--stats-json` writes them, and
//! `--trace-exits FILE` records each exit as a JSON line, up to a limit.

use serde::Serialize;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

/// The kinds of VM exit Popek tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExitKind {
    IoIn,
    IoOut,
    MmioRead,
    MmioWrite,
    Hlt,
    Rdmsr,
    Wrmsr,
    Debug,
    Shutdown,
    FailEntry,
    InternalError,
    SystemEvent,
    /// KVM_RUN returned for a signal or `immediate_exit`.
    Interrupted,
    Other,
}

impl ExitKind {
    pub const ALL: [ExitKind; 14] = [
        ExitKind::IoIn,
        ExitKind::IoOut,
        ExitKind::MmioRead,
        ExitKind::MmioWrite,
        ExitKind::Hlt,
        ExitKind::Rdmsr,
        ExitKind::Wrmsr,
        ExitKind::Debug,
        ExitKind::Shutdown,
        ExitKind::FailEntry,
        ExitKind::InternalError,
        ExitKind::SystemEvent,
        ExitKind::Interrupted,
        ExitKind::Other,
    ];

    /// Short name, as in the table and the JSON.
    pub fn name(self) -> &'static str {
        match self {
            ExitKind::IoIn => "io-in",
            ExitKind::IoOut => "io-out",
            ExitKind::MmioRead => "mmio-read",
            ExitKind::MmioWrite => "mmio-write",
            ExitKind::Hlt => "hlt",
            ExitKind::Rdmsr => "rdmsr",
            ExitKind::Wrmsr => "wrmsr",
            ExitKind::Debug => "debug",
            ExitKind::Shutdown => "shutdown",
            ExitKind::FailEntry => "fail-entry",
            ExitKind::InternalError => "internal-error",
            ExitKind::SystemEvent => "system-event",
            ExitKind::Interrupted => "interrupted",
            ExitKind::Other => "other",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Distinct (kind, target) pairs kept per vCPU; past this, exits are still counted by kind
/// and in an overflow count, so a guest probing random addresses cannot grow the VMM.
pub const MAX_TARGETS: usize = 4096;

/// Counters of one vCPU.
#[derive(Debug, Default)]
struct Counters {
    by_kind: [u64; ExitKind::ALL.len()],
    by_target: BTreeMap<(ExitKind, u64), u64>,
    targets_overflow: u64,
}

/// The bounded exit trace.
struct Trace {
    out: BufWriter<File>,
    written: u64,
    limit: u64,
    truncated: bool,
}

/// Collects exit counts of all vCPUs and the optional trace.
pub struct Recorder {
    vcpus: Vec<Mutex<Counters>>,
    trace: Option<Mutex<Trace>>,
    start: Instant,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Recorder {
    /// Counters for `vcpus` vCPUs; with `trace`, each exit is also written to that file,
    /// at most `limit` lines.
    pub fn new(vcpus: u32, trace: Option<(&Path, u64)>) -> std::io::Result<Arc<Self>> {
        let trace = match trace {
            Some((path, limit)) => {
                let out = BufWriter::new(File::create(path)?);
                Some(Mutex::new(Trace { out, written: 0, limit, truncated: false }))
            }
            None => None,
        };
        Ok(Arc::new(Recorder { vcpus: (0..vcpus).map(|_| Mutex::default()).collect(), trace, start: Instant::now() }))
    }

    /// Counts one exit of vCPU `vcpu`; `size` is the access size where there is one.
    pub fn record(&self, vcpu: u32, kind: ExitKind, target: Option<u64>, size: usize) {
        if let Some(counters) = self.vcpus.get(vcpu as usize) {
            let mut c = lock(counters);
            c.by_kind[kind.index()] += 1;
            if let Some(target) = target {
                let len = c.by_target.len();
                match c.by_target.get_mut(&(kind, target)) {
                    Some(n) => *n += 1,
                    None if len < MAX_TARGETS => {
                        c.by_target.insert((kind, target), 1);
                    }
                    None => c.targets_overflow += 1,
                }
            }
        }
        if let Some(trace) = &self.trace {
            let mut t = lock(trace);
            if t.written < t.limit {
                let ns = self.start.elapsed().as_nanos();
                let target = target.map_or("null".to_string(), |v| v.to_string());
                let line = format!(
                    "{{\"t_ns\":{ns},\"vcpu\":{vcpu},\"kind\":\"{}\",\"target\":{target},\"size\":{size}}}\n",
                    kind.name()
                );
                if t.out.write_all(line.as_bytes()).is_ok() {
                    t.written += 1;
                }
            } else if !t.truncated {
                t.truncated = true;
                let _ = t.out.write_all(b"{\"truncated\":true}\n");
            }
        }
    }

    /// Exits recorded so far, all vCPUs.
    pub fn total(&self) -> u64 {
        self.vcpus.iter().map(|c| lock(c).by_kind.iter().sum::<u64>()).sum()
    }

    /// Flushes the trace file.
    pub fn flush(&self) {
        if let Some(trace) = &self.trace {
            let _ = lock(trace).out.flush();
        }
    }

    /// A snapshot of all counters.
    pub fn report(&self) -> ExitReport {
        let vcpus = self
            .vcpus
            .iter()
            .enumerate()
            .map(|(id, counters)| {
                let c = lock(counters);
                VcpuExits {
                    vcpu: id as u32,
                    total: c.by_kind.iter().sum(),
                    by_kind: ExitKind::ALL
                        .iter()
                        .filter(|k| c.by_kind[k.index()] > 0)
                        .map(|k| (k.name().to_string(), c.by_kind[k.index()]))
                        .collect(),
                    by_target: c
                        .by_target
                        .iter()
                        .map(|(&(kind, target), &count)| TargetCount { kind: kind.name(), target, count })
                        .collect(),
                    targets_overflow: c.targets_overflow,
                }
            })
            .collect();
        let trace_lines = self.trace.as_ref().map(|t| lock(t).written);
        ExitReport { vcpus, trace_lines }
    }
}

/// Exit counts of one vCPU.
#[derive(Debug, Serialize)]
pub struct VcpuExits {
    pub vcpu: u32,
    pub total: u64,
    pub by_kind: BTreeMap<String, u64>,
    pub by_target: Vec<TargetCount>,
    pub targets_overflow: u64,
}

/// Exits of one kind at one port, address or MSR.
#[derive(Debug, Serialize)]
pub struct TargetCount {
    pub kind: &'static str,
    pub target: u64,
    pub count: u64,
}

/// All vCPUs' exit counts.
#[derive(Debug, Serialize)]
pub struct ExitReport {
    pub vcpus: Vec<VcpuExits>,
    pub trace_lines: Option<u64>,
}

impl ExitReport {
    /// The table `--stats` prints: one row per exit kind, one column per vCPU, then the
    /// busiest targets.
    pub fn table(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let _ = write!(out, "{:<16}", "exit kind");
        for v in &self.vcpus {
            let _ = write!(out, "{:>12}", format!("vcpu{}", v.vcpu));
        }
        let _ = writeln!(out, "{:>12}", "total");
        for kind in ExitKind::ALL {
            let counts: Vec<u64> =
                self.vcpus.iter().map(|v| v.by_kind.get(kind.name()).copied().unwrap_or(0)).collect();
            let total: u64 = counts.iter().sum();
            if total == 0 {
                continue;
            }
            let _ = write!(out, "{:<16}", kind.name());
            for c in counts {
                let _ = write!(out, "{c:>12}");
            }
            let _ = writeln!(out, "{total:>12}");
        }
        let mut targets: BTreeMap<(&str, u64), u64> = BTreeMap::new();
        for v in &self.vcpus {
            for t in &v.by_target {
                *targets.entry((t.kind, t.target)).or_insert(0) += t.count;
            }
        }
        let mut busiest: Vec<_> = targets.into_iter().collect();
        busiest.sort_by_key(|entry| std::cmp::Reverse(entry.1));
        let _ = writeln!(out, "\n{:<16}{:>20}{:>12}", "exit kind", "port/address/MSR", "count");
        for ((kind, target), count) in busiest.iter().take(20) {
            let _ = writeln!(out, "{kind:<16}{:>20}{count:>12}", format!("{target:#x}"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_bounds() {
        let dir = std::env::temp_dir().join(format!("popek-trace-{}", std::process::id()));
        let recorder = Recorder::new(2, Some((&dir, 3))).unwrap();
        recorder.record(0, ExitKind::IoOut, Some(0x3f8), 1);
        recorder.record(0, ExitKind::IoOut, Some(0x3f8), 1);
        recorder.record(1, ExitKind::MmioWrite, Some(0xfee0_0300), 4);
        recorder.record(1, ExitKind::Shutdown, None, 0);
        for addr in 0..(MAX_TARGETS as u64 + 10) {
            recorder.record(1, ExitKind::MmioRead, Some(addr), 4);
        }
        recorder.flush();
        let report = recorder.report();
        assert_eq!(report.vcpus[0].by_kind["io-out"], 2);
        assert_eq!(report.vcpus[1].by_kind["shutdown"], 1);
        assert_eq!(report.vcpus[1].by_target.len(), MAX_TARGETS);
        assert_eq!(report.vcpus[1].targets_overflow, 11);
        assert_eq!(report.trace_lines, Some(3));
        let trace = std::fs::read_to_string(&dir).unwrap();
        assert_eq!(trace.lines().count(), 4, "3 exits and the truncation marker");
        assert!(trace.ends_with("{\"truncated\":true}\n"));
        assert!(report.table().contains("io-out"));
        let _ = std::fs::remove_file(dir);
    }
}
