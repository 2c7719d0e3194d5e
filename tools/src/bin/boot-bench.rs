//! Boot benchmark: time from process start to the guest's first serial byte and to its
//! exit, for Popek direct boot, Popek firmware boot and, side by side in the same run,
//! QEMU booting the same guest ELF (`-M microvm`, KVM on; `-M pc` with `--with-qemu-pc`).
//! Runs are interleaved so that machine noise hits every variant alike. Prints a Markdown
//! table, then one JSON line (`--json FILE` writes it to a file too).

use clap::Parser;
use popek_tools::{default_popek, which, Stats};
use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(about = "Time to first serial byte and to exit: Popek direct, Popek firmware, QEMU")]
struct Args {
    /// Runs per variant (the median is reported).
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// The popek binary to measure.
    #[arg(long)]
    popek: Option<PathBuf>,
    /// Also measure QEMU `-M pc` (SeaBIOS; seconds per run on hosts that emulate real mode).
    #[arg(long)]
    with_qemu_pc: bool,
    /// Skip QEMU even if it is installed.
    #[arg(long)]
    no_qemu: bool,
    /// Write the JSON summary here as well.
    #[arg(long)]
    json: Option<PathBuf>,
}

struct Variant {
    name: &'static str,
    command: Vec<String>,
    first_byte_ms: Vec<f64>,
    exit_ms: Vec<f64>,
    failures: usize,
}

/// Spawns the command, returns (ms to first stdout byte, ms to exit) if it succeeded with
/// the guest's success status (1).
fn measure(command: &[String]) -> Option<(f64, f64)> {
    let start = Instant::now();
    let mut child = Command::new(&command[0])
        .args(&command[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let mut stdout = child.stdout.take()?;
    let mut byte = [0u8; 1];
    let first = match stdout.read(&mut byte) {
        Ok(1) => start.elapsed(),
        _ => {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
    };
    let mut rest = Vec::new();
    let _ = stdout.read_to_end(&mut rest);
    let status = child.wait().ok()?;
    let exit = start.elapsed();
    (status.code() == Some(1)).then_some((ms(first), ms(exit)))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    let args = Args::parse();
    let popek = args.popek.clone().unwrap_or_else(default_popek);
    if !popek.is_file() {
        eprintln!("boot-bench: {} not found; build it with `cargo build --release -p popek`", popek.display());
        std::process::exit(2);
    }
    let popek = popek.display().to_string();
    let guest = std::env::temp_dir().join(format!("popek-boot-bench-{}.elf", std::process::id()));
    let exported = Command::new(&popek).args(["export-guest", "-o"]).arg(&guest).status();
    if !matches!(exported, Ok(s) if s.success()) {
        eprintln!("boot-bench: `popek export-guest` failed");
        std::process::exit(2);
    }
    let guest = guest.display().to_string();

    let own = |name, extra: &[&str]| {
        let mut command = vec![popek.clone(), "run".into(), "--no-stdin".into(), "--memory".into(), "256M".into()];
        command.extend(extra.iter().map(|s| s.to_string()));
        Variant { name, command, first_byte_ms: vec![], exit_ms: vec![], failures: 0 }
    };
    let mut variants = vec![own("popek direct", &[]), own("popek firmware", &["--boot", "firmware"])];
    let qemu = which("qemu-system-x86_64");
    match (&qemu, args.no_qemu) {
        (_, true) => {}
        (None, false) => {
            eprintln!("boot-bench: qemu-system-x86_64 not found (apt-get install qemu-system-x86); QEMU column skipped")
        }
        (Some(qemu), false) => {
            let qemu_cmd = |machine: &str| -> Vec<String> {
                let mut c: Vec<String> = vec![qemu.display().to_string(), "-M".into(), machine.into()];
                for a in
                    ["-enable-kvm", "-m", "256M", "-display", "none", "-serial", "stdio", "-no-reboot", "-nodefaults"]
                {
                    c.push(a.into());
                }
                c.extend(["-device".into(), "isa-debug-exit,iobase=0xf4,iosize=0x04".into()]);
                c.extend(["-kernel".into(), guest.clone()]);
                c
            };
            let mut microvm = qemu_cmd("microvm");
            // -nodefaults drops microvm's own serial; add it back explicitly.
            microvm.extend(["-device".into(), "isa-serial,chardev=s0".into()]);
            let pos = microvm.iter().position(|a| a == "stdio").expect("serial arg present");
            microvm[pos - 1] = "-chardev".into();
            microvm[pos] = "stdio,id=s0".into();
            variants.push(Variant {
                name: "qemu microvm",
                command: microvm,
                first_byte_ms: vec![],
                exit_ms: vec![],
                failures: 0,
            });
            if args.with_qemu_pc {
                variants.push(Variant {
                    name: "qemu pc",
                    command: qemu_cmd("pc"),
                    first_byte_ms: vec![],
                    exit_ms: vec![],
                    failures: 0,
                });
            }
        }
    }

    for run in 0..args.runs {
        for variant in &mut variants {
            match measure(&variant.command) {
                Some((first, exit)) => {
                    variant.first_byte_ms.push(first);
                    variant.exit_ms.push(exit);
                }
                None => variant.failures += 1,
            }
        }
        eprint!("\rboot-bench: run {}/{}", run + 1, args.runs);
    }
    eprintln!();
    let _ = std::fs::remove_file(&guest);
    report(&variants, args.json.as_ref());
}

fn report(variants: &[Variant], json_path: Option<&PathBuf>) {
    println!("| variant | runs | first byte median (ms) | p95 | min | max | exit median (ms) | failures |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut summary = serde_json::Map::new();
    for v in variants {
        let first = Stats::of(&v.first_byte_ms);
        let exit = Stats::of(&v.exit_ms);
        match (first, exit) {
            (Some(f), Some(e)) => println!(
                "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} |",
                v.name, f.n, f.median, f.p95, f.min, f.max, e.median, v.failures
            ),
            _ => println!("| {} | 0 | - | - | - | - | - | {} |", v.name, v.failures),
        }
        summary.insert(
            v.name.replace(' ', "_"),
            serde_json::json!({ "first_byte_ms": first, "exit_ms": exit, "failures": v.failures, "command": v.command }),
        );
    }
    let median = |name: &str| {
        variants.iter().find(|v| v.name == name).and_then(|v| Stats::of(&v.first_byte_ms)).map(|s| s.median)
    };
    let mut targets = serde_json::Map::new();
    if let (Some(direct), Some(qemu)) = (median("popek direct"), median("qemu microvm")) {
        let ratio = direct / qemu;
        println!("\npopek direct / qemu microvm (first byte): {ratio:.3} (target <= 0.1: {})", verdict(ratio <= 0.1));
        targets.insert(
            "direct_over_qemu_microvm".into(),
            serde_json::json!({ "ratio": ratio, "target": 0.1, "met": ratio <= 0.1 }),
        );
    }
    if let (Some(direct), Some(firmware)) = (median("popek direct"), median("popek firmware")) {
        let ratio = firmware / direct;
        println!("popek firmware / popek direct (first byte): {ratio:.3} (target <= 2: {})", verdict(ratio <= 2.0));
        targets.insert(
            "firmware_over_direct".into(),
            serde_json::json!({ "ratio": ratio, "target": 2.0, "met": ratio <= 2.0 }),
        );
    }
    summary.insert("targets".into(), serde_json::Value::Object(targets));
    let json = serde_json::Value::Object(summary).to_string();
    println!("\nBENCH_JSON {json}");
    if let Some(path) = json_path {
        if let Err(e) = std::fs::write(path, &json) {
            eprintln!("boot-bench: cannot write {}: {e}", path.display());
        }
    }
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "NOT met"
    }
}
