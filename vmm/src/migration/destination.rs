//! The receiving side: accept one source, check the VM fits here, build an empty VM,
//! fill it with the machine state and memory, and hand it back ready to run. Nothing is
//! run from partial state: any failure before the VM starts discards it.

use super::memory;
use super::pages::PageMap;
use super::postcopy_destination::{drop_pages, Ahead, Postcopy, Recovery};
use super::protocol::{self, Answer, Hello, Kind};
use super::source::chain;
use super::state::MachineState;
use super::transport::{self, Address, LowWater, Stream};
use crate::config::{BootMode, Kernel, VmConfig};
use crate::trap::msr::UnknownMsrPolicy;
use crate::vm::{IncomingRam, Vm};
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// A received VM, not yet running, and the connection to confirm on.
pub struct Incoming {
    pub vm: Vm,
    pub link: Link,
    /// When the first state byte arrived (the destination's share of the downtime starts).
    pub state_arrived: Instant,
    /// Prepared RAM's staging mapping, still mapped: unmapping 1 GiB of populated page
    /// tables takes ~80 ms here, so the caller keeps it while the VM runs instead of
    /// letting the downtime pay for it.
    pub staging: Option<std::sync::Arc<crate::memory::Prepared>>,
    /// The receive buffers (a frame, up to 4 MiB, and the one compressed frames decompress
    /// into): freeing one unmaps its pages, ~0.5 ms here, so they too go after the vCPUs run.
    pub buffers: [Vec<u8>; 2],
    /// A migration that could have switched to post-copy and did not: the threads made
    /// for it, to end after the vCPUs run (three threads ending and unmapping their
    /// stacks took 2-4 ms of the downtime here, now and then).
    pub unused: Option<Ahead>,
    /// The listening socket of a migration that completed (post-copy keeps it to take the
    /// source back after a broken link): closing a TCP listener took 12-15 us of the
    /// downtime here, so it too goes after the vCPUs run.
    pub listener: Option<transport::Listener>,
}

/// Where the destination confirms Running.
pub enum Link {
    /// All of memory is here: the plain connection.
    Complete(Box<dyn Stream>),
    /// Memory is still arriving (post-copy).
    Postcopy(Postcopy),
}

impl Link {
    /// Tells the source the VM runs here.
    pub fn confirm_running(&mut self, running: &protocol::Running) -> Result<(), String> {
        match self {
            Link::Complete(stream) => protocol::write_json(stream, Kind::Running, running).map_err(|e| chain(&e)),
            Link::Postcopy(p) => p.confirm_running(running),
        }
    }
}

/// What the source sent before the VM could start.
enum Received {
    /// Everything (stop-copy, pre-copy), and the state already restored into the VM (it
    /// arrived at the `Instant`).
    Complete(Instant),
    /// The state and the switch to post-copy: memory follows while the VM runs.
    Postcopy {
        machine: Box<MachineState>,
        arrived: Instant,
        switch: protocol::Postcopy,
        arrived_pages: Option<memory::Arrived>,
    },
}

fn refuse(stream: &mut dyn Stream, reason: &str) {
    let _ = protocol::write_json(&mut WriteAdapter(stream), Kind::Refuse, &Answer { reason: reason.into() });
}

/// `&mut dyn Stream` as an `impl Write` (the protocol functions are generic).
struct WriteAdapter<'a>(&'a mut dyn Stream);

impl Write for WriteAdapter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Memory frames (any number of rounds), the State, then Complete with the checksum; or,
/// for post-copy, the Postcopy switch and the State. A State without a switch is restored
/// at once, while the last pages still arrive (the restore writes nothing to RAM); the
/// VM does not run before Complete has checked both checksums.
fn receive_memory_and_state(
    vm: &mut Vm,
    stream: &mut Box<dyn Stream>,
    prepared: Option<std::sync::Arc<crate::memory::Prepared>>,
    buffers: &mut [Vec<u8>; 2],
) -> Result<Received, String> {
    let mut incoming = match prepared {
        Some(p) => memory::Incoming::into_prepared(p),
        None => memory::Incoming::default(),
    };
    let [payload, unpacked] = buffers;
    let mut restored = None;
    let mut switch = None;
    let mut state_crc32 = None;
    // Memory frames are read in bulk (see `LowWater`); the mark is back to 1 on return.
    let mut stream = LowWater::new(stream.as_mut());
    let stream = &mut stream;
    loop {
        let (kind, len) = protocol::read_header(stream).map_err(|e| chain(&e))?;
        if kind == Kind::Memory {
            // Page data straight from the socket into RAM, not through `payload`.
            incoming.read_memory(vm.ram(), stream, len).map_err(|e| chain(&e))?;
            continue;
        }
        protocol::read_payload(stream, len, payload).map_err(|e| chain(&e))?;
        match kind {
            Kind::Sync => {
                protocol::write_json(stream, Kind::Accept, &Answer { reason: String::new() }).map_err(|e| chain(&e))?;
            }
            Kind::Discard => {
                let discard: protocol::Missing =
                    serde_json::from_slice(payload).map_err(|e| format!("malformed Discard message: {e}"))?;
                incoming.forget(vm.ram(), &discard.ranges).map_err(|e| chain(&e))?;
                drop_pages(&PageMap::new(vm.ram()), &discard.ranges)?;
                protocol::write_json(stream, Kind::Accept, &Answer { reason: String::new() }).map_err(|e| chain(&e))?;
            }
            Kind::Populate => {
                let populate: protocol::Missing =
                    serde_json::from_slice(payload).map_err(|e| format!("malformed Populate message: {e}"))?;
                incoming.populate(vm.ram(), &populate.ranges).map_err(|e| chain(&e))?;
                protocol::write_json(stream, Kind::Accept, &Answer { reason: String::new() }).map_err(|e| chain(&e))?;
            }
            Kind::MemoryLz4 => incoming.compressed_memory(vm.ram(), payload).map_err(|e| chain(&e))?,
            Kind::Postcopy => {
                let postcopy: protocol::Postcopy =
                    serde_json::from_slice(payload).map_err(|e| format!("malformed Postcopy message: {e}"))?;
                incoming.check_crc32(postcopy.memory_crc32).map_err(|e| chain(&e))?;
                switch = Some(postcopy);
            }
            Kind::State => {
                let t = Instant::now();
                state_crc32 = Some(crc32fast::hash(payload));
                let state = MachineState::decode(payload).map_err(|e| chain(&e))?;
                log::debug!("incoming: state of {} bytes parsed in {:?}", payload.len(), t.elapsed());
                if let Some(switch) = switch.take() {
                    check_state(switch.state_crc32, state_crc32)?;
                    let arrived_pages = incoming.take_arrived();
                    *unpacked = incoming.release_buffers();
                    return Ok(Received::Postcopy {
                        machine: Box::new(state),
                        arrived: Instant::now(),
                        switch,
                        arrived_pages,
                    });
                }
                let arrived = Instant::now();
                vm.restore_machine(&state).map_err(|e| format!("restoring the VM failed: {}", chain(&e)))?;
                log::debug!("incoming: state restored in {:?}", arrived.elapsed());
                restored = Some(arrived);
            }
            Kind::Complete => {
                if let Some(at) = &restored {
                    log::debug!("incoming: Complete {:?} after the state", at.elapsed());
                }
                let complete: protocol::Complete =
                    serde_json::from_slice(payload).map_err(|e| format!("malformed Complete message: {e}"))?;
                incoming.complete(vm.ram(), &complete).map_err(|e| chain(&e))?;
                check_state(complete.state_crc32, state_crc32)?;
                log::debug!("received {} pages, {} bytes", incoming.stats.pages, incoming.stats.bytes_on_wire);
                let arrived =
                    restored.ok_or_else(|| "the source completed without sending the machine state".to_string())?;
                *unpacked = incoming.release_buffers();
                return Ok(Received::Complete(arrived));
            }
            Kind::Refuse => return Err("the source aborted the migration".into()),
            other => return Err(format!("unexpected {other:?} message during the transfer")),
        }
    }
}

/// The state that arrived must be the state the source sent.
fn check_state(sent: Option<u32>, received: Option<u32>) -> Result<(), String> {
    match (sent, received) {
        (Some(a), Some(b)) if a == b => Ok(()),
        (Some(a), Some(b)) => Err(format!("machine state checksum mismatch: received {b:#x}, the source sent {a:#x}")),
        _ => Err("the source sent no checksum for the machine state".into()),
    }
}

/// Takes the source's second connection, the urgent channel of a post-copy (opened right
/// after Accept, so a short wait suffices).
fn accept_urgent(
    listener: &transport::Listener,
    auth_key: Option<&super::auth::Key>,
    migration_id: u64,
) -> Result<Box<dyn Stream>, String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut urgent = listener.accept(Some(deadline)).map_err(|e| format!("no urgent channel: {}", chain(&e)))?;
    urgent.set_timeout(Duration::from_secs(30)).map_err(|e| e.to_string())?;
    let mut first = protocol::read_frame(&mut urgent).map_err(|e| chain(&e))?;
    if let Some(key) = auth_key {
        super::auth::verify_source(&mut urgent, key, first)?;
        first = protocol::read_frame(&mut urgent).map_err(|e| chain(&e))?;
    }
    let id: protocol::Resume = match first {
        (Kind::Urgent, payload) => serde_json::from_slice(&payload).map_err(|e| format!("malformed Urgent: {e}"))?,
        (other, _) => return Err(format!("expected the urgent channel, got {other:?}")),
    };
    if id.migration_id != migration_id {
        return Err("the urgent channel belongs to another migration".into());
    }
    protocol::write_json(&mut urgent, Kind::Accept, &Answer { reason: String::new() }).map_err(|e| chain(&e))?;
    Ok(urgent)
}

/// Waits for a source on `address` and receives its VM. `recover_timeout`: in post-copy,
/// how long to wait for the source to come back after a broken link.
pub fn receive(
    address: &Address,
    kvm_device: PathBuf,
    auth_key: Option<&super::auth::Key>,
    console: Box<dyn Write + Send>,
    (recover_timeout, prepared): (Duration, Option<std::sync::Arc<crate::memory::Prepared>>),
) -> Result<Incoming, String> {
    let listener = transport::Listener::bind(address).map_err(|e| chain(&e))?;
    // The threads a migration here needs (vCPU 0's, and post-copy's should the source
    // ask) start while the source has yet to come: started after its Hello, one of them
    // waited 3-4 ms for a core in half the runs here, a busy source guest's vCPU holding
    // the other (a new thread does not preempt it before its time slice ends).
    let vcpu0 = crate::vcpu::Vcpu::thread_ahead(0).map_err(|e| chain(&e))?;
    let postcopy_threads = Ahead::threads()?;
    let mut stream = listener.accept(None).map_err(|e| chain(&e))?;
    stream.set_timeout(Duration::from_secs(30)).map_err(|e| e.to_string())?;
    let first = protocol::read_frame(&mut stream).map_err(|e| chain(&e))?;
    let first = match auth_key {
        Some(key) => {
            if let Err(reason) = super::auth::verify_source(&mut stream, key, first) {
                refuse(stream.as_mut(), &reason);
                return Err(reason);
            }
            protocol::read_frame(&mut stream).map_err(|e| chain(&e))?
        }
        None if first.0 == Kind::Auth => {
            let reason = "the source wants to authenticate but this destination has no --auth-key".to_string();
            refuse(stream.as_mut(), &reason);
            return Err(reason);
        }
        None => first,
    };
    if first.0 != Kind::Hello {
        let reason = format!("expected a Hello message, got {:?}", first.0);
        refuse(stream.as_mut(), &reason);
        return Err(reason);
    }
    let hello: Hello = serde_json::from_slice(&first.1).map_err(|e| format!("malformed Hello message: {e}"))?;
    let config = VmConfig {
        memory_bytes: hello.memory_bytes,
        vcpus: hello.vcpus,
        kernel: Kernel::Bundled,
        cmdline: String::new(),
        initrd: None,
        boot: if hello.firmware { BootMode::Firmware } else { BootMode::Direct },
        kvm_device,
        msr_policy: if hello.msr_policy_zero { UnknownMsrPolicy::Zero } else { UnknownMsrPolicy::Gp },
        trace_exits: None,
        audit: None,
        auth_key: auth_key.cloned(),
    };
    if let Err(e) = config.validate() {
        let reason = format!("this destination cannot host the VM: {e}");
        refuse(stream.as_mut(), &reason);
        return Err(reason);
    }
    let ram = match &prepared {
        Some(p) if p.size() != hello.memory_bytes => {
            let reason = format!(
                "this destination prepared {} bytes of RAM (--prealloc --memory), the VM has {}: start it with --memory {}",
                p.size(),
                hello.memory_bytes,
                hello.memory_bytes
            );
            refuse(stream.as_mut(), &reason);
            return Err(reason);
        }
        Some(p) => IncomingRam::Prepared(p.ram.clone()),
        None => IncomingRam::Anonymous,
    };
    let mut vm = match Vm::new_incoming(&config, console, ram) {
        Ok(vm) => vm,
        Err(e) => {
            let reason = format!("this destination cannot build the VM: {}", chain(&e));
            refuse(stream.as_mut(), &reason);
            return Err(reason);
        }
    };
    if let (Some(there), Some(here)) = (hello.tsc_khz, vm.tsc_khz()) {
        // A guest's TSC must keep its frequency: scale it here, or refuse.
        if there.abs_diff(here) > here / 1000 {
            if let Err(why) = vm.set_tsc_khz(there) {
                let reason = format!("the source's TSC runs at {there} kHz and this host's at {here} kHz, and {why}: migrate between hosts with the same TSC frequency");
                refuse(stream.as_mut(), &reason);
                return Err(reason);
            }
        }
    }
    match vm.cpuid_crc32() {
        Ok(here) if here == hello.cpuid_crc32 => {}
        Ok(_) => {
            let reason = "this host's CPU features (KVM_GET_SUPPORTED_CPUID) differ from the source's: the guest may already use a feature it would lose here; migrate between hosts of the same CPU model and kernel".to_string();
            refuse(stream.as_mut(), &reason);
            return Err(reason);
        }
        Err(e) => {
            let reason = format!("cannot read this host's CPUID: {}", chain(&e));
            refuse(stream.as_mut(), &reason);
            return Err(reason);
        }
    }
    // A migration that may switch to post-copy needs userfaultfd here: checked (and its
    // threads made) before Accept, so that a host without it says so up front.
    let ahead = match hello.postcopy.then(|| Ahead::new(vm.ram(), prepared.is_some(), postcopy_threads)).transpose() {
        Ok(ahead) => ahead,
        Err(e) => {
            let reason = format!(
                "this destination cannot take a post-copy or hybrid migration: {e}; use --mode precopy or stop-copy"
            );
            refuse(stream.as_mut(), &reason);
            return Err(reason);
        }
    };
    // The vCPU threads too: made now, they only need their vCPUs once it runs here.
    if let Err(e) = vm.make_vcpu_threads_ahead(Some(vcpu0)) {
        let reason = format!("this destination cannot start vCPU threads: {}", chain(&e));
        refuse(stream.as_mut(), &reason);
        return Err(reason);
    }
    protocol::write_json(&mut stream, Kind::Accept, &Answer { reason: String::new() }).map_err(|e| chain(&e))?;
    let urgent = if hello.postcopy {
        match accept_urgent(&listener, auth_key, hello.migration_id) {
            Ok(urgent) => Some(urgent),
            Err(reason) => {
                refuse(stream.as_mut(), &reason);
                return Err(reason);
            }
        }
    } else {
        None
    };
    // Without post-copy, prepared RAM is filled through its second mapping; a migration
    // that may switch fills the guest's own mapping, so that what pre-copy delivered is
    // mapped before userfaultfd watches it.
    let fill_prepared = if hello.postcopy { None } else { prepared.clone() };
    let mut buffers = [Vec::new(), Vec::new()];
    let received = match receive_memory_and_state(&mut vm, &mut stream, fill_prepared, &mut buffers) {
        Ok(received) => received,
        Err(reason) => {
            refuse(stream.as_mut(), &reason);
            return Err(reason);
        }
    };
    let (machine, state_arrived, link, unused, listener) = match received {
        Received::Complete(arrived) => (None, arrived, Link::Complete(stream), ahead, Some(listener)),
        Received::Postcopy { machine, arrived, switch, arrived_pages } => {
            // RAM is registered with userfaultfd before the restore below or any vCPU can
            // touch it: a page touched first would read as zero and could not be filled.
            let recovery = Recovery {
                listener,
                address: address.clone(),
                auth_key: auth_key.cloned(),
                migration_id: hello.migration_id,
                timeout: recover_timeout,
            };
            let mut spare = stream.try_clone_stream().map_err(|e| e.to_string())?;
            let links = (stream, urgent);
            let started = match ahead {
                Some(ahead) => {
                    let ready = (recovery, ahead);
                    Postcopy::start(vm.ram(), links, arrived_pages, (&switch.discard, prepared.clone()), ready)
                }
                None => Err("the source switched to post-copy without announcing it in Hello".into()),
            };
            match started {
                Ok(postcopy) => {
                    log::debug!("incoming: post-copy started {:?} after the state arrived", arrived.elapsed());
                    (Some(machine), arrived, Link::Postcopy(postcopy), None, None)
                }
                Err(reason) => {
                    refuse(spare.as_mut(), &reason);
                    return Err(reason);
                }
            }
        }
    };
    if let Some(machine) = machine {
        log::debug!("incoming: restoring {:?} after the state arrived", state_arrived.elapsed());
        if let Err(e) = vm.restore_machine(&machine) {
            // In post-copy, this process ends and the source sees the link drop before
            // Running: it resumes the VM.
            return Err(format!("restoring the VM failed: {}", chain(&e)));
        }
    }
    vm.publish_generation();
    Ok(Incoming { vm, link, state_arrived, staging: prepared, buffers, unused, listener })
}
