//! Hypercall benchmark: PING round trip from ring 0 and ring 3 next to the raw port-I/O
//! exit floor (a write to Popek's null port) and the ioeventfd doorbell, all measured by
//! the bundled guest in one run (`test=hyperbench`), plus console throughput through the
//! hypercall device vs the UART. Prints a Markdown table and one JSON line.

use clap::Parser;
use popek_tools::default_popek;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};

#[derive(Parser)]
#[command(about = "Hypercall latency vs the port-I/O exit floor, and console throughput")]
struct Args {
    /// Calls per measurement (the guest keeps at most 100000 samples).
    #[arg(long, default_value_t = 100_000)]
    iterations: u64,
    /// The popek binary to measure.
    #[arg(long)]
    popek: Option<PathBuf>,
    /// Write the JSON summary here as well.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Parses "key=value" fields of a guest "bench" line.
fn fields(line: &str) -> BTreeMap<&str, f64> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .filter_map(|(k, v)| v.parse().ok().map(|v| (k, v)))
        .collect()
}

fn main() {
    let args = Args::parse();
    let popek = args.popek.unwrap_or_else(default_popek);
    let cmdline = format!("test=hyperbench iterations={}", args.iterations);
    let output =
        Command::new(&popek).args(["run", "--no-stdin", "--cmdline", &cmdline]).stderr(Stdio::inherit()).output();
    let output = match output {
        Ok(o) => o,
        Err(e) => {
            eprintln!(
                "hypercall-bench: cannot run {}: {e} (build it with `cargo build --release -p popek`)",
                popek.display()
            );
            std::process::exit(2);
        }
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    if output.status.code() != Some(1) {
        eprintln!("hypercall-bench: the guest benchmark failed ({:?}):\n{}", output.status, stdout);
        std::process::exit(1);
    }
    let mut latency: BTreeMap<String, BTreeMap<&str, f64>> = BTreeMap::new();
    let mut console: BTreeMap<String, BTreeMap<&str, f64>> = BTreeMap::new();
    for line in stdout.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["bench", "latency", ring, what, ..] => {
                latency.insert(format!("{ring} {what}"), fields(line));
            }
            ["bench", "console", path, ..] => {
                console.insert(path.to_string(), fields(line));
            }
            _ => {}
        }
    }
    let get = |name: &str, key: &str| latency.get(name).and_then(|f| f.get(key)).copied().unwrap_or(f64::NAN);

    println!("| ring | operation | median (us) | p99 (us) | vs null-port exit (median) |");
    println!("|---|---|---|---|---|");
    let mut summary = serde_json::Map::new();
    let mut targets = serde_json::Map::new();
    for ring in ["ring0", "ring3"] {
        let floor = get(&format!("{ring} null-port"), "median_ns");
        for what in ["null-port", "ping", "doorbell"] {
            let name = format!("{ring} {what}");
            let (median, p99) = (get(&name, "median_ns"), get(&name, "p99_ns"));
            println!("| {ring} | {what} | {:.2} | {:.2} | {:.2}x |", median / 1e3, p99 / 1e3, median / floor);
            summary.insert(
                name.replace(' ', "_"),
                serde_json::json!({ "median_ns": median, "p99_ns": p99, "ratio_to_exit_floor": median / floor }),
            );
        }
        let ratio = get(&format!("{ring} ping"), "median_ns") / floor;
        targets.insert(
            format!("{ring}_ping_over_exit_floor"),
            serde_json::json!({ "ratio": ratio, "target": 1.2, "met": ratio <= 1.2 }),
        );
    }
    let throughput = |path: &str| {
        console
            .get(path)
            .map(|f| f.get("bytes").copied().unwrap_or(0.0) / (f.get("ns").copied().unwrap_or(f64::NAN) / 1e9))
    };
    let (uart, hyper) = (throughput("uart").unwrap_or(f64::NAN), throughput("hypercall").unwrap_or(f64::NAN));
    println!("\n| console path | throughput (KiB/s) |\n|---|---|");
    println!("| UART, one exit per byte | {:.1} |", uart / 1024.0);
    println!("| CONSOLE_WRITE hypercall, 4 KiB per call | {:.1} |", hyper / 1024.0);
    let speedup = hyper / uart;
    println!(
        "\nhypercall console / UART: {speedup:.0}x (target >= 20x: {})",
        if speedup >= 20.0 { "met" } else { "NOT met" }
    );
    for (name, t) in &targets {
        let met = t["met"].as_bool().unwrap_or(false);
        println!(
            "{name}: {:.2} (target <= 1.2: {})",
            t["ratio"].as_f64().unwrap_or(f64::NAN),
            if met { "met" } else { "NOT met" }
        );
    }
    summary.insert(
        "console_bytes_per_s".into(),
        serde_json::json!({ "uart": uart, "hypercall": hyper, "speedup": speedup }),
    );
    targets.insert(
        "console_speedup".into(),
        serde_json::json!({ "ratio": speedup, "target": 20.0, "met": speedup >= 20.0 }),
    );
    summary.insert("targets".into(), serde_json::Value::Object(targets));
    let json = serde_json::Value::Object(summary).to_string();
    println!("\nBENCH_JSON {json}");
    if let Some(path) = args.json {
        if let Err(e) = std::fs::write(&path, &json) {
            eprintln!("hypercall-bench: cannot write {}: {e}", path.display());
        }
    }
}
