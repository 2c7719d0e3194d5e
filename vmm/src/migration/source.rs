//! The sending side: stop-and-copy. Pause every vCPU, send the machine state and all of
//! memory, and wait for the destination to say the VM runs there. Any failure before that
//! resumes the VM here: nothing is lost.

use super::memory::{self, Transfer};
use super::protocol::{self, Answer, Complete, Hello, Kind, Running};
use super::transport::{self, Address};
use crate::vm::Vm;
use std::time::{Duration, Instant};

/// How long a silent peer is waited for.
const PEER_TIMEOUT: Duration = Duration::from_secs(30);

/// What a migration took.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub mode: &'static str,
    pub to: String,
    pub total_ms: f64,
    /// Source vCPUs paused -> destination confirmed its vCPUs run (end to end).
    pub downtime_ms: f64,
    /// The destination's own part: first state byte -> vCPUs running.
    pub destination_restore_ms: f64,
    pub memory: Transfer,
    pub state_bytes: u64,
    pub bandwidth_mb_s: f64,
    pub vcpus: u32,
}

/// Migrates `vm` to the destination listening at `to`.
pub fn migrate(vm: &mut Vm, to: &Address) -> Result<Report, String> {
    let start = Instant::now();
    let mut stream = transport::connect(to).map_err(|e| chain(&e))?;
    stream
        .set_timeout(PEER_TIMEOUT)
        .map_err(|e| e.to_string())?;
    let config = vm.config().clone();
    let hello = Hello {
        popek_version: env!("CARGO_PKG_VERSION").into(),
        memory_bytes: config.memory_bytes,
        vcpus: config.vcpus,
        firmware: config.boot == crate::config::BootMode::Firmware,
        msr_policy_zero: config.msr_policy == crate::trap::msr::UnknownMsrPolicy::Zero,
        tsc_khz: None,
    };
    protocol::write_json(&mut stream, Kind::Hello, &hello).map_err(|e| chain(&e))?;
    let _: Answer = protocol::read_json(&mut stream, Kind::Accept).map_err(|e| chain(&e))?;

    let paused = Instant::now();
    let vcpus = vm.pause_all()?;
    let result = (|| -> Result<(Transfer, u64, Running), String> {
        let machine = vm.save_machine(vcpus).map_err(|e| chain(&e))?;
        let state = serde_json::to_vec(&machine).map_err(|e| e.to_string())?;
        protocol::write_frame(&mut stream, Kind::State, &state).map_err(|e| chain(&e))?;
        let sent = memory::send_all(vm.ram(), &mut stream).map_err(|e| chain(&e))?;
        let complete = Complete {
            memory_crc32: sent.crc32,
            pages_sent: sent.pages,
            zero_pages: sent.zero_pages,
        };
        protocol::write_json(&mut stream, Kind::Complete, &complete).map_err(|e| chain(&e))?;
        let running: Running =
            protocol::read_json(&mut stream, Kind::Running).map_err(|e| chain(&e))?;
        Ok((sent, state.len() as u64, running))
    })();
    match result {
        Ok((memory, state_bytes, running)) => {
            let downtime = paused.elapsed();
            let total = start.elapsed();
            let bytes = memory.bytes_on_wire + state_bytes;
            Ok(Report {
                mode: "stop-copy",
                to: to.to_string(),
                total_ms: total.as_secs_f64() * 1e3,
                downtime_ms: downtime.as_secs_f64() * 1e3,
                destination_restore_ms: running.restore_us as f64 / 1e3,
                memory,
                state_bytes,
                bandwidth_mb_s: bytes as f64 / downtime.as_secs_f64().max(1e-9) / 1e6,
                vcpus: config.vcpus,
            })
        }
        Err(e) => {
            // Nothing was confirmed: the VM goes on here.
            vm.resume_all();
            Err(e)
        }
    }
}

/// "outer: inner: innermost".
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
