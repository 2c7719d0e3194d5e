//! Migration benchmark sweep: runs source and destination VMMs itself and migrates the
//! bundled guest's `migrate` workload for every cell of mode x guest RAM x workload x
//! link, N times each; with `--compare qemu` the same cells under QEMU too. Prints a
//! Markdown table and a `BENCH_JSON` line; writes JSON, JUnit XML and SVG plots on
//! request; `--max-downtime-ms` / `--max-total-s` make it exit 1 when a cell's median
//! exceeds them (or a run failed). See docs/benchmarks.md.

mod cell;
mod net;
mod pki;
mod qemu;
mod report;

use cell::{Cell, Sample, Workload};
use clap::Parser;
use net::{Link, Net};
use popek_tools::default_popek;
use report::Outcome;
use std::path::PathBuf;
use std::time::Instant;

/// What protects a Popek cell's migration stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Encryption {
    None,
    Tls,
}

#[derive(Parser)]
#[command(about = "Migration downtime, total time and bytes over a matrix of modes, sizes, workloads and links")]
struct Args {
    /// Repetitions per cell (medians reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Migration modes.
    #[arg(long, value_delimiter = ',', default_value = "stop-copy,precopy,postcopy,hybrid")]
    modes: Vec<String>,
    /// Guest RAM sizes.
    #[arg(long, value_delimiter = ',', default_value = "256M,1G")]
    memory: Vec<String>,
    /// Guest workloads: idle, dirty (64 MiB at full speed), rate (64 MiB at --rate pages/s),
    /// read (all memory read), write-all (all memory written at full speed).
    #[arg(long, value_delimiter = ',', value_enum, default_value = "idle,dirty")]
    workloads: Vec<Workload>,
    /// Links: loopback, veth (two network namespaces), 1g (veth shaped to 1 Gbit/s), 10g
    /// (10 Gbit/s, 0.1 ms delay). Namespaces need root.
    #[arg(long, value_delimiter = ',', value_enum, default_value = "loopback")]
    links: Vec<Link>,
    /// Pages per second for the `rate` workload.
    #[arg(long, default_value_t = 8192)]
    rate: u64,
    /// Also run every cell under QEMU (`qemu`), for the side-by-side table.
    #[arg(long, value_name = "VMM")]
    compare: Option<String>,
    /// Exit 1 when a cell's median downtime exceeds this (ms).
    #[arg(long, value_name = "MS")]
    max_downtime_ms: Option<f64>,
    /// Apply the limits to these modes only (default: all); e.g. leave out stop-copy of a
    /// dirtying guest, whose downtime is its whole transfer by design.
    #[arg(long, value_delimiter = ',', value_name = "MODES")]
    gate_modes: Option<Vec<String>>,
    /// Exit 1 when a cell's median total time exceeds this (s).
    #[arg(long, value_name = "S")]
    max_total_s: Option<f64>,
    /// Write the results as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Write a JUnit XML report (one test case per cell).
    #[arg(long, value_name = "FILE")]
    junit: Option<PathBuf>,
    /// Write SVG plots (downtime.svg, rounds.svg) into this directory.
    #[arg(long, value_name = "DIR")]
    plots: Option<PathBuf>,
    /// Write the Markdown table to this file too (e.g. $GITHUB_STEP_SUMMARY).
    #[arg(long, value_name = "FILE")]
    markdown: Option<PathBuf>,
    /// The popek binary (default: the workspace's release build).
    #[arg(long)]
    popek: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Run the source on the first half of this machine's CPUs and the destination on the
    /// other half (`taskset`), for Popek and QEMU alike: two hosts do not share cores, and
    /// on one host the scheduler may put sender and receiver on one core.
    #[arg(long)]
    pin: bool,
    /// Start Popek destinations with `--prealloc` (RAM allocated before the source
    /// connects, as QEMU's destination gets its -m up front).
    #[arg(long)]
    prealloc: bool,
    /// Stream protection per Popek cell: none, tls (mutual TLS 1.3 with throwaway
    /// certificates; the cells show as "popek-tls", with a TLS-cost table).
    #[arg(long, value_delimiter = ',', value_enum, default_value = "none")]
    encryption: Vec<Encryption>,
    /// Measure TCP loopback throughput before and after the sweep (one stream, 4 MiB
    /// writes) and print it: the physical limit the stop-and-copy figures compare with (a
    /// table gives the share of it that cells moving all of memory reached).
    #[arg(long)]
    loopback_probe: bool,
}

/// TCP loopback throughput of one stream, bytes per second: 2 GiB in 4 MiB writes.
fn loopback_probe() -> std::io::Result<f64> {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let address = listener.local_addr()?;
    const TOTAL: usize = 2 << 30;
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        let mut s = std::net::TcpStream::connect(address)?;
        let chunk = vec![0x5au8; 4 << 20];
        for _ in 0..TOTAL / chunk.len() {
            s.write_all(&chunk)?;
        }
        Ok(())
    });
    let (mut r, _) = listener.accept()?;
    let mut buf = vec![0u8; 4 << 20];
    let started = Instant::now();
    let mut got = 0;
    while got < TOTAL {
        match r.read(&mut buf)? {
            0 => break,
            n => got += n,
        }
    }
    let secs = started.elapsed().as_secs_f64();
    sender.join().map_err(|_| std::io::Error::other("sender panicked"))??;
    Ok(got as f64 / secs)
}

fn main() {
    let args = Args::parse();
    let popek = args.popek.clone().unwrap_or_else(default_popek);
    if !popek.is_file() {
        eprintln!("migration-bench: {} not found: run `cargo build --release` first", popek.display());
        std::process::exit(2);
    }
    let qemu = match args.compare.as_deref() {
        None => None,
        Some("qemu") => match qemu::Qemu::find(&popek) {
            Ok(q) => Some(q),
            Err(e) => {
                eprintln!("migration-bench: --compare qemu: {e}");
                std::process::exit(2);
            }
        },
        Some(other) => {
            eprintln!("migration-bench: cannot compare with '{other}' (only qemu)");
            std::process::exit(2);
        }
    };
    if args.pin {
        match net::cpu_halves(net::cpus()) {
            Ok([source, destination]) => {
                println!("migration-bench: --pin: sources on CPUs {source}, destinations on CPUs {destination}")
            }
            Err(e) => {
                eprintln!("migration-bench: {e}");
                std::process::exit(2);
            }
        }
    }
    let mut probes = Vec::new();
    if args.loopback_probe {
        probe_into(&mut probes, "before the sweep");
    }
    let dir = std::env::temp_dir().join(format!("popek-migration-bench-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let mut vmms: Vec<&'static str> = Vec::new();
    for encryption in &args.encryption {
        vmms.push(match encryption {
            Encryption::None => "popek",
            Encryption::Tls => "popek-tls",
        });
    }
    if qemu.is_some() {
        vmms.push("qemu");
    }
    let pki = match args.encryption.contains(&Encryption::Tls).then(|| pki::Pki::issue(&dir)).transpose() {
        Ok(pki) => pki,
        Err(e) => {
            eprintln!("migration-bench: {e}");
            std::process::exit(2);
        }
    };
    let mut cells = Vec::new();
    for &link in &args.links {
        for memory in &args.memory {
            for &workload in &args.workloads {
                for mode in &args.modes {
                    for &vmm in &vmms {
                        cells.push(Cell { vmm, mode: mode.clone(), memory: memory.clone(), workload, link });
                    }
                }
            }
        }
    }
    let bar = if args.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new((cells.len() * args.runs) as u64)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut port = 21000 + (std::process::id() % 20000) as u16;
    let mut outcomes: Vec<Outcome> = Vec::new();
    let mut net: Option<Net> = None;
    for cell in cells {
        if net.as_ref().map(|n| n.link) != Some(cell.link) {
            drop(net.take()); // the previous namespaces go first: the names are reused
            match Net::new(cell.link, args.pin) {
                Ok(n) => net = Some(n),
                Err(e) => {
                    eprintln!("migration-bench: link {}: {e}", cell.link);
                    std::process::exit(2);
                }
            }
        }
        let Some(net) = net.as_ref() else { continue };
        let started = Instant::now();
        let (mut samples, mut failures) = (Vec::<Sample>::new(), Vec::new());
        for _ in 0..args.runs {
            bar.set_message(cell.name());
            port = net.free_port(port.wrapping_add(1).max(20000));
            let result = match (cell.vmm, &qemu) {
                ("qemu", Some(q)) => q.run(&cell, net, &dir, port, args.rate),
                (vmm, _) => {
                    let tls = if vmm == "popek-tls" { pki.as_ref() } else { None };
                    cell::run_popek(&popek, &cell, net, &dir, port, (args.rate, args.prealloc, tls))
                }
            };
            match result {
                Ok(s) => samples.push(s),
                Err(e) => {
                    bar.suspend(|| eprintln!("migration-bench: {}: {e}", cell.name()));
                    failures.push(e);
                }
            }
            bar.inc(1);
        }
        let mut outcome =
            Outcome { cell, samples, failures, gate: Vec::new(), seconds: started.elapsed().as_secs_f64() };
        gate(&mut outcome, &args);
        outcomes.push(outcome);
    }
    bar.finish_and_clear();
    drop(net);
    let _ = std::fs::remove_dir_all(&dir);
    if args.loopback_probe {
        // This host's loopback rate swings twofold within minutes: a second probe after
        // the sweep brackets what the cells saw.
        probe_into(&mut probes, "after the sweep");
    }
    print_and_write(&outcomes, &args, &probes)
}

/// Runs the loopback probe, prints its rate and keeps it in `probes`.
fn probe_into(probes: &mut Vec<f64>, when: &str) {
    match loopback_probe() {
        Ok(rate) => {
            println!("TCP loopback, one stream, {when}: {:.2} GB/s\n", rate / 1e9);
            probes.push(rate);
        }
        Err(e) => eprintln!("migration-bench: loopback probe: {e}"),
    }
}

/// Marks a cell failed when the popek cells exceed the limits (QEMU cells are baselines).
fn gate(outcome: &mut Outcome, args: &Args) {
    if !outcome.cell.vmm.starts_with("popek") {
        return;
    }
    if !outcome.failures.is_empty() {
        outcome.gate.push(format!("{} of {} runs failed", outcome.failures.len(), args.runs));
    }
    if args.gate_modes.as_ref().is_some_and(|modes| !modes.contains(&outcome.cell.mode)) {
        return;
    }
    if let (Some(limit), Some(d)) = (args.max_downtime_ms, outcome.downtime()) {
        if d.median > limit {
            outcome.gate.push(format!("median downtime {:.2} ms > {limit} ms", d.median));
        }
    }
    if let (Some(limit), Some(t)) = (args.max_total_s, outcome.total()) {
        if t.median > limit * 1e3 {
            outcome.gate.push(format!("median total {:.1} ms > {limit} s", t.median));
        }
    }
}

fn print_and_write(outcomes: &[Outcome], args: &Args, probes: &[f64]) {
    let mut markdown = report::table(outcomes);
    if let Some(c) = report::comparison(outcomes) {
        markdown += &format!("\nPopek against QEMU (medians; ratio < 1: Popek is better):\n\n{c}");
    }
    if let Some(c) = report::downtime_parts(outcomes) {
        markdown += &format!("\nWhere Popek's downtime goes (medians, ms; see docs/benchmarks.md):\n\n{c}");
    }
    if let Some(c) = report::guest_throughput(outcomes) {
        markdown += &format!("\nThe guest's own throughput around the move (medians):\n\n{c}");
    }
    if let Some(c) = report::loopback_share(outcomes, probes) {
        markdown += &format!("\nStop-and-copy of all memory against the loopback probes:\n\n{c}");
    }
    if let Some(c) = report::tls_cost(outcomes) {
        markdown += &format!("\nWhat TLS costs (medians, the same cells without and with it):\n\n{c}");
    }
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| !o.gate.is_empty()).collect();
    for o in &failed {
        markdown += &format!("\ngate: FAILED {}: {}", o.cell.name(), o.gate.join("; "));
    }
    if (args.max_downtime_ms.is_some() || args.max_total_s.is_some()) && failed.is_empty() {
        markdown += "\ngate: passed (every popek cell within the limits)";
    }
    println!("{markdown}");
    let json = serde_json::json!({ "cells": outcomes.iter().map(Outcome::json).collect::<Vec<_>>(),
        "comparison": report::comparison_json(outcomes),
        "gate_failures": failed.len(), "loopback_probes_gb_s": probes.iter().map(|p| p / 1e9).collect::<Vec<_>>() });
    println!("\nBENCH_JSON {json}");
    let write = |path: &Option<PathBuf>, text: &str| {
        if let Some(path) = path {
            if let Err(e) = std::fs::write(path, text) {
                eprintln!("migration-bench: cannot write {}: {e}", path.display());
            }
        }
    };
    write(&args.json, &json.to_string());
    write(&args.junit, &report::junit(outcomes));
    write(&args.markdown, &markdown);
    if let Some(dir) = &args.plots {
        if let Err(e) = report::plots(outcomes, dir) {
            eprintln!("migration-bench: plots: {e}");
        }
    }
    if !failed.is_empty() {
        std::process::exit(1);
    }
}
