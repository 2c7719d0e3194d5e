//! One cell: a source VM running the guest's memory workload, a fresh destination, the
//! relay in between with the cell's fault, `popek migrate` through it; then where the VM
//! runs, and its memory self-check (the guest's own check where it arrived; a clean
//! move with `--verify-memory` to another fresh destination where it stayed).

use crate::inject::{kind, Dir, Injector};
use crate::plan::{Cell, Fault, Mode, Phase};
use crate::relay::{Addr, Pids, Relay};
use popek_tools::procs::{last_line, Proc};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The guest's workload: 2,048 pages (8 MiB) stamped at full speed and checked on every
/// pass; after one move it keeps working for 100 passes, checks every page once more,
/// prints "N pages verified: ok" (or CORRUPT) and ends with status 1 (its success).
const WORKLOAD: &str = "test=migrate pages=2048 seconds=600 moves=1";
const PAGES: &str = "2048 pages verified: ok";
/// The guest's success status (it writes 0 to the exit port: `(0 << 1) | 1`).
const GUEST_OK: i32 = 1;
/// popek's "migration failed" status.
const MIGRATION_FAILED: i32 = 18;

/// How a cell runs.
pub struct Config {
    pub popek: PathBuf,
    pub memory: String,
    pub delay: Duration,
    pub recover_timeout: u64,
    pub tcp: bool,
}

/// What one cell observed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    pub mode: Mode,
    pub phase: Phase,
    pub fault: Fault,
    /// The frame the fault hit; `None`: the phase never came, nothing was injected.
    pub injected: Option<String>,
    /// `popek migrate`'s exit status (`None`: it did not end and was killed).
    pub migrate_status: Option<i32>,
    /// Its error, if it failed.
    pub migrate_error: Option<String>,
    /// Post-copy reconnections its report counts (a recovered link), if it succeeded.
    pub reconnects: Option<u64>,
    /// Exit statuses of the source and the destination (`None`: still running, or hung).
    pub source_status: Option<i32>,
    pub destination_status: Option<i32>,
    /// "source", "destination", "both" or "none".
    pub runs_on: &'static str,
    pub survived: bool,
    /// The VM is gone in the documented unrecoverable case and the survivor said so.
    pub unrecoverable_documented: bool,
    pub lost: bool,
    /// "pass", "fail" or "n/a" (no copy of the VM left to check).
    pub memory_check: &'static str,
    pub check_detail: String,
    /// What went wrong with the cell (lost VM, failed check, hang, nothing injected).
    pub problems: Vec<String>,
    pub notes: Vec<String>,
    pub relay_connections: usize,
    pub relay_events: Vec<String>,
    pub seconds: f64,
}

impl Row {
    fn new(cell: Cell) -> Row {
        Row {
            mode: cell.mode,
            phase: cell.phase,
            fault: cell.fault,
            injected: None,
            migrate_status: None,
            migrate_error: None,
            reconnects: None,
            source_status: None,
            destination_status: None,
            runs_on: "none",
            survived: false,
            unrecoverable_documented: false,
            lost: false,
            memory_check: "n/a",
            check_detail: String::new(),
            problems: Vec::new(),
            notes: Vec::new(),
            relay_connections: 0,
            relay_events: Vec::new(),
            seconds: 0.0,
        }
    }

    pub fn cell(&self) -> Cell {
        Cell { mode: self.mode, phase: self.phase, fault: self.fault }
    }
}

/// Runs `cell` in `dir` (created here).
pub fn run(cfg: &Config, cell: Cell, dir: &Path) -> Row {
    let started = Instant::now();
    let mut row = Row::new(cell);
    if let Err(e) = std::fs::create_dir_all(dir) {
        row.problems.push(format!("cannot create {}: {e}", dir.display()));
    } else if let Err(e) = run_in(cfg, cell, dir, &mut row) {
        row.problems.push(e);
    }
    row.seconds = started.elapsed().as_secs_f64();
    row
}

/// A fresh address: a socket in the cell's directory, or a free loopback port.
fn address(cfg: &Config, dir: &Path, name: &str) -> Result<Addr, String> {
    if !cfg.tcp {
        return Ok(Addr::Unix(dir.join(format!("{name}.sock"))));
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("no free port: {e}"))?
        .port();
    Ok(Addr::Tcp(format!("127.0.0.1:{port}")))
}

fn run_in(cfg: &Config, cell: Cell, dir: &Path, row: &mut Row) -> Result<(), String> {
    let popek = cfg.popek.as_path();
    let api = dir.join("api.sock").display().to_string();
    let mut src = Proc::spawn(
        &[],
        popek,
        &["run", "--no-stdin", "--memory", &cfg.memory, "--api-socket", &api, "--cmdline", WORKLOAD],
        dir,
        "src",
    )?;
    src.wait_for("migrate: ready", Duration::from_secs(30)).map_err(|e| format!("source: {e}"))?;

    let recover = cfg.recover_timeout.to_string();
    let dst_addr = address(cfg, dir, "dst")?.to_string();
    let mut dst_args = vec!["run", "--no-stdin", "--incoming", &dst_addr, "--recover-timeout", &recover];
    // The natural refusal at the handshake: a destination whose RAM was prepared for
    // another size (docs/migration.md, --prealloc) refuses the Hello.
    let other = if cfg.memory.eq_ignore_ascii_case("32M") { "64M" } else { "32M" };
    if (cell.phase, cell.fault) == (Phase::Handshake, Fault::Refuse) {
        dst_args.extend(["--prealloc", "--memory", other]);
    }
    let mut dst = Proc::spawn(&[], popek, &dst_args, dir, "dst")?;
    dst.wait_for("waiting for a migration on", Duration::from_secs(30)).map_err(|e| format!("destination: {e}"))?;

    let target = match dst_addr.strip_prefix("unix:") {
        Some(p) => Addr::Unix(p.into()),
        None => Addr::Tcp(dst_addr.trim_start_matches("tcp:").into()),
    };
    let relay = Relay::start(
        address(cfg, dir, "relay")?,
        target,
        Injector::new(cell, cfg.delay),
        Pids { source: src.pid(), destination: dst.pid() },
    )
    .map_err(|e| format!("relay: {e}"))?;
    let to = relay.addr.to_string();
    let mut args = vec!["migrate", "--api-socket", &api, "--to", &to, "--mode", cell.mode.name()];
    args.extend(["--recover-timeout", &recover]);
    if cell.mode == Mode::Hybrid {
        // Always switch after round 1 (the limit 0 never counts as converged while the
        // guest dirties pages): hybrid then has all of its phases, deterministically.
        args.extend(["--downtime-limit", "0", "--max-rounds", "1"]);
    }
    let mut migrate = Proc::spawn(&[], popek, &args, dir, "migrate")?;
    // Long enough for a recovery and a give-up after the recovery timeout, twice over.
    let limit = Duration::from_secs(60 + 2 * cfg.recover_timeout);
    row.migrate_status = migrate.wait(limit);
    if row.migrate_status.is_none() {
        row.problems.push(format!("popek migrate did not end within {limit:?} (hang)"));
        migrate.kill();
    }
    let reply: Option<serde_json::Value> = serde_json::from_str(&migrate.stdout()).ok();
    if row.migrate_status == Some(0) {
        row.reconnects = reply.as_ref().and_then(|r| r["report"]["postcopy"]["reconnects"].as_u64());
    } else {
        let error = reply.as_ref().and_then(|r| r["error"].as_str()).map(str::to_string);
        row.migrate_error = Some(error.unwrap_or_else(|| last_line(&migrate.stderr())));
    }

    // Where does the VM run now? The source either ended (moved away, killed, gave up)
    // or runs it. After a failure ask it first (it may run for ever); after a success,
    // or when it says it does not run (it may be on its way out), let it end first.
    let mut src_runs = row.migrate_status != Some(0) && source_running(popek, &api, dir)?;
    let mut src_status = None;
    if !src_runs {
        src_status = src.wait(Duration::from_secs(10));
        if src_status.is_none() {
            src_runs = source_running(popek, &api, dir)?;
            if !src_runs {
                row.problems.push("the source process lives on but does not run the VM".into());
            }
        }
    }
    // A destination ends by itself in every case: its guest finishes its check, or it
    // refuses, or it gives up after the recovery timeout.
    let dst_limit = Duration::from_secs(30 + cfg.recover_timeout);
    let dst_status = dst.wait(dst_limit);
    if dst_status.is_none() {
        row.problems.push(format!("the destination did not end within {dst_limit:?} (hang)"));
        dst.kill();
    }
    (row.source_status, row.destination_status) = (src_status, dst_status);
    if row.reconnects.is_some_and(|n| n > 0) {
        row.notes.push(format!("the link was re-established {} time(s)", row.reconnects.unwrap_or(0)));
    }
    let dst_out = dst.stdout();
    // The guest arrived and ran there; it survived only if it also ended by itself (its
    // own status): a destination that gives the VM up after the guest checked its memory
    // would have ended any longer-lived guest the same way.
    let dst_arrived = dst_out.contains("migrate: moved (generation");
    let dst_ran = dst_arrived && dst_status == Some(GUEST_OK);
    if dst_arrived && !dst_ran {
        row.notes.push(format!(
            "the guest ran on the destination, which then ended it (status {dst_status:?}): {}",
            last_line(&dst.stderr())
        ));
    }
    row.injected = relay.fired();
    row.relay_connections = relay.connections();
    row.relay_events = relay.events();
    let seen = relay.seen();
    drop(relay);

    row.runs_on = match (src_runs, dst_ran) {
        (true, true) => "both",
        (true, false) => "source",
        (false, true) => "destination",
        (false, false) => "none",
    };
    row.survived = src_runs || dst_ran;
    if row.injected.is_none() {
        row.problems.push(format!("the fault was never injected: no {} phase came", cell.phase));
    }
    if cell.fault == Fault::Refuse && cell.phase == Phase::Handshake && !seen.contains(&(Dir::ToSrc, kind::REFUSE)) {
        row.problems.push("the destination never refused".into());
    }
    if src_runs && dst_ran {
        row.notes.push("two copies: the destination ran the VM but its Running never reached the source, which resumed (the documented gap of docs/migration.md)".into());
    }

    let mut checks: Vec<(bool, String)> = Vec::new();
    if dst_ran {
        let ok = dst_out.contains(PAGES);
        let how = if ok { "the guest on the destination verified every page" } else { "the guest on the destination" };
        checks.push((ok, format!("{how}: {}", last_line(&dst_out))));
    }
    if src_runs {
        checks.push(move_again(cfg, dir, &api, &mut src));
    }
    if !row.survived {
        let (survivor, status, err) = if cell.fault == Fault::KillSrc {
            ("destination", dst_status, dst.stderr())
        } else {
            ("source", src_status, src.stderr())
        };
        // A source killed at its Complete: every page was sent, but answers on the urgent
        // channel may still have been on their way; the documented case only if the
        // destination says pages were missing.
        let pages_missing = missing_pages(&dst.stderr()).is_some_and(|n| n > 0);
        let late_kill = (cell.phase, cell.fault) == (Phase::Complete, Fault::KillSrc) && pages_missing;
        if cell.documented_unrecoverable() || late_kill {
            let said = err.contains("unrecoverable");
            if status == Some(MIGRATION_FAILED) && said {
                row.unrecoverable_documented = true;
                row.notes.push(format!("the {survivor} said: {}", unrecoverable_line(&err)));
            } else {
                row.problems.push(format!(
                    "the {survivor} did not report the unrecoverable case clearly (status {status:?}): {}",
                    last_line(&err)
                ));
            }
        } else {
            row.lost = true;
            row.problems.push(format!(
                "VM LOST: neither side runs it (source status {src_status:?}, destination status {dst_status:?}: {})",
                last_line(&dst.stderr())
            ));
        }
    }
    if !checks.is_empty() {
        let passed = checks.iter().all(|c| c.0);
        row.memory_check = if passed { "pass" } else { "fail" };
        row.check_detail = checks.iter().map(|c| c.1.as_str()).collect::<Vec<_>>().join("; ");
        if !passed {
            row.problems.push(format!("memory check failed: {}", row.check_detail));
        }
    }
    Ok(())
}

/// N in the destination's "the guest waits on N missing pages" (a lost post-copy link).
fn missing_pages(stderr: &str) -> Option<u64> {
    let (_, rest) = stderr.rsplit_once("the guest waits on ")?;
    rest.split_whitespace().next()?.parse().ok()
}

/// The line that says "unrecoverable", whole (the word tends to come last).
fn unrecoverable_line(stderr: &str) -> String {
    stderr.lines().rev().find(|l| l.contains("unrecoverable")).unwrap_or("").trim().to_string()
}

/// Asks the source's control socket whether its VM runs.
fn source_running(popek: &Path, api: &str, dir: &Path) -> Result<bool, String> {
    let mut status = Proc::spawn(&[], popek, &["status", "--api-socket", api], dir, "status")?;
    match status.wait(Duration::from_secs(10)) {
        Some(0) => Ok(status.stdout().contains("\"running\"")),
        Some(_) => Ok(false),
        None => Err("the source's control socket does not answer (hang)".into()),
    }
}

/// Moves the VM again, cleanly (stop-and-copy, `--verify-memory`, no relay), to a fresh
/// destination and reads the guest's own check there.
fn move_again(cfg: &Config, dir: &Path, api: &str, src: &mut Proc) -> (bool, String) {
    let result = (|| -> Result<String, String> {
        let to = address(cfg, dir, "clean")?.to_string();
        let mut dst = Proc::spawn(&[], &cfg.popek, &["run", "--no-stdin", "--incoming", &to], dir, "clean")?;
        dst.wait_for("waiting for a migration on", Duration::from_secs(30))?;
        let args = ["migrate", "--api-socket", api, "--to", &to, "--mode", "stop-copy", "--verify-memory"];
        let mut migrate = Proc::spawn(&[], &cfg.popek, &args, dir, "clean-migrate")?;
        match migrate.wait(Duration::from_secs(60)) {
            Some(0) => {}
            other => return Err(format!("the clean move failed ({other:?}): {}", last_line(&migrate.stderr()))),
        }
        let reply: serde_json::Value = serde_json::from_str(&migrate.stdout()).map_err(|e| e.to_string())?;
        if reply["report"]["memory_verified"] != true {
            return Err("the clean move did not verify the destination's RAM against the source's".into());
        }
        let status = dst.wait(Duration::from_secs(30));
        let out = dst.stdout();
        if status != Some(GUEST_OK) || !out.contains(PAGES) {
            return Err(format!("after the clean move (status {status:?}): {}", last_line(&out)));
        }
        if src.wait(Duration::from_secs(10)) != Some(0) {
            return Err(format!("the source did not end after the clean move: {}", last_line(&src.stderr())));
        }
        Ok(last_line(&out))
    })();
    match result {
        Ok(line) => (true, format!("moved again from the source with --verify-memory; the guest: {line}")),
        Err(e) => (false, format!("moved again from the source: {e}")),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn missing_pages_are_read_from_the_destinations_last_complaint() {
        let err = "popek: post-copy link lost (x); the guest waits on 12 missing pages; waiting up to 3 s\n\
                   popek: post-copy link lost (y); the guest waits on 0 missing pages; waiting up to 3 s\n";
        assert_eq!(super::missing_pages(err), Some(0));
        assert_eq!(super::missing_pages("popek: waiting for a migration on unix:x"), None);
    }
}
