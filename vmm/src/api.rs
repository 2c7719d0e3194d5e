//! The control socket (`popek run --api-socket PATH`): one JSON request per line, one JSON
//! reply per line. Requests: `{"cmd":"status"}`, `{"cmd":"pause"}`, `{"cmd":"resume"}`,
//! `{"cmd":"migrate","to":"tcp:HOST:PORT"|"unix:PATH","mode":"stop-copy"}`,
//! `{"cmd":"migrate-postcopy"}` (answered at once: a hybrid migration switches). Requests are
//! served by the VM's own thread between vCPU events, so they never race a vCPU.

use crate::migration::transport::Address;
use crate::vcpu::VmExit;
use crate::vm::Vm;
use serde::Deserialize;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::Duration;

/// Longest request line accepted.
pub const MAX_REQUEST: usize = 64 * 1024;
/// Pre-copy's delta cache when the request names none (`popek migrate`'s default too).
pub const DEFAULT_DELTA_CACHE: u64 = 128 << 20;

/// One request, where its reply goes, and how the VM learns the reply was written
/// (after a migration the process ends: the client must have its report first).
pub struct Call {
    pub request: Request,
    pub reply: Sender<Value>,
    pub written: Receiver<()>,
}

/// The requests.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    Status,
    Stats,
    Pause,
    Resume,
    Migrate {
        to: String,
        mode: Option<String>,
        downtime_limit_ms: Option<f64>,
        max_rounds: Option<u32>,
        verify_memory: Option<bool>,
        /// Bytes per second, at most.
        max_bandwidth: Option<u64>,
        /// Pre-copy: throttle the vCPUs when the rounds stop shrinking.
        auto_converge: Option<bool>,
        /// Post-copy: seconds to keep re-establishing a broken link.
        recover_timeout_s: Option<u64>,
        /// Hybrid: switch only when asked (or after `max_rounds`).
        manual_switch: Option<bool>,
        /// Pre-copy and hybrid: bytes of sent pages kept to send them again as deltas.
        delta_cache: Option<u64>,
        /// When Memory frames go compressed: "auto" (default), "on", "off".
        compress: Option<String>,
    },
    /// Hybrid migration in progress: switch to post-copy after the current round.
    MigratePostcopy,
}

/// Parses one request line.
pub fn parse(line: &str) -> Result<Request, String> {
    let value: Value = serde_json::from_str(line).map_err(|e| format!("bad request: {e}"))?;
    let object = value.as_object().ok_or("bad request: not a JSON object")?;
    // serde does not refuse extra fields next to a unit variant's tag: check by hand.
    if let Some(key) = object.keys().find(|k| {
        !matches!(
            k.as_str(),
            "cmd"
                | "to"
                | "mode"
                | "downtime_limit_ms"
                | "max_rounds"
                | "verify_memory"
                | "max_bandwidth"
                | "auto_converge"
                | "recover_timeout_s"
                | "manual_switch"
                | "delta_cache"
                | "compress"
        )
    }) {
        return Err(format!("bad request: unknown field '{key}'"));
    }
    serde_json::from_value(value).map_err(|e| format!("bad request: {e}"))
}

/// Listens on `path` and forwards requests to the returned receiver.
pub fn spawn_server(path: &Path) -> std::io::Result<Receiver<Call>> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new().name("api".into()).spawn(move || {
        // The per-client threads inherit this filter.
        crate::seccomp::enter_or_exit(crate::seccomp::ThreadKind::Api);
        for stream in listener.incoming().flatten() {
            let tx = tx.clone();
            let _ = std::thread::Builder::new().name("api-client".into()).spawn(move || serve_client(stream, tx));
        }
    })?;
    Ok(rx)
}

fn serve_client(stream: UnixStream, tx: Sender<Call>) {
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream).take(MAX_REQUEST as u64);
    let mut line = String::new();
    while matches!(reader.read_line(&mut line), Ok(n) if n > 0) {
        let reply = match parse(line.trim()) {
            // Answered here, not by the VM's thread, which is busy migrating.
            Ok(Request::MigratePostcopy) => {
                crate::migration::source::SWITCH_TO_POSTCOPY.store(true, std::sync::atomic::Ordering::SeqCst);
                json!({"ok": true, "note": "a hybrid migration switches to post-copy after its current round"})
            }
            Ok(request) => {
                let (reply_tx, reply_rx) = mpsc::channel();
                let (written_tx, written_rx) = mpsc::channel();
                if tx.send(Call { request, reply: reply_tx, written: written_rx }).is_err() {
                    return;
                }
                // Progress values come first, one line each; the reply is the one with "ok".
                let mut ok = true;
                loop {
                    let value = reply_rx
                        .recv_timeout(Duration::from_secs(600))
                        .unwrap_or_else(|_| json!({"ok": false, "error": "the VM did not answer"}));
                    ok = ok && writeln!(out, "{value}").and_then(|()| out.flush()).is_ok();
                    if value.get("ok").is_some() {
                        break;
                    }
                }
                let _ = written_tx.send(());
                if !ok {
                    return;
                }
                line.clear();
                reader.set_limit(MAX_REQUEST as u64);
                continue;
            }
            Err(e) => json!({"ok": false, "error": e}),
        };
        if writeln!(out, "{reply}").is_err() {
            return;
        }
        line.clear();
        reader.set_limit(MAX_REQUEST as u64);
    }
}

/// Serves one request on the VM's thread; returns an exit when the VM has moved away.
pub fn serve(vm: &mut Vm, call: Call) -> Option<VmExit> {
    let (reply, exit) = match call.request {
        Request::Status => (
            json!({"ok": true, "state": if vm.is_paused() { "paused" } else { "running" }, "vcpus": vm.config().vcpus, "memory_bytes": vm.config().memory_bytes}),
            None,
        ),
        Request::Stats => (json!({"ok": true, "stats": vm.stats_json()}), None),
        Request::Pause => match vm.pause_all() {
            Ok(_) => (json!({"ok": true, "state": "paused"}), None),
            Err(e) => (json!({"ok": false, "error": e}), None),
        },
        Request::Resume => {
            vm.resume_all();
            (json!({"ok": true, "state": "running"}), None)
        }
        Request::MigratePostcopy => (json!({"ok": false, "error": "no migration in progress"}), None),
        Request::Migrate {
            to,
            mode,
            downtime_limit_ms,
            max_rounds,
            verify_memory,
            max_bandwidth,
            auto_converge,
            recover_timeout_s,
            manual_switch,
            delta_cache,
            compress,
        } => {
            use crate::migration::source::Mode;
            let downtime_limit_ms = downtime_limit_ms.unwrap_or(1.0);
            let max_rounds = max_rounds.unwrap_or(30);
            let mode = match mode.as_deref() {
                None | Some("stop-copy") => Ok(Mode::StopCopy),
                Some("precopy") => {
                    Ok(Mode::Precopy { downtime_limit_ms, max_rounds, auto_converge: auto_converge.unwrap_or(false) })
                }
                Some("postcopy") => Ok(Mode::Postcopy),
                Some("hybrid") => {
                    Ok(Mode::Hybrid { downtime_limit_ms, max_rounds, manual_switch: manual_switch.unwrap_or(false) })
                }
                Some(other) => Err(format!("unknown migration mode '{other}' (stop-copy, precopy, postcopy, hybrid)")),
            };
            let compress = compress.as_deref().map(str::parse).transpose();
            match mode.and_then(|mode| Ok((mode, compress?.unwrap_or_default()))) {
                Ok((mode, compress)) => {
                    let options = crate::migration::source::Options {
                        verify_memory: verify_memory.unwrap_or(false),
                        max_bandwidth,
                        recover_timeout: Duration::from_secs(recover_timeout_s.unwrap_or(60)),
                        delta_cache: delta_cache.unwrap_or(DEFAULT_DELTA_CACHE),
                        compress,
                    };
                    migrate(vm, &to, mode, &options, &call.reply)
                }
                Err(e) => (json!({"ok": false, "error": e}), None),
            }
        }
    };
    let _ = call.reply.send(reply);
    if exit.is_some() {
        // The process ends next: let the client get its report first.
        let _ = call.written.recv_timeout(Duration::from_secs(2));
    }
    exit
}

fn migrate(
    vm: &mut Vm,
    to: &str,
    mode: crate::migration::source::Mode,
    options: &crate::migration::source::Options,
    progress: &Sender<Value>,
) -> (Value, Option<VmExit>) {
    let address: Address = match to.parse() {
        Ok(a) => a,
        Err(e) => return (json!({"ok": false, "error": e.to_string()}), None),
    };
    let mut report_progress = |value: Value| {
        let _ = progress.send(json!({ "progress": value }));
    };
    match crate::migration::source::migrate(vm, &address, mode, options, &mut report_progress) {
        Ok(report) => {
            vm.stop_all();
            let report = serde_json::to_value(&report).unwrap_or(Value::Null);
            (json!({"ok": true, "report": report}), Some(VmExit::Migrated(report.to_string())))
        }
        Err(e) if e.vm_here => (json!({"ok": false, "error": e.reason, "state": "running"}), None),
        Err(e) => {
            // Post-copy lost its link for good after the VM started there: nothing to
            // resume here; say so and end.
            vm.stop_all();
            (json!({"ok": false, "error": e.reason, "state": "lost"}), Some(VmExit::MigrationLost(e.reason)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests() {
        assert_eq!(parse(r#"{"cmd":"status"}"#), Ok(Request::Status));
        assert_eq!(parse(r#"{"cmd":"migrate-postcopy"}"#), Ok(Request::MigratePostcopy));
        assert_eq!(
            parse(r#"{"cmd":"migrate","to":"unix:/x"}"#),
            Ok(Request::Migrate {
                to: "unix:/x".into(),
                mode: None,
                downtime_limit_ms: None,
                max_rounds: None,
                verify_memory: None,
                max_bandwidth: None,
                auto_converge: None,
                recover_timeout_s: None,
                manual_switch: None,
                delta_cache: None,
                compress: None
            })
        );
        for bad in ["", "{}", r#"{"cmd":"reboot"}"#, r#"{"cmd":"status","x":1}"#, "[1,2]", "\u{0}"] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
