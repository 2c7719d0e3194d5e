//! Fault injection matrix for live migration: for every mode x protocol phase x fault,
//! one migration of the bundled guest's memory workload through a frame-aware relay that
//! cuts the link, stalls it, kills a side or refuses at that phase; then where the VM
//! runs, whether it survived and whether its memory self-check passed. Prints a Markdown
//! table and a `FAULT_JSON` line with the totals; exits 1 if a VM was lost, a check
//! failed, a fault was never injected or a process hung. See docs/security.md.

mod cell;
mod inject;
mod plan;
mod relay;
mod report;

use clap::Parser;
use plan::{Fault, Mode, Phase};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(about = "Cut, delay, kill and refuse at every migration phase; check that no VM is lost")]
struct Args {
    /// Migration modes.
    #[arg(long, value_delimiter = ',', value_enum, default_value = "stop-copy,precopy,postcopy,hybrid")]
    modes: Vec<Mode>,
    /// Phases: handshake (Hello), memory (the page stream), state (the state sent, the
    /// destination's Running not yet at the source), running (post-copy, pages still
    /// being pulled), complete (post-copy, every page sent, Done not yet back).
    /// Combinations that do not exist for a mode are left out.
    #[arg(long, value_delimiter = ',', value_enum, default_value = "handshake,memory,state,running,complete")]
    phases: Vec<Phase>,
    /// Faults: cut, delay, kill-dst, kill-src (only once the destination runs the VM),
    /// refuse.
    #[arg(long, value_delimiter = ',', value_enum, default_value = "cut,delay,kill-dst,kill-src,refuse")]
    faults: Vec<Fault>,
    /// Guest RAM.
    #[arg(long, default_value = "64M")]
    memory: String,
    /// How long the delay fault stalls the link (ms).
    #[arg(long, default_value_t = 2500)]
    delay_ms: u64,
    /// `--recover-timeout` for both sides (s): how long a broken post-copy link is
    /// re-established for, and how long a survivor waits before it gives up.
    #[arg(long, default_value_t = 3)]
    recover_timeout: u64,
    /// Migrate over TCP on loopback instead of Unix sockets.
    #[arg(long)]
    tcp: bool,
    /// The popek binary (default: the workspace's release build).
    #[arg(long)]
    popek: Option<PathBuf>,
    /// Write the results as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Write the Markdown table to this file too (e.g. $GITHUB_STEP_SUMMARY).
    #[arg(long, value_name = "FILE")]
    markdown: Option<PathBuf>,
    /// Keep every cell's process output (else kept only when something failed).
    #[arg(long)]
    keep: bool,
}

fn main() {
    let args = Args::parse();
    let popek = args.popek.clone().unwrap_or_else(popek_tools::default_popek);
    if !popek.is_file() {
        eprintln!("fault-matrix: {} not found: run `cargo build --release` first", popek.display());
        std::process::exit(2);
    }
    let cells = plan::cells(&args.modes, &args.phases, &args.faults);
    if cells.is_empty() {
        eprintln!(
            "fault-matrix: no cell: kill-src needs a phase from state on; running and complete need postcopy or hybrid"
        );
        std::process::exit(2);
    }
    let cfg = cell::Config {
        popek,
        memory: args.memory.clone(),
        delay: Duration::from_millis(args.delay_ms),
        recover_timeout: args.recover_timeout,
        tcp: args.tcp,
    };
    let dir = std::env::temp_dir().join(format!("popek-fault-matrix-{}", std::process::id()));
    let started = Instant::now();
    let mut rows = Vec::new();
    for (i, &c) in cells.iter().enumerate() {
        let row = cell::run(&cfg, c, &dir.join(format!("c{i}")));
        eprintln!("{}", report::progress(i, cells.len(), &row));
        rows.push(row);
    }
    let totals = report::Totals::of(&rows, started.elapsed().as_secs_f64());
    let markdown = report::markdown(&rows, &totals);
    println!("{markdown}");
    let json = report::json(&rows, &totals);
    println!("FAULT_JSON {}", serde_json::json!(totals));
    let write = |path: &Option<PathBuf>, text: &str| {
        if let Some(path) = path {
            if let Err(e) = std::fs::write(path, text) {
                eprintln!("fault-matrix: cannot write {}: {e}", path.display());
            }
        }
    };
    write(&args.json, &json.to_string());
    write(&args.markdown, &markdown);
    if args.keep || !totals.passed() {
        eprintln!("fault-matrix: process output kept in {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    if !totals.passed() {
        std::process::exit(1);
    }
}
