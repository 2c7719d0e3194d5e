//! The sending side: stop-and-copy. Pause every vCPU, send the machine state and all of
//! memory, and wait for the destination to say the VM runs there. Any failure before that
//! resumes the VM here: nothing is lost.

use super::memory::{self, Outgoing, Transfer};
use super::pages::{PageMap, PageSet};
use super::protocol::{self, Answer, Complete, Hello, Kind, Running};
use super::transport::{self, Address};
use crate::parked::Parked;
use crate::vm::Vm;
use std::time::{Duration, Instant};

/// How long a silent peer is waited for.
const PEER_TIMEOUT: Duration = Duration::from_secs(30);

/// How to move the VM.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// Pause, copy everything, run there.
    StopCopy,
    /// Copy while the guest runs, in rounds of the pages it dirtied, until what is left
    /// fits the downtime limit at the measured bandwidth (or `max_rounds` is reached: then
    /// stop and copy the rest anyway).
    Precopy { downtime_limit_ms: f64, max_rounds: u32, auto_converge: bool },
    /// Move the vCPUs at once; memory follows, on demand and pushed in the background.
    Postcopy,
    /// Pre-copy rounds; switch to post-copy when they stop converging (unless
    /// `manual_switch`), after `max_rounds`, or when asked (`migrate-postcopy`).
    /// Converging first ends as pre-copy.
    Hybrid { downtime_limit_ms: f64, max_rounds: u32, manual_switch: bool },
}

impl Mode {
    fn name(&self) -> &'static str {
        match self {
            Mode::StopCopy => "stop-copy",
            Mode::Precopy { .. } => "precopy",
            Mode::Postcopy => "postcopy",
            Mode::Hybrid { .. } => "hybrid",
        }
    }
}

/// Everything about a migration besides its mode.
#[derive(Debug, Clone)]
pub struct Options {
    /// Test mode: the destination checks its RAM against ours at the pause.
    pub verify_memory: bool,
    /// Bytes per second, at most.
    pub max_bandwidth: Option<u64>,
    /// Post-copy: how long to keep trying to re-establish a broken link.
    pub recover_timeout: Duration,
    /// Pre-copy: bytes of pages sent kept to send them again as deltas (0: none).
    pub delta_cache: u64,
    /// When Memory frames go compressed.
    pub compress: super::compress::Mode,
}

/// Set by the control socket's `migrate-postcopy` request: a hybrid migration switches to
/// post-copy after the current round. (One VM per process, so one flag.)
pub static SWITCH_TO_POSTCOPY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A migration that did not complete.
#[derive(Debug)]
pub struct Failed {
    pub reason: String,
    /// Whether the VM still runs here (always, except after a post-copy lost its link for
    /// good once the destination had started the VM).
    pub vm_here: bool,
}

impl From<String> for Failed {
    fn from(reason: String) -> Failed {
        Failed { reason, vm_here: true }
    }
}

/// How the pre-copy rounds ended.
#[derive(Debug, Clone, Copy, PartialEq)]
enum RoundsEnd {
    Converged,
    /// `max_rounds` reached: copy the rest with the VM paused.
    GaveUp,
    /// Hybrid: go on in post-copy. `unsent_from`: round 0 stopped before this page
    /// (counted as `PageMap` does); it and every page after it are still to go.
    Switch {
        unsent_from: Option<u64>,
    },
}

/// Post-copy figures, from both sides.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PostcopyReport {
    /// Pages the destination lacked when the vCPUs moved.
    pub pages_needed: u64,
    /// Pages sent because the destination asked (and the few after each).
    pub pages_requested_sent: u64,
    /// Pages sent by the background push.
    pub pages_pushed: u64,
    /// Times the source re-established a broken link.
    pub reconnects: u32,
    /// The destination's side: faults, requests, latency, duration.
    pub destination: protocol::Done,
}

/// How long the source polls for Running instead of sleeping (`Stream::spin_until_readable`):
/// the destination's restore and its last pages take well under this after Complete, and
/// the guest is paused, so its cores are free.
const RUNNING_SPIN: std::time::Duration = std::time::Duration::from_millis(2);

/// The downtime window, phase by phase (milliseconds).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Breakdown {
    /// Pausing the vCPUs (each saves its own state); after pre-copy rounds, sending the
    /// pages dirtied since the last round happens meanwhile and is counted here.
    pub pause: f64,
    /// Saving and sending the machine state (it goes before the last pages).
    pub state: f64,
    /// The last dirty pages (those written while the vCPUs stopped; all of memory for
    /// stop-and-copy) and Complete.
    pub final_memory: f64,
    /// From Complete sent to Running received: the destination's checks, what is left of
    /// its restore, its vCPUs starting, one message back.
    pub until_running: f64,
}

/// One pre-copy round.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Round {
    pub round: u32,
    pub pages: u64,
    pub ms: f64,
    pub mb_s: f64,
}

/// What a migration took.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub mode: &'static str,
    pub rounds: Vec<Round>,
    /// Pages sent while the vCPUs were paused.
    pub final_pages: u64,
    /// Whether pre-copy converged under the downtime limit (false: it hit max rounds).
    pub converged: bool,
    /// Test mode: the destination checked its RAM equals ours at the pause.
    pub memory_verified: bool,
    /// Where the downtime went: pausing the vCPUs (and saving their state), the last
    /// memory, the machine state, and waiting for the destination to run the VM.
    pub downtime_breakdown_ms: Breakdown,
    pub to: String,
    /// "tls1.3" (mutual TLS, `--tls-*`) or "none": what protected the stream on the wire.
    pub encryption: &'static str,
    pub total_ms: f64,
    /// Source vCPUs paused -> destination confirmed its vCPUs run (end to end).
    pub downtime_ms: f64,
    /// The source's pause -> the destination letting its vCPUs go, each stamped on its own
    /// wall clock: the downtime as QEMU measures its own (STOP and RESUME events), without
    /// Running's way back. Only where both clocks agree (one host); `None` when the
    /// destination's stamp is missing or earlier than the pause (clocks apart).
    pub downtime_by_events_ms: Option<f64>,
    /// The destination's own part: first state byte -> vCPUs running.
    pub destination_restore_ms: f64,
    pub memory: Transfer,
    pub state_bytes: u64,
    pub bandwidth_mb_s: f64,
    pub vcpus: u32,
    /// Post-copy and hybrid (when it switched): the post-copy phase.
    pub postcopy: Option<PostcopyReport>,
}

fn encryption() -> &'static str {
    if super::tls::enabled() {
        "tls1.3"
    } else {
        "none"
    }
}

/// Migrates `vm` to the destination listening at `to`; `progress` gets one JSON value per
/// pre-copy round.
pub fn migrate(
    vm: &mut Vm,
    to: &Address,
    mode: Mode,
    options: &Options,
    progress: &mut dyn FnMut(serde_json::Value),
) -> Result<Report, Failed> {
    let start = Instant::now();
    SWITCH_TO_POSTCOPY.store(false, std::sync::atomic::Ordering::SeqCst);
    if options.verify_memory && matches!(mode, Mode::Postcopy | Mode::Hybrid { .. }) {
        return Err(Failed::from("--verify-memory needs all of memory at the pause, which post-copy moves later; the guest's own self-check covers post-copy".to_string()));
    }
    let migration_id = super::auth::nonce()?.iter().take(8).fold(0u64, |id, b| id << 8 | u64::from(*b));
    let config = vm.config().clone();
    let may_switch = matches!(mode, Mode::Postcopy | Mode::Hybrid { .. });
    // Post-copy's threads start now, while the destination builds the VM: started just
    // before the pause, one of them waited 3-4 ms for a core in half the runs here (a
    // new thread does not preempt a busy guest's vCPU before its time slice ends).
    let threads = may_switch.then(PostcopyThreads::start).transpose()?;
    let mut stream = dial(to, config.auth_key.as_ref())?;
    let hello = Hello {
        popek_version: env!("CARGO_PKG_VERSION").into(),
        memory_bytes: config.memory_bytes,
        vcpus: config.vcpus,
        firmware: config.boot == crate::config::BootMode::Firmware,
        msr_policy_zero: config.msr_policy == crate::trap::msr::UnknownMsrPolicy::Zero,
        tsc_khz: vm.tsc_khz(),
        cpuid_crc32: vm.cpuid_crc32().map_err(|e| chain(&e))?,
        migration_id,
        postcopy: may_switch,
    };
    protocol::write_json(&mut stream, Kind::Hello, &hello).map_err(|e| chain(&e))?;
    let _: Answer = protocol::read_json(&mut stream, Kind::Accept).map_err(|e| chain(&e))?;
    // Post-copy's urgent channel is opened now, while nothing is paused.
    let urgent = if may_switch {
        let mut urgent = dial(to, config.auth_key.as_ref())?;
        let id = protocol::Resume { migration_id };
        protocol::write_json(&mut urgent, Kind::Urgent, &id).map_err(|e| chain(&e))?;
        let _: Answer = protocol::read_json(&mut urgent, Kind::Accept).map_err(|e| chain(&e))?;
        Some(urgent)
    } else {
        None
    };

    let mut outgoing = Outgoing::with_limit(options.max_bandwidth).compressing(options.compress);
    let mut rounds = Vec::new();
    let delta_cache = options.delta_cache;
    let limits = match mode {
        Mode::Precopy { downtime_limit_ms, max_rounds, auto_converge } => {
            Some(RoundLimits { downtime_limit_ms, max_rounds, auto_converge, switch: None, delta_cache })
        }
        Mode::Hybrid { downtime_limit_ms, max_rounds, manual_switch } => Some(RoundLimits {
            downtime_limit_ms,
            max_rounds,
            auto_converge: false,
            switch: Some(if manual_switch { Switch::WhenAsked } else { Switch::WhenStuck }),
            delta_cache,
        }),
        Mode::StopCopy | Mode::Postcopy => None,
    };
    let end = match limits {
        Some(limits) => match precopy(vm, &mut stream, &mut outgoing, &mut rounds, limits, progress) {
            Ok(end) => end,
            Err(e) => {
                let _ = vm.set_dirty_logging(false);
                return Err(e.into());
            }
        },
        None if mode == Mode::Postcopy => RoundsEnd::Switch { unsent_from: None },
        None => RoundsEnd::Converged,
    };
    let converged = end == RoundsEnd::Converged;
    if let RoundsEnd::Switch { unsent_from } = end {
        let reconnect = super::postcopy_source::Reconnect {
            to,
            auth_key: config.auth_key.as_ref(),
            migration_id,
            timeout: options.recover_timeout,
        };
        let hybrid = mode != Mode::Postcopy;
        // Only post-copy and hybrid switch, and they made their threads.
        let Some(threads) = threads else {
            let _ = vm.set_dirty_logging(false);
            return Err(Failed::from("switched to post-copy without its threads".to_string()));
        };
        let phase = Postcopy { stream, urgent, threads, outgoing, rounds, start, hybrid, unsent_from };
        return postcopy(vm, phase, &reconnect, mode, progress);
    }

    if mode == Mode::StopCopy {
        // Still running: the destination allocates the pages that will come with data
        // now, outside the downtime.
        populate_ahead(vm, &mut stream)?;
    }
    if end == RoundsEnd::GaveUp {
        // The destination catches up with the rounds before the pause, not inside it.
        if let Err(e) = sync(&mut stream) {
            let _ = vm.set_dirty_logging(false);
            return Err(e.into());
        }
    }
    let paused = Instant::now();
    let paused_unix_ns = protocol::unix_ns();
    vm.begin_pause();
    outgoing.sending_last();
    // After pre-copy rounds, the pages dirtied since the last one go while the vCPUs are
    // still on their way out of the guest (a busy vCPU took 0.1-0.5 ms here to reach its
    // pause): only what the guest writes after this fetch is left for the paused window.
    let early = if rounds.is_empty() { Ok(0) } else { send_dirty_now(vm, &mut outgoing, &mut stream) };
    let early_pages = match early {
        Ok(pages) => pages,
        Err(e) => {
            let _ = vm.finish_pause();
            let _ = vm.set_dirty_logging(false);
            vm.resume_all();
            return Err(e.into());
        }
    };
    let vcpus = vm.finish_pause()?;
    // SAFETY: the vCPUs stay paused until Running (the VM is gone) or a failure, which
    // resumes them only after the last use of `outgoing`.
    unsafe { outgoing.guest_paused(vm.ram()) };
    let mut breakdown = Breakdown { pause: paused.elapsed().as_secs_f64() * 1e3, ..Default::default() };
    let mut lap = Instant::now();
    let mut mark = |slot: &mut f64| {
        *slot = lap.elapsed().as_secs_f64() * 1e3;
        lap = Instant::now();
    };
    let result = (|| -> Result<(u64, u64, Running, Option<u32>), String> {
        // The state goes first: the destination restores it (vCPUs, devices, clocks;
        // nothing in RAM) while the last pages are still on their way, instead of after.
        let machine = vm.save_machine(vcpus).map_err(|e| chain(&e))?;
        let state = machine.encode().map_err(|e| chain(&e))?;
        protocol::write_frame(&mut stream, Kind::State, &state).map_err(|e| chain(&e))?;
        mark(&mut breakdown.state);
        let final_pages = if rounds.is_empty() {
            outgoing.send_all(vm.ram(), &mut stream).map_err(|e| chain(&e))?;
            outgoing.stats.pages
        } else {
            early_pages + send_dirty_now(vm, &mut outgoing, &mut stream)?
        };
        let ram_crc32 =
            if options.verify_memory { Some(memory::ram_crc32(vm.ram()).map_err(|e| chain(&e))?) } else { None };
        let complete = Complete {
            memory_crc32: outgoing.crc32(),
            pages_sent: outgoing.stats.pages,
            zero_pages: outgoing.stats.zero_pages,
            ram_crc32,
            state_crc32: Some(crc32fast::hash(&state)),
        };
        protocol::write_json(&mut stream, Kind::Complete, &complete).map_err(|e| chain(&e))?;
        mark(&mut breakdown.final_memory);
        stream.spin_until_readable(RUNNING_SPIN);
        let running: Running = protocol::read_json(&mut stream, Kind::Running).map_err(|e| chain(&e))?;
        mark(&mut breakdown.until_running);
        Ok((final_pages, state.len() as u64, running, ram_crc32))
    })();
    match result {
        Ok((final_pages, state_bytes, running, ram_crc32)) => {
            let downtime = paused.elapsed();
            let total = start.elapsed();
            let mut memory = outgoing.stats;
            memory.crc32 = outgoing.crc32();
            let bytes = memory.bytes_on_wire + state_bytes;
            Ok(Report {
                mode: mode.name(),
                rounds,
                final_pages,
                memory_verified: ram_crc32.is_some(),
                downtime_breakdown_ms: breakdown,
                converged,
                to: to.to_string(),
                encryption: encryption(),
                total_ms: total.as_secs_f64() * 1e3,
                downtime_ms: downtime.as_secs_f64() * 1e3,
                destination_restore_ms: running.restore_us as f64 / 1e3,
                downtime_by_events_ms: by_events(paused_unix_ns, &running),
                memory,
                state_bytes,
                bandwidth_mb_s: bytes as f64 / total.as_secs_f64().max(1e-9) / 1e6,
                vcpus: config.vcpus,
                postcopy: None,
            })
        }
        Err(e) => {
            // Nothing was confirmed: the VM goes on here.
            let _ = vm.set_dirty_logging(false);
            vm.resume_all();
            Err(e.into())
        }
    }
}

/// The downtime from the pause's stamp here to the destination's resume stamp (see
/// `Report::downtime_by_events_ms`).
fn by_events(paused_unix_ns: Option<u64>, running: &Running) -> Option<f64> {
    let gap = running.resumed_unix_ns?.checked_sub(paused_unix_ns?)?;
    Some(gap as f64 / 1e6)
}

/// Sends the pages dirtied since the last fetch of the dirty log; returns how many.
fn send_dirty_now(vm: &Vm, outgoing: &mut Outgoing, stream: &mut Box<dyn transport::Stream>) -> Result<u64, String> {
    let dirty = vm.take_dirty().map_err(|e| chain(&e))?;
    outgoing.send_dirty(vm.ram(), &dirty, stream).map_err(|e| chain(&e))
}

/// Post-copy's threads on this side, parked until the switch.
struct PostcopyThreads {
    /// Reads the destination's messages (`postcopy_source::open_link_on`).
    reader: Parked,
    /// Answers the urgent channel's requests.
    urgent: Parked,
}

impl PostcopyThreads {
    fn start() -> Result<PostcopyThreads, String> {
        let urgent =
            Parked::spawn("postcopy-urgent").map_err(|e| format!("cannot start the post-copy urgent sender: {e}"))?;
        Ok(PostcopyThreads { reader: super::postcopy_source::reader_thread()?, urgent })
    }
}

/// A migration at the point of switching to post-copy.
struct Postcopy {
    stream: Box<dyn transport::Stream>,
    urgent: Option<Box<dyn transport::Stream>>,
    threads: PostcopyThreads,
    outgoing: Outgoing,
    rounds: Vec<Round>,
    start: Instant,
    /// Pre-copy rounds ran: only the pages dirtied since are needed (and discarded there).
    hybrid: bool,
    /// Hybrid that switched during round 0: the pages from this one on were never sent.
    unsent_from: Option<u64>,
}

/// A barrier: returns once the destination has applied everything sent so far.
fn sync(stream: &mut Box<dyn transport::Stream>) -> Result<(), String> {
    protocol::write_json(stream, Kind::Sync, &serde_json::json!({})).map_err(|e| chain(&e))?;
    let _: Answer = protocol::read_json(stream, Kind::Accept).map_err(|e| chain(&e))?;
    Ok(())
}

/// Stop-and-copy, before the pause: tells the destination which pages are resident here
/// (the ones that may come with data) and waits until it has allocated them.
fn populate_ahead(vm: &Vm, stream: &mut Box<dyn transport::Stream>) -> Result<(), String> {
    let t = Instant::now();
    let ranges = memory::resident_ranges(vm.ram());
    for chunk in memory::populate_messages(&ranges) {
        let populate = protocol::Missing { ranges: chunk };
        protocol::write_json(stream, Kind::Populate, &populate).map_err(|e| chain(&e))?;
        let _: Answer = protocol::read_json(stream, Kind::Accept).map_err(|e| chain(&e))?;
    }
    log::debug!("populate: the destination allocated {} ranges in {:?}", ranges.len(), t.elapsed());
    Ok(())
}

/// Hybrid, before the pause: tells the destination to drop the pages dirtied since they
/// were last sent and waits until it did; returns them.
fn predrop(vm: &Vm, stream: &mut Box<dyn transport::Stream>, map: &PageMap) -> Result<PageSet, String> {
    let dirty = vm.take_dirty().map_err(|e| chain(&e))?;
    let set = PageSet::from_bitmaps(map, &dirty);
    protocol::write_json(stream, Kind::Discard, &protocol::Missing { ranges: set.ranges(map) })
        .map_err(|e| chain(&e))?;
    let _: Answer = protocol::read_json(stream, Kind::Accept).map_err(|e| chain(&e))?;
    Ok(set)
}

/// Pauses the vCPUs, sends the switch and the machine state, and serves memory until the
/// destination has all of it.
fn postcopy(
    vm: &mut Vm,
    phase: Postcopy,
    reconnect: &super::postcopy_source::Reconnect,
    mode: Mode,
    progress: &mut dyn FnMut(serde_json::Value),
) -> Result<Report, Failed> {
    use super::postcopy_source::Failure;
    let Postcopy { mut stream, urgent, threads, mut outgoing, rounds, start, hybrid, unsent_from } = phase;
    let PostcopyThreads { reader, urgent: urgent_thread } = threads;
    let urgent = urgent.map(|stream| (stream, urgent_thread));
    let map = PageMap::new(vm.ram());
    // The destination is about to drop pages the cache holds copies of: a delta for one of
    // them would have nothing to go over (the device pages sent before the switch).
    outgoing.stop_deltas();
    // Hybrid: the destination drops what the last rounds left stale while the guest still
    // runs here; the switch then drops only what was dirtied since (a few pages).
    let dropped = if hybrid {
        // Twice: the first Discard waits behind whatever of the last round the socket
        // buffers still hold (a megabyte or more, milliseconds on a 1 Gbit/s link), and
        // meanwhile a dirtier rewrites its whole working set, which the switch would then
        // drop inside the downtime (64 MiB: about 1 ms more than a pure post-copy there).
        // The second one finds the connection drained and leaves a window of a round trip.
        match predrop(vm, &mut stream, &map).and_then(|first| {
            first.union(&predrop(vm, &mut stream, &map)?);
            Ok(first)
        }) {
            Ok(set) => set,
            Err(e) => {
                let _ = vm.set_dirty_logging(false);
                return Err(e.into());
            }
        }
    } else {
        PageSet::new(map.total())
    };
    // Never sent, so needed as well (the destination never received them). Before the
    // pause: a set bit per page.
    for index in unsent_from.unwrap_or(u64::MAX)..map.total() {
        dropped.insert(index);
    }
    // From here on the destination's messages are read by the link's own thread.
    let mut link = match super::postcopy_source::open_link_on(stream, reader) {
        Ok(link) => link,
        Err(e) => {
            let _ = vm.set_dirty_logging(false);
            return Err(e.into());
        }
    };
    if let Some((_, thread)) = &urgent {
        thread.wait_ready();
    }
    let paused = Instant::now();
    let paused_unix_ns = protocol::unix_ns();
    let vcpus = match vm.pause_all() {
        Ok(vcpus) => vcpus,
        Err(e) => {
            link.close();
            let _ = vm.set_dirty_logging(false);
            return Err(e.into());
        }
    };
    // SAFETY: the source's vCPUs stay paused from here on; a failure resumes them only
    // after this migration's senders (this one and the urgent sibling) are gone.
    unsafe { outgoing.guest_paused(vm.ram()) };
    let mut breakdown = Breakdown { pause: paused.elapsed().as_secs_f64() * 1e3, ..Default::default() };
    let lap = Instant::now();
    let switched = (|| -> Result<(PageSet, u64), String> {
        let needed = if hybrid {
            let dirty = vm.take_dirty().map_err(|e| chain(&e))?;
            PageSet::from_bitmaps(&map, &dirty)
        } else {
            PageSet::full(map.total())
        };
        let machine = vm.save_machine(vcpus).map_err(|e| chain(&e))?;
        // Pages the destination's own devices write while restoring (the guest's
        // generation word) go ahead of the state: the restore would otherwise wait a round
        // trip for them inside the downtime.
        for gpa in machine.devices.generation_gpa.into_iter() {
            if let Some(index) = map.index_of_gpa(gpa) {
                needed.remove(index);
                outgoing.queue(vm.ram(), map.gpa(index), true).map_err(|e| chain(&e))?;
            }
        }
        outgoing.flush(&mut link.stream).map_err(|e| chain(&e))?;
        let discard = if hybrid { needed.ranges(&map) } else { Vec::new() };
        // The pages dropped before the pause are needed too (the device pages were sent).
        needed.union(&dropped);
        for gpa in machine.devices.generation_gpa.into_iter() {
            if let Some(index) = map.index_of_gpa(gpa) {
                needed.remove(index);
            }
        }
        let state = machine.encode().map_err(|e| chain(&e))?;
        let state_crc32 = Some(crc32fast::hash(&state));
        let switch = protocol::Postcopy { discard, memory_crc32: outgoing.crc32(), state_crc32 };
        protocol::write_json(&mut link.stream, Kind::Postcopy, &switch).map_err(|e| chain(&e))?;
        protocol::write_frame(&mut link.stream, Kind::State, &state).map_err(|e| chain(&e))?;
        std::io::Write::flush(&mut link.stream).map_err(|e| e.to_string())?;
        Ok((needed, state.len() as u64))
    })();
    let (needed, state_bytes) = match switched {
        Ok(s) => s,
        Err(e) => {
            link.close();
            let _ = vm.set_dirty_logging(false);
            vm.resume_all();
            return Err(e.into());
        }
    };
    breakdown.state = lap.elapsed().as_secs_f64() * 1e3;
    // Dirty logging stays on until the VM would run here again: turning it off rewrites
    // the memory slot, which took 0.75-1.5 ms here for 1 GiB and stalled the rest of the
    // switch with it (hybrid over 1 Gbit/s: Running arrived just as it ended). The paused
    // guest dirties nothing meanwhile, and a VM that moved never runs here again.
    let pages_needed = needed.count();
    progress(serde_json::json!({"postcopy": "switched", "pages_needed": pages_needed}));
    let links = super::postcopy_source::Links { main: link, urgent };
    let outcome = match super::postcopy_source::serve(vm.ram(), links, needed, &mut outgoing, reconnect, progress) {
        Ok(outcome) => outcome,
        Err(Failure::VmHere(reason)) => {
            let _ = vm.set_dirty_logging(false);
            vm.resume_all();
            return Err(Failed { reason, vm_here: true });
        }
        Err(Failure::VmGone(reason)) => return Err(Failed { reason, vm_here: false }),
    };
    let downtime = outcome.running_at.duration_since(paused);
    // Running is stamped by the reader thread: it may arrive before this thread, off the
    // CPU after writing the state, stamped the state's end. The state then ends there.
    let downtime_ms = downtime.as_secs_f64() * 1e3;
    breakdown.state = breakdown.state.min(downtime_ms - breakdown.pause).max(0.0);
    breakdown.until_running = (downtime_ms - breakdown.pause - breakdown.state).max(0.0);
    let total = start.elapsed();
    let mut memory = outgoing.stats;
    memory.pages += outcome.urgent.pages;
    memory.zero_pages += outcome.urgent.zero_pages;
    memory.bytes_on_wire += outcome.urgent.bytes_on_wire;
    let bytes = memory.bytes_on_wire + state_bytes;
    Ok(Report {
        mode: mode.name(),
        rounds,
        final_pages: 0,
        converged: false,
        memory_verified: false,
        downtime_breakdown_ms: breakdown,
        to: reconnect.to.to_string(),
        encryption: encryption(),
        total_ms: total.as_secs_f64() * 1e3,
        downtime_ms,
        destination_restore_ms: outcome.running.restore_us as f64 / 1e3,
        downtime_by_events_ms: by_events(paused_unix_ns, &outcome.running),
        memory,
        state_bytes,
        bandwidth_mb_s: bytes as f64 / total.as_secs_f64().max(1e-9) / 1e6,
        vcpus: vm.config().vcpus,
        postcopy: Some(PostcopyReport {
            pages_needed,
            pages_requested_sent: outcome.requested_sent,
            pages_pushed: outcome.pushed,
            reconnects: outcome.reconnects,
            destination: outcome.done,
        }),
    })
}

/// How pre-copy's rounds end.
struct RoundLimits {
    downtime_limit_ms: f64,
    max_rounds: u32,
    auto_converge: bool,
    /// Hybrid: when to switch to post-copy besides `max_rounds`.
    switch: Option<Switch>,
    /// Bytes for the delta cache (`Outgoing::start_deltas`).
    delta_cache: u64,
}

#[derive(Clone, Copy, PartialEq)]
enum Switch {
    /// When the rounds stop converging, or when asked.
    WhenStuck,
    /// Only when asked (`migrate-postcopy`).
    WhenAsked,
}

/// Whether round `round`, with `pending` pages to send (taking `estimate_ms`), shows that
/// the guest outruns the link. Round 1 compares with round 0, which took `first_ms`: a
/// guest that re-dirtied in it what takes half as long again to send will not let the
/// rounds shrink fast (the 64 MiB dirtier re-dirties all of it: 1.0). Later rounds:
/// not shrinking by a tenth. Hybrid judges from round 1 (post-copy is its way out, and
/// each round of a dirtier costs as long as post-copy would take to move it);
/// auto-converge from round 4.
fn outrun(hybrid: bool, round: u32, (pending, last_pending): (u64, u64), (estimate_ms, first_ms): (f64, f64)) -> bool {
    match (hybrid, round) {
        (true, 1) => estimate_ms * 2.0 >= first_ms,
        (true, _) => pending.saturating_mul(10) > last_pending.saturating_mul(9),
        (false, r) => r >= 4 && pending.saturating_mul(10) > last_pending.saturating_mul(9),
    }
}

/// Part of every pause that does not depend on the pages left: stopping the vCPUs and
/// saving them, the state, the destination's restore and Running's way back (0.4-0.5 ms
/// on this project's test host, less on hardware KVM).
const FIXED_DOWNTIME_MS: f64 = 0.5;

/// Pages left that never call for another round (see `precopy`).
const FEW_PAGES: u64 = 64;

/// What the last pages may take of a downtime limit: the rest goes to the fixed part, but
/// the pages keep at least half. Without it, rounds of cheap deltas (1,500 pages a
/// millisecond) stopped with that many pages left for a 1 ms limit, and the downtime came
/// out at 1.3-2 ms.
fn page_budget_ms(limit_ms: f64) -> f64 {
    (limit_ms - FIXED_DOWNTIME_MS).max(limit_ms / 2.0)
}

/// Whether the guest dirtied `pending` pages again out of the `last_sent` the previous
/// round sent, so many (nine in ten) that the rounds will not shrink by themselves: then
/// the delta cache pays for filling it (a first touch of fresh memory per page, about
/// 1.4 us here, which a guest sharing a core with the sender turns into rounds twice as
/// long). When the rounds shrink anyway, they converge without it.
fn keeps_coming_back(pending: u64, last_sent: u64) -> bool {
    pending.saturating_mul(10) >= last_sent.saturating_mul(9)
}

/// Round 0 of hybrid is judged while it runs, from this long on: on a slow link, all of
/// RAM takes seconds, and a guest that re-dirties it faster is better moved in post-copy
/// at once (QEMU's postcopy-after-precopy is often started after a fixed 200 ms).
const ROUND_ZERO_JUDGE: Duration = Duration::from_millis(50);

/// Round 0: all of RAM. With `judge` (hybrid), every [`ROUND_ZERO_JUDGE`] it compares what
/// the guest dirtied since the round began with the data sent so far, and stops the round
/// when the first is at least half the second (the rule of round 1, see [`outrun`]).
/// Returns where it stopped (a `PageMap` index), if it did, and the pages dirtied.
fn round_zero(
    vm: &Vm,
    stream: &mut Box<dyn transport::Stream>,
    outgoing: &mut Outgoing,
    judge: bool,
) -> Result<(Option<u64>, u64), String> {
    let start = Instant::now();
    let mut next_look = start + ROUND_ZERO_JUDGE;
    let mut redirtied = 0;
    let mut stop = |sent: u64| {
        if !judge || Instant::now() < next_look {
            return false;
        }
        next_look = Instant::now() + ROUND_ZERO_JUDGE / 2;
        // Fetched and put back: the next fetch (here or in round 1) sees them again.
        let Ok(dirty) = vm.take_dirty() else { return false };
        vm.redirty(&dirty);
        redirtied = memory::count_dirty(&dirty);
        sent > 0 && redirtied * 2 >= sent
    };
    let covered = outgoing.send_all_until(vm.ram(), stream, &mut stop).map_err(|e| chain(&e))?;
    let total = PageMap::new(vm.ram()).total();
    Ok(((covered < total).then_some(covered), redirtied))
}

/// The pre-copy rounds while the guest runs. Returns whether it converged.
fn precopy(
    vm: &mut Vm,
    stream: &mut Box<dyn transport::Stream>,
    outgoing: &mut Outgoing,
    rounds: &mut Vec<Round>,
    limits: RoundLimits,
    progress: &mut dyn FnMut(serde_json::Value),
) -> Result<RoundsEnd, String> {
    let RoundLimits { downtime_limit_ms, max_rounds, auto_converge, switch, delta_cache } = limits;
    let hybrid = switch.is_some();
    let budget_ms = page_budget_ms(downtime_limit_ms);
    // Hybrid switches by itself when the rounds stop converging (not with --manual-switch).
    let judge = switch == Some(Switch::WhenStuck);
    vm.set_dirty_logging(true).map_err(|e| chain(&e))?;
    // Only with auto-converge; stopped (vCPUs back to full speed) when this function
    // returns, before the pause.
    let throttle = auto_converge.then(|| vm.throttle());
    let mut throttle_percent = 0;
    let mut last_pending = u64::MAX;
    // Start from a clean slate: everything written from now on is dirty.
    vm.take_dirty().map_err(|e| chain(&e))?;
    // Plain pre-copy caches round 0's data pages: a guest that keeps writing a working set
    // then sends it again in round 1 as deltas, not whole (the 64 MiB dirtier's round 1
    // took 84-100 ms whole over loopback here, 10-17 ms as deltas). Round 1 keeps only
    // what the guest wrote again.
    // Hybrid goes without: a guest that outruns the rounds moves in post-copy instead.
    let precached = !hybrid && delta_cache > 0;
    if precached {
        outgoing.start_deltas(vm.ram(), delta_cache);
    }
    let t = Instant::now();
    let (unsent_from, redirtied) = round_zero(vm, stream, outgoing, judge)?;
    let first = t.elapsed().as_secs_f64();
    let mb_s = outgoing.stats.bytes_on_wire as f64 / first.max(1e-6) / 1e6;
    // The estimates count pages, not bytes: in later rounds a page sent again may go as a
    // delta of a few bytes, and what it costs is then mostly per page. Round 0's pace is
    // that of its data pages (zero and untouched ones cost next to nothing).
    let mut page_rate = (outgoing.stats.pages - outgoing.stats.zero_pages).max(1) as f64 / first.max(1e-6);
    rounds.push(Round { round: 0, pages: outgoing.stats.pages, ms: first * 1e3, mb_s });
    progress(serde_json::json!({"round": 0, "pages": outgoing.stats.pages, "ms": first * 1e3, "mb_s": mb_s}));
    if unsent_from.is_some() {
        let why = "the rounds stopped converging";
        progress(serde_json::json!({"round": 0, "pending_pages": redirtied, "switch_to_postcopy": why}));
        return Ok(RoundsEnd::Switch { unsent_from });
    }
    // Deltas start once the rounds stop shrinking (see `keeps_coming_back`); round 0's
    // data pages are what round 1 is compared with.
    let mut last_sent = outgoing.stats.pages - outgoing.stats.zero_pages;
    let mut deltas = false;
    // Sent since the last barrier (round 0 was).
    let mut unsynced = true;
    let (mut rounds_pages, mut rounds_secs) = (0.0, 0.0);
    for round in 1..=max_rounds {
        let mut dirty = vm.take_dirty().map_err(|e| chain(&e))?;
        let mut pending = memory::count_dirty(&dirty);
        let mut estimate_ms = pending as f64 / page_rate * 1e3;
        // Under the budget but still shrinking by half or more a round (rounds of deltas
        // take a millisecond or two): one more round leaves fewer pages to the pause, for
        // little total time. The 64 MiB dirtier's downtime in a 1 GiB guest was 1.1-1.3 ms
        // with 1,000-1,500 pages left, against QEMU's 1.6-1.8 ms. A few pages go in the
        // pause whatever the estimate (round 0's pace, mostly zero pages, makes little of
        // an idle guest's handful look slow).
        let shrinking =
            pending.saturating_mul(2) < last_pending && estimate_ms > budget_ms / 10.0 && pending > FEW_PAGES;
        let mut converged = estimate_ms <= budget_ms && !shrinking;
        if converged && unsynced {
            // The destination may still be applying earlier rounds (its socket buffers
            // hold megabytes, the first round is all of RAM): it catches up first, or that
            // work falls inside the downtime (the state waits behind it: 0.5-1 ms more
            // after the 64 MiB dirtier's last rounds of deltas); then what the guest
            // dirtied meanwhile is looked at again. Only here, before the pause: a barrier
            // every round would slow every round by a round trip.
            unsynced = false;
            sync(stream)?;
            vm.redirty(&dirty);
            dirty = vm.take_dirty().map_err(|e| chain(&e))?;
            pending = memory::count_dirty(&dirty);
            estimate_ms = pending as f64 / page_rate * 1e3;
            converged = estimate_ms <= budget_ms;
        }
        if converged {
            // Converged: these pages go again in the final round, with the vCPUs paused
            // (the dirty log keeps them: put them back by marking nothing as sent).
            vm.redirty(&dirty);
            progress(
                serde_json::json!({"round": round, "pending_pages": pending, "estimate_ms": estimate_ms, "converged": true}),
            );
            return Ok(RoundsEnd::Converged);
        }
        // A guest that outruns the link: hybrid switches to post-copy, auto-converge slows
        // the guest down step by step.
        let outrun = outrun(hybrid, round, (pending, last_pending), (estimate_ms, first * 1e3));
        let asked = SWITCH_TO_POSTCOPY.load(std::sync::atomic::Ordering::SeqCst);
        let stuck = outrun && judge;
        if hybrid && (stuck || asked) {
            // These pages were not sent this round: they are what post-copy must move.
            vm.redirty(&dirty);
            let why = if asked { "asked to (migrate-postcopy)" } else { "the rounds stopped converging" };
            progress(serde_json::json!({"round": round, "pending_pages": pending, "switch_to_postcopy": why}));
            return Ok(RoundsEnd::Switch { unsent_from: None });
        }
        if let (Some(throttle), true) = (&throttle, outrun && throttle_percent < 90) {
            throttle_percent = (throttle_percent + 20).min(90);
            throttle.set(throttle_percent);
            progress(serde_json::json!({"round": round, "throttle_percent": throttle_percent}));
        }
        last_pending = pending;
        if round == 1 && precached {
            // Round 0's copies of the pages written again stay; the others' slots go to the
            // pages sent from now on, with no fresh memory to touch (what made deltas wait
            // for the rounds to stop shrinking, see `keeps_coming_back`). A working set
            // past the cache's first `delta_cache` bytes of data is cached as it goes.
            let cached = outgoing.keep_cached(vm.ram(), &dirty);
            deltas = true;
            progress(serde_json::json!({"round": round, "deltas": "from now on pages sent again go as deltas",
                "cached_pages": cached}));
        } else if !deltas && delta_cache > 0 && keeps_coming_back(pending, last_sent) {
            outgoing.start_deltas(vm.ram(), delta_cache);
            deltas = true;
            progress(serde_json::json!({"round": round, "deltas": "from now on pages sent again go as deltas"}));
        }
        let before = outgoing.stats.bytes_on_wire;
        let t = Instant::now();
        let sent = outgoing.send_dirty(vm.ram(), &dirty, stream).map_err(|e| chain(&e))?;
        last_sent = sent;
        unsynced |= sent > 0;
        let secs = t.elapsed().as_secs_f64().max(1e-6);
        let mb_s = (outgoing.stats.bytes_on_wire - before) as f64 / secs / 1e6;
        (rounds_pages, rounds_secs) = (rounds_pages + sent as f64, rounds_secs + secs);
        // A small round fits in the socket buffers and seems to go at memcpy speed (8 GB/s
        // here, against 2-3 GB/s that reach the destination), which would let too many
        // pages into the downtime. The rate over all rounds so far damps that.
        page_rate = (sent.max(1) as f64 / secs).min(rounds_pages.max(1.0) / rounds_secs);
        rounds.push(Round { round, pages: sent, ms: secs * 1e3, mb_s });
        progress(serde_json::json!({"round": round, "pages": sent, "ms": secs * 1e3, "mb_s": mb_s,
            "delta_pages": outgoing.stats.delta_pages, "estimate_ms": estimate_ms}));
    }
    if hybrid {
        progress(
            serde_json::json!({"converged": false, "switch_to_postcopy": format!("not under {downtime_limit_ms} ms after {max_rounds} rounds")}),
        );
        return Ok(RoundsEnd::Switch { unsent_from: None });
    }
    progress(
        serde_json::json!({"converged": false, "note": format!("not under {downtime_limit_ms} ms after {max_rounds} rounds: stopping and copying the rest")}),
    );
    Ok(RoundsEnd::GaveUp)
}

/// Connects to a destination (or its urgent channel, or again after a broken post-copy
/// link) and, with a key, proves we hold it.
pub fn dial(to: &Address, key: Option<&super::auth::Key>) -> Result<Box<dyn transport::Stream>, String> {
    let mut stream = transport::connect(to).map_err(|e| chain(&e))?;
    stream.set_timeout(PEER_TIMEOUT).map_err(|e| e.to_string())?;
    if let Some(key) = key {
        super::auth::prove_source(&mut stream, key)?;
    }
    Ok(stream)
}

/// "outer: inner: innermost".
pub fn chain(e: &dyn std::error::Error) -> String {
    crate::error_chain(e)
}

#[cfg(test)]
mod tests {
    use super::{outrun, page_budget_ms};

    #[test]
    fn hybrid_judges_round_one_against_round_zero() {
        // The 64 MiB dirtier: round 0 took 58 ms, all of it is dirty again (35 ms to send).
        assert!(outrun(true, 1, (16_385, u64::MAX), (35.0, 58.0)));
        // An idle guest: a few pages.
        assert!(!outrun(true, 1, (3, u64::MAX), (0.01, 0.5)));
        // Auto-converge does not judge round 1.
        assert!(!outrun(false, 1, (16_385, u64::MAX), (35.0, 58.0)));
    }

    #[test]
    fn the_last_pages_get_what_the_fixed_part_of_a_pause_leaves() {
        assert_eq!(page_budget_ms(1.0), 0.5);
        assert_eq!(page_budget_ms(300.0), 299.5);
        assert_eq!(page_budget_ms(0.6), 0.3, "at least half");
        assert_eq!(page_budget_ms(0.0), 0.0);
    }

    #[test]
    fn deltas_start_when_the_guest_dirties_nearly_all_it_was_sent() {
        // The 64 MiB dirtier sharing no core with the sender: all of it again.
        assert!(super::keeps_coming_back(16_385, 16_400));
        // Sharing one: three quarters, and the rounds shrink without deltas.
        assert!(!super::keeps_coming_back(12_501, 16_400));
        assert!(super::keeps_coming_back(12_884, 13_494));
        // An idle guest: a few pages of hundreds.
        assert!(!super::keeps_coming_back(3, 300));
    }

    #[test]
    fn later_rounds_must_shrink_by_a_tenth() {
        assert!(outrun(true, 2, (950, 1_000), (1.0, 58.0)));
        assert!(!outrun(true, 2, (850, 1_000), (1.0, 58.0)));
        assert!(!outrun(false, 3, (1_000, 1_000), (1.0, 58.0)));
        assert!(outrun(false, 4, (1_000, 1_000), (1.0, 58.0)));
    }
}
