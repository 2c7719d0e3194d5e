//! Migration benchmark: runs a source and a destination `popek` over TCP loopback and
//! migrates the bundled guest's `migrate` workload, for each cell of mode (stop-copy,
//! precopy) x guest RAM x workload (idle: no pages stamped; dirty: 64 MiB stamped at full
//! speed), N times each. Prints a Markdown table of medians and one JSON line.

use clap::Parser;
use popek_tools::{default_popek, Stats};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(about = "Migration downtime, total time and bytes, per mode, size and workload")]
struct Args {
    /// Repetitions per cell (medians reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Guest RAM sizes.
    #[arg(long, value_delimiter = ',', default_value = "256M,1G")]
    memory: Vec<String>,
    #[arg(long, value_delimiter = ',', default_value = "stop-copy,precopy")]
    modes: Vec<String>,
    #[arg(long)]
    popek: Option<PathBuf>,
    #[arg(long)]
    json: Option<PathBuf>,
}

struct Sample {
    downtime_ms: f64,
    total_ms: f64,
    bytes: f64,
    blackout_ms: f64,
    rounds: f64,
}

fn wait_for(path: &std::path::Path, needle: &str, child: &mut Child) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if std::fs::read_to_string(path).unwrap_or_default().contains(needle) {
            return Ok(());
        }
        if Instant::now() > deadline || matches!(child.try_wait(), Ok(Some(_))) {
            return Err(format!("never saw {needle:?} in {}", path.display()));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn one(
    popek: &PathBuf,
    dir: &std::path::Path,
    memory: &str,
    mode: &str,
    pages: u32,
    port: u16,
) -> Result<Sample, String> {
    let file = |n: &str| dir.join(n);
    let spawn = |args: &[&str], out: &str, err: &str| {
        Command::new(popek)
            .args(args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(file(out)).map_err(|e| e.to_string())?)
            .stderr(std::fs::File::create(file(err)).map_err(|e| e.to_string())?)
            .spawn()
            .map_err(|e| e.to_string())
    };
    let api = file("api.sock").display().to_string();
    let to = format!("tcp:127.0.0.1:{port}");
    let cmdline = format!("test=migrate pages={pages} seconds=120");
    let mut dst = spawn(&["run", "--no-stdin", "--incoming", &to], "dst.out", "dst.err")?;
    let mut src =
        spawn(&["run", "--no-stdin", "-m", memory, "--api-socket", &api, "--cmdline", &cmdline], "src.out", "src.err")?;
    let result = (|| {
        wait_for(&file("src.out"), "migrate: ready", &mut src)?;
        wait_for(&file("dst.err"), "waiting for a migration", &mut dst)?;
        // Let the workload run a moment so the dirtying is at full speed.
        std::thread::sleep(Duration::from_millis(200));
        let out = Command::new(popek)
            .args(["migrate", "--api-socket", &api, "--to", &to, "--mode", mode, "--downtime-limit", "1"])
            .output()
            .map_err(|e| e.to_string())?;
        let reply: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| format!("bad reply: {e}"))?;
        let report = reply.get("report").ok_or_else(|| format!("migration failed: {reply}"))?;
        let _ = dst.wait();
        let dst_out = std::fs::read_to_string(file("dst.out")).unwrap_or_default();
        let blackout_us: f64 = dst_out
            .split("longest pause ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("guest did not report: {dst_out}"))?;
        if !dst_out.contains("verified: ok") {
            return Err(format!("guest self-check failed: {dst_out}"));
        }
        let f = |k: &str| report[k].as_f64().unwrap_or(f64::NAN);
        Ok(Sample {
            downtime_ms: f("downtime_ms"),
            total_ms: f("total_ms"),
            bytes: report["memory"]["bytes_on_wire"].as_f64().unwrap_or(0.0) + f("state_bytes"),
            blackout_ms: blackout_us / 1e3,
            rounds: report["rounds"].as_array().map_or(0, |r| r.len()) as f64,
        })
    })();
    let _ = src.kill();
    let _ = dst.kill();
    let _ = src.wait();
    let _ = dst.wait();
    result
}

fn main() {
    let args = Args::parse();
    let popek = args.popek.clone().unwrap_or_else(default_popek);
    let dir = std::env::temp_dir().join(format!("popek-migration-bench-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let mut port = 21000 + (std::process::id() % 10000) as u16;
    println!("| mode | RAM | workload | downtime median (ms) | min | max | guest blackout (ms) | total (ms) | MB sent | rounds |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut cells = Vec::new();
    for memory in &args.memory {
        for (workload, pages) in [("idle", 0u32), ("dirty 64 MiB", 16384)] {
            for mode in &args.modes {
                let mut samples = Vec::new();
                for _ in 0..args.runs {
                    port += 1;
                    match one(&popek, &dir, memory, mode, pages, port) {
                        Ok(s) => samples.push(s),
                        Err(e) => eprintln!("migration-bench: {mode} {memory} {workload}: {e}"),
                    }
                }
                let stat = |f: fn(&Sample) -> f64| Stats::of(&samples.iter().map(f).collect::<Vec<_>>());
                let (d, b, t, m, r) = (
                    stat(|s| s.downtime_ms),
                    stat(|s| s.blackout_ms),
                    stat(|s| s.total_ms),
                    stat(|s| s.bytes / 1e6),
                    stat(|s| s.rounds),
                );
                match (d, b, t, m, r) {
                    (Some(d), Some(b), Some(t), Some(m), Some(r)) => println!(
                        "| {mode} | {memory} | {workload} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1} | {:.1} | {:.0} |",
                        d.median, d.min, d.max, b.median, t.median, m.median, r.median
                    ),
                    _ => println!("| {mode} | {memory} | {workload} | failed | | | | | | |"),
                }
                cells.push(
                    serde_json::json!({"mode": mode, "memory": memory, "workload": workload, "runs": samples.len(),
                    "downtime_ms": d, "guest_blackout_ms": b, "total_ms": t, "mb_sent": m, "rounds": r}),
                );
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let json = serde_json::json!({ "cells": cells }).to_string();
    println!("\nBENCH_JSON {json}");
    if let Some(path) = args.json {
        let _ = std::fs::write(path, &json);
    }
}
