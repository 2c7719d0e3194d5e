//! The QEMU side of `--compare qemu`: the same guest ELF (`popek export-guest`) and
//! workload under `qemu-system-x86_64 -M microvm` with KVM, migrated over the same link
//! with QMP. Downtime end to end is the source's STOP event to the destination's RESUME
//! event (QMP timestamps, both from this host's clock); QEMU's own `downtime` field is
//! not used (it leaves out the destination's part). Without Popek's device the guest
//! checks its stamps continuously and says CORRUPT at once if a page is wrong.

use crate::cell::{Cell, Proc, Sample};
use crate::net::Net;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub struct Qemu {
    binary: PathBuf,
    elf: PathBuf,
}

/// A QMP connection: commands and the events that arrive meanwhile.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: Vec<Value>,
}

impl Qmp {
    fn connect(path: &Path, timeout: Duration) -> Result<Qmp, String> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => return Err(format!("QMP {}: {e}", path.display())),
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(120))).map_err(|e| e.to_string())?;
        let writer = stream.try_clone().map_err(|e| e.to_string())?;
        let mut qmp = Qmp { reader: BufReader::new(stream), writer, events: Vec::new() };
        qmp.line()?; // the greeting
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn line(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err("QMP closed".into()),
            Ok(_) => serde_json::from_str(&line).map_err(|e| format!("QMP: {e}")),
            Err(e) => Err(format!("QMP: {e}")),
        }
    }

    fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, String> {
        writeln!(self.writer, "{}", json!({"execute": command, "arguments": arguments})).map_err(|e| e.to_string())?;
        loop {
            let v = self.line()?;
            if v.get("event").is_some() {
                self.events.push(v);
            } else if let Some(e) = v.get("error") {
                return Err(format!("QMP {command}: {e}"));
            } else if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
        }
    }

    /// Waits for event `name`; returns its timestamp in seconds.
    fn event(&mut self, name: &str) -> Result<f64, String> {
        let stamp = |v: &Value| {
            v["timestamp"]["seconds"].as_f64().unwrap_or(0.0)
                + v["timestamp"]["microseconds"].as_f64().unwrap_or(0.0) / 1e6
        };
        if let Some(v) = self.events.iter().find(|v| v["event"] == name) {
            return Ok(stamp(v));
        }
        loop {
            let v = self.line()?;
            if v["event"] == name {
                return Ok(stamp(&v));
            }
            if v.get("event").is_some() {
                self.events.push(v);
            }
        }
    }
}

impl Qemu {
    /// Finds QEMU and writes the bundled guest ELF for it.
    pub fn find(popek: &Path) -> Result<Qemu, String> {
        let binary = popek_tools::which("qemu-system-x86_64")
            .ok_or("qemu-system-x86_64 not found: install Debian's qemu-system-x86 (tools/setup.sh does)")?;
        let elf = std::env::temp_dir().join(format!("popek-bench-guest-{}.elf", std::process::id()));
        let status = std::process::Command::new(popek)
            .args(["export-guest", "--output"])
            .arg(&elf)
            .status()
            .map_err(|e| e.to_string())?;
        if !status.success() {
            return Err("popek export-guest failed".into());
        }
        Ok(Qemu { binary, elf })
    }

    fn spawn(
        &self,
        net: &Net,
        host: usize,
        cell: &Cell,
        dir: &Path,
        tag: &str,
        extra: &[&str],
    ) -> Result<Proc, String> {
        let qmp = format!("unix:{},server=on,wait=off", dir.join(format!("{tag}.qmp")).display());
        let chardev = format!("file,id=s0,path={}", dir.join(format!("{tag}.console")).display());
        let cmdline = cell.workload.cmdline(0);
        let elf = self.elf.display().to_string();
        let mut args = vec![
            "-M",
            "microvm",
            "-enable-kvm",
            "-m",
            &cell.memory,
            "-display",
            "none",
            "-nodefaults",
            "-no-user-config",
            "-no-reboot",
            "-chardev",
            &chardev,
            "-device",
            "isa-serial,chardev=s0",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-kernel",
            &elf,
            "-append",
            &cmdline,
            "-qmp",
            &qmp,
        ];
        args.extend_from_slice(extra);
        Proc::spawn(&net.prefix(host), &self.binary, &args, dir, tag)
    }

    /// One QEMU migration of `cell` (its mode mapped onto QEMU's: stop-copy = `stop` then
    /// `migrate`; precopy = `migrate` with a 1 ms downtime limit and no bandwidth cap;
    /// postcopy = `migrate` and `migrate-start-postcopy` at once; hybrid = the same after
    /// 200 ms of pre-copy).
    pub fn run(&self, cell: &Cell, net: &Net, dir: &Path, port: u16, _rate: u64) -> Result<Sample, String> {
        let address = net.destination(port);
        let incoming = format!("tcp:{address}");
        let mut qdst = self.spawn(net, 1, cell, dir, "qdst", &["-incoming", &incoming])?;
        let mut qsrc = self.spawn(net, 0, cell, dir, "qsrc", &[])?;
        let console = |tag: &str| std::fs::read_to_string(dir.join(format!("{tag}.console"))).unwrap_or_default();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !console("qsrc").contains("migrate: ready") {
            if qsrc.try_status().is_some() {
                return Err(format!("QEMU ended: {}", qsrc.stderr().lines().next().unwrap_or("")));
            }
            if Instant::now() > deadline {
                return Err(format!("the QEMU guest never got ready: {}", console("qsrc")));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(200));
        let mut src = Qmp::connect(&dir.join("qsrc.qmp"), Duration::from_secs(10))?;
        let mut dst =
            Qmp::connect(&dir.join("qdst.qmp"), Duration::from_secs(10)).map_err(|e| match qdst.try_status() {
                // Say why the destination ended rather than only that its socket is gone.
                Some(_) => format!("{e}; QEMU's destination ended: {}", qdst.stderr().lines().next().unwrap_or("")),
                None => e,
            })?;
        let post = matches!(cell.mode.as_str(), "postcopy" | "hybrid");
        if post {
            let caps = json!({"capabilities": [{"capability": "postcopy-ram", "state": true}]});
            src.execute("migrate-set-capabilities", caps.clone())?;
            dst.execute("migrate-set-capabilities", caps)?;
        }
        src.execute("migrate-set-parameters", json!({"downtime-limit": 1, "max-bandwidth": 100u64 << 30}))?;
        let started = Instant::now();
        if cell.mode == "stop-copy" {
            src.execute("stop", json!({}))?;
        }
        src.execute("migrate", json!({"uri": format!("tcp:{address}")}))?;
        match cell.mode.as_str() {
            "postcopy" => {
                src.execute("migrate-start-postcopy", json!({}))?;
            }
            "hybrid" => {
                std::thread::sleep(Duration::from_millis(200));
                let status = src.execute("query-migrate", json!({}))?;
                if status["status"] == "active" {
                    src.execute("migrate-start-postcopy", json!({}))?;
                }
            }
            _ => {}
        }
        let info = loop {
            let info = src.execute("query-migrate", json!({}))?;
            match info["status"].as_str() {
                Some("completed") => break info,
                Some("failed" | "cancelled") => return Err(format!("QEMU migration failed: {info}")),
                _ if started.elapsed() > Duration::from_secs(60) => {
                    let _ = src.execute("migrate_cancel", json!({}));
                    return Err(format!(
                        "QEMU's migration did not complete in 60 s ({} dirty-bitmap syncs)",
                        info["ram"]["dirty-sync-count"]
                    ));
                }
                _ => std::thread::sleep(Duration::from_millis(2)),
            }
        };
        if cell.mode == "stop-copy" {
            // A VM that was paused when it left stays paused on arrival: start it once
            // the destination has loaded it, as a user of QEMU's stop-and-copy would.
            let loaded = Instant::now();
            while dst.execute("query-migrate", json!({}))?["status"] != "completed" {
                if loaded.elapsed() > Duration::from_secs(30) {
                    return Err("the QEMU destination never finished loading".into());
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            dst.execute("cont", json!({}))?;
        }
        let stopped = src.event("STOP")?;
        let resumed = dst.event("RESUME")?;
        let total_ms = (info["total-time"].as_f64().unwrap_or(0.0)).max(started.elapsed().as_secs_f64() * 1e3);
        // The guest goes on there, and finds all its stamps.
        std::thread::sleep(Duration::from_millis(300));
        let after = console("qdst");
        if after.contains("CORRUPT") {
            return Err(format!("the guest found corrupt memory under QEMU: {after}"));
        }
        let _ = src.execute("quit", json!({}));
        let _ = dst.execute("quit", json!({}));
        Ok(Sample {
            downtime_ms: (resumed - stopped) * 1e3,
            // QEMU's downtime is its STOP and RESUME events already.
            downtime_by_events_ms: Some((resumed - stopped) * 1e3),
            blackout_ms: None,
            total_ms,
            bytes: info["ram"]["transferred"].as_f64().unwrap_or(0.0),
            // Not compressed: QEMU's multifd compression is off by default.
            compression_saved: 0.0,
            round_pages: Vec::new(),
            rounds: info["ram"]["dirty-sync-count"].as_f64().unwrap_or(0.0),
            fault_p50_us: None,
            fault_p99_us: None,
            breakdown: None,
            throughput: None,
        })
    }
}
