//! Shared pieces of Popek's benchmarks: statistics and locating binaries.

use std::path::PathBuf;

pub mod procs;

/// Summary statistics of a sample, in the sample's unit.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Stats {
    pub n: usize,
    pub median: f64,
    pub p95: f64,
    pub min: f64,
    pub max: f64,
}

impl Stats {
    /// Statistics of `values`; `None` for an empty sample.
    pub fn of(values: &[f64]) -> Option<Stats> {
        if values.is_empty() {
            return None;
        }
        let mut sorted = values.to_vec();
        sorted.sort_by(|a, b| a.total_cmp(b));
        let at = |q: f64| sorted[((sorted.len() - 1) as f64 * q).round() as usize];
        Some(Stats { n: sorted.len(), median: at(0.5), p95: at(0.95), min: sorted[0], max: sorted[sorted.len() - 1] })
    }
}

/// The workspace's release `popek` binary.
pub fn default_popek() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/popek")
}

/// Finds a program on PATH.
pub fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| PathBuf::from(dir).join(program))
        .find(|candidate| candidate.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats() {
        let s = Stats::of(&[5.0, 1.0, 3.0, 2.0, 4.0]).unwrap();
        assert_eq!((s.n, s.median, s.min, s.max), (5, 3.0, 1.0, 5.0));
        assert_eq!(s.p95, 5.0);
        assert!(Stats::of(&[]).is_none());
    }
}
