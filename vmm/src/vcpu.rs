//! One thread per vCPU: the KVM_RUN loop. Each exit goes to the bus that owns the port or
//! address; anything that ends the VM is reported to the VM's thread as a [`VmExit`].
//! The loop knows nothing of devices beyond the two buses.

use crate::arch::x86_64::{cpuid, regs};
use crate::boot::Entry;
use crate::devices::{Bus, VmRequest};
use crate::parked::Parked;
use crate::trap::exits::{ExitKind, Recorder};
use crate::trap::msr::MsrEmulation;
use kvm_bindings::CpuId;
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex};

/// vCPU set-up errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// KVM_CREATE_VCPU failed.
    #[error("Cannot create vCPU {id}")]
    Create {
        id: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM_SET_CPUID2 failed.
    #[error("Cannot set the CPUID of vCPU {id}")]
    Cpuid {
        id: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Register set-up failed.
    #[error(transparent)]
    Registers(#[from] regs::Error),
    /// The thread could not be started.
    #[error("Cannot start the thread of vCPU {id}")]
    Thread {
        id: u32,
        #[source]
        source: std::io::Error,
    },
}

/// What a vCPU hands its exits to: the two buses, the MSR emulation, and the recorder
/// that counts every exit.
pub struct Handlers {
    pub pio: Bus,
    pub mmio: Bus,
    pub msrs: MsrEmulation,
    pub recorder: Arc<Recorder>,
    /// Single-step audit of vCPU 0, when asked for.
    pub audit: Option<crate::trap::audit::Audit>,
    /// The host has KVM_CAP_SYNC_REGS for registers, special registers and events
    /// (delivered in `kvm_run`).
    pub sync_regs: bool,
    /// KVM's list of MSRs to save (read once, used by every pause).
    pub msr_indexes: Vec<u32>,
    /// Where paused vCPUs report their state.
    pub paused: Mutex<Sender<PausedReport>>,
}

/// Kind, target (port, address, MSR) and access size of an exit, for the recorder.
fn describe(exit: &VcpuExit) -> (ExitKind, Option<u64>, usize) {
    match exit {
        VcpuExit::IoIn(port, data) => (ExitKind::IoIn, Some(u64::from(*port)), data.len()),
        VcpuExit::IoOut(port, data) => (ExitKind::IoOut, Some(u64::from(*port)), data.len()),
        VcpuExit::MmioRead(addr, data) => (ExitKind::MmioRead, Some(*addr), data.len()),
        VcpuExit::MmioWrite(addr, data) => (ExitKind::MmioWrite, Some(*addr), data.len()),
        VcpuExit::X86Rdmsr(m) => (ExitKind::Rdmsr, Some(u64::from(m.index)), 8),
        VcpuExit::X86Wrmsr(m) => (ExitKind::Wrmsr, Some(u64::from(m.index)), 8),
        VcpuExit::Hlt => (ExitKind::Hlt, None, 0),
        VcpuExit::Debug(_) => (ExitKind::Debug, None, 0),
        VcpuExit::Shutdown => (ExitKind::Shutdown, None, 0),
        VcpuExit::FailEntry(..) => (ExitKind::FailEntry, None, 0),
        VcpuExit::InternalError => (ExitKind::InternalError, None, 0),
        VcpuExit::SystemEvent(..) => (ExitKind::SystemEvent, None, 0),
        VcpuExit::Intr => (ExitKind::Interrupted, None, 0),
        _ => (ExitKind::Other, None, 0),
    }
}

/// Why a VM stopped running (the first of these any vCPU reports ends the run).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest wrote `status` to the exit port.
    Guest(u8),
    /// The guest asked for a reset; Popek stops rather than reboots.
    Reset,
    /// The guest ended in a way the VMM must report, with a register dump.
    Fault(Fault),
    /// The vCPU thread was told to stop (the VM moved to another host).
    Stopped,
    /// The VM now runs on another host; the report, as JSON.
    Migrated(String),
    /// A post-copy migration lost its link for good after the destination started the
    /// VM: it is neither here nor whole there.
    MigrationLost(String),
}

/// What the VM wants a vCPU thread to do; checked before every KVM_RUN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Wanted {
    Run,
    /// Complete in-flight I/O, save the state, report it, and wait.
    Pause,
    /// End the thread (after a migration).
    Stop,
    /// Sleep without saving anything: pre-copy's throttle slows a guest that dirties
    /// memory faster than the link carries it.
    Stall,
}

/// How the VM steers one vCPU thread from outside. The vCPU reads `wanted` before every
/// KVM_RUN (an atomic load on the exit path); the lock and condvar are only for waiting.
pub struct VcpuControl {
    wanted: std::sync::atomic::AtomicU8,
    lock: Mutex<()>,
    changed: Condvar,
}

impl Default for VcpuControl {
    fn default() -> Self {
        VcpuControl {
            wanted: std::sync::atomic::AtomicU8::new(Wanted::Run as u8),
            lock: Mutex::new(()),
            changed: Condvar::new(),
        }
    }
}

impl VcpuControl {
    pub fn set(&self, wanted: Wanted) {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.wanted.store(wanted as u8, std::sync::atomic::Ordering::SeqCst);
        self.changed.notify_all();
    }

    pub fn get(&self) -> Wanted {
        match self.wanted.load(std::sync::atomic::Ordering::SeqCst) {
            x if x == Wanted::Pause as u8 => Wanted::Pause,
            x if x == Wanted::Stop as u8 => Wanted::Stop,
            x if x == Wanted::Stall as u8 => Wanted::Stall,
            _ => Wanted::Run,
        }
    }

    fn wait_while(&self, state: Wanted) {
        let mut guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        while self.get() == state {
            guard = self.changed.wait(guard).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// What a paused vCPU reports: its id and its saved state.
/// Boxed: a channel allocates its slots in blocks of 31, and with a 6 KiB state in each
/// the first report of a pause allocated a 180 KiB block, mapped and faulted in inside the
/// downtime (~0.1 ms measured on a 1 GiB VM).
pub type PausedReport = (u32, Result<Box<crate::migration::state::VcpuState>, String>);

/// A VM ending the guest did not ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub vcpu: u32,
    pub kind: FaultKind,
    /// One line on what happened.
    pub detail: String,
    /// Registers at the time, a few lines.
    pub dump: String,
}

/// Kinds of [`Fault`], each with its own exit code in `main`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// KVM_EXIT_SHUTDOWN: a triple fault (or a shutdown cycle).
    TripleFault,
    /// KVM_EXIT_FAIL_ENTRY: the hardware refused to enter the guest.
    FailEntry,
    /// KVM_EXIT_INTERNAL_ERROR, e.g. an instruction KVM cannot emulate.
    Emulation,
    /// A KVM system event (crash, or shutdown/reset by a paravirtual path).
    SystemEvent,
    /// Anything else: an unexpected exit kind or a KVM_RUN error.
    Other,
}

/// A created and configured vCPU, ready to run on its own thread.
pub struct Vcpu {
    id: u32,
    fd: VcpuFd,
    /// What this vCPU held when it was made, for a migration's restore into it (taken by
    /// the restore: it is stale after).
    fresh: Option<crate::migration::state::FreshParts>,
}

impl Vcpu {
    /// Creates vCPU `id` of `count` with its CPUID, FPU, MSRs and LAPIC LINT pins set.
    /// Application processors stay in KVM's wait-for-INIT/SIPI state until the guest starts them.
    pub fn new(vm: &VmFd, id: u32, count: u32, base_cpuid: &CpuId) -> Result<Self, Error> {
        let fd = vm.create_vcpu(u64::from(id)).map_err(|source| Error::Create { id, source })?;
        let cpuid = cpuid::for_vcpu(base_cpuid, id, count);
        fd.set_cpuid2(&cpuid).map_err(|source| Error::Cpuid { id, source })?;
        regs::set_fpu(&fd, id)?;
        regs::set_boot_msrs(&fd, id)?;
        regs::set_lint(&fd, id)?;
        Ok(Vcpu { id, fd, fresh: None })
    }

    /// Sets the boot vCPU's first instruction. The reset vector is KVM's initial state, so
    /// firmware boot sets no registers at all.
    pub fn set_entry(&self, entry: &Entry) -> Result<(), Error> {
        match entry {
            Entry::ProtectedMode(k) => regs::set_protected_mode_entry(&self.fd, self.id, k.entry, k.eax, k.ebx)?,
            Entry::ResetVector => {}
        }
        Ok(())
    }

    /// Starts the KVM_RUN loop on a thread named `vcpu<N>`, or on `ahead`, a thread made
    /// for it earlier ([`Vcpu::thread_ahead`]); it reports to `exits` when done.
    pub fn spawn(
        self,
        handlers: Arc<Handlers>,
        control: Arc<VcpuControl>,
        exits: Sender<VmExit>,
        ahead: Option<Parked>,
    ) -> Result<std::thread::JoinHandle<()>, Error> {
        let id = self.id;
        let thread = match ahead {
            Some(thread) => thread,
            None => Vcpu::thread_ahead(id)?,
        };
        let job = move || {
            let mut vcpu = self;
            let exit = vcpu.run(&handlers, &control);
            // The receiver is gone only when the VM is already ending.
            let _ = exits.send(exit);
        };
        thread.start(job).map_err(|e| Error::Thread { id, source: std::io::Error::other(e) })
    }

    /// A thread for vCPU `id` (named `vcpu<N>`, with the vCPU seccomp filter) that waits
    /// for the vCPU: a migration destination makes them before the downtime.
    pub fn thread_ahead(id: u32) -> Result<Parked, Error> {
        Parked::spawn_as(&format!("vcpu{id}"), crate::seccomp::ThreadKind::Vcpu)
            .map_err(|source| Error::Thread { id, source })
    }

    /// The vCPU's id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The vCPU's TSC frequency, when KVM reports it.
    pub fn tsc_khz(&self) -> Option<u32> {
        self.fd.get_tsc_khz().ok()
    }

    /// Sets the vCPU's TSC frequency (needs TSC scaling in KVM).
    pub fn set_tsc_khz(&self, khz: u32) -> Result<(), kvm_ioctls::Error> {
        self.fd.set_tsc_khz(khz)
    }

    /// Restores a migrated vCPU's state (before its thread starts).
    pub fn restore(
        &mut self,
        state: &crate::migration::state::VcpuState,
    ) -> Result<(), crate::migration::state::Error> {
        state.restore(&self.fd, self.fresh.take().as_ref())
    }

    /// Reads what this vCPU holds before anything runs on it or is restored into it (see
    /// `FreshParts`).
    pub fn remember_fresh_parts(&mut self) -> Result<(), crate::migration::state::Error> {
        self.fresh = Some(crate::migration::state::FreshParts::read(&self.fd)?);
        Ok(())
    }

    /// Stops here while the VM wants it. For a pause: completes in-flight I/O (a KVM_RUN
    /// with `immediate_exit` finishes a pending port or MMIO read without entering the
    /// guest) unless the last KVM_RUN was `interrupted` (by the kick: nothing is in
    /// flight, and the extra KVM_RUN cost 7-20 us of the downtime), saves the state,
    /// reports it, and waits. For a stall (the throttle): just waits. Returns false when
    /// the thread must end.
    fn park(&mut self, handlers: &Handlers, control: &VcpuControl, interrupted: bool) -> bool {
        loop {
            match control.get() {
                Wanted::Run => return true,
                Wanted::Stop => return false,
                Wanted::Stall => control.wait_while(Wanted::Stall),
                Wanted::Pause => {
                    // With synced registers, the save's own KVM_RUN completes the I/O.
                    let synced = handlers.sync_regs;
                    if !interrupted && !synced {
                        self.fd.set_kvm_immediate_exit(1);
                        let _ = self.fd.run();
                        self.fd.set_kvm_immediate_exit(0);
                    }
                    let msrs = &handlers.msr_indexes;
                    let state = crate::migration::state::VcpuState::save(msrs, &mut self.fd, self.id, synced)
                        .map(Box::new)
                        .map_err(|e| e.to_string());
                    let sender = handlers.paused.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    let _ = sender.send((self.id, state));
                    control.wait_while(Wanted::Pause);
                }
            }
        }
    }

    fn run(&mut self, handlers: &Handlers, control: &VcpuControl) -> VmExit {
        let (buses, recorder) = (handlers, &handlers.recorder);
        let audit = handlers.audit.as_ref().filter(|_| self.id == 0);
        if let Some(audit) = audit {
            if let Err(e) = audit.start(&mut self.fd, handlers.sync_regs) {
                return self.fault(FaultKind::Other, format!("cannot single-step for the audit: {e}"));
            }
        }
        // Whether the last KVM_RUN ended with EINTR/EAGAIN, which completes nothing later.
        let mut interrupted = false;
        loop {
            if control.get() != Wanted::Run && !self.park(handlers, control, interrupted) {
                return VmExit::Stopped;
            }
            let exit = self.fd.run();
            interrupted = matches!(&exit, Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN);
            let is_debug = matches!(exit, Ok(VcpuExit::Debug(_)));
            match &exit {
                Ok(e) => {
                    let (kind, target, size) = describe(e);
                    recorder.record(self.id, kind, target, size);
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    recorder.record(self.id, ExitKind::Interrupted, None, 0);
                }
                Err(_) => {}
            }
            let request = match exit {
                Ok(VcpuExit::IoOut(port, data)) => buses.pio.write(u64::from(port), data),
                Ok(VcpuExit::IoIn(port, data)) => {
                    buses.pio.read(u64::from(port), data);
                    None
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => buses.mmio.write(addr, data),
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    buses.mmio.read(addr, data);
                    None
                }
                Ok(VcpuExit::Shutdown) => {
                    return self.fault(FaultKind::TripleFault, "triple fault (KVM_EXIT_SHUTDOWN)".into())
                }
                Ok(VcpuExit::FailEntry(reason, cpu)) => {
                    let detail = format!("VM entry failed: hardware reason {reason:#x} on host CPU {cpu}");
                    return self.fault(FaultKind::FailEntry, detail);
                }
                Ok(VcpuExit::InternalError) => {
                    let detail = self.internal_error();
                    return self.fault(FaultKind::Emulation, detail);
                }
                Ok(VcpuExit::SystemEvent(kind, data)) => {
                    let detail = format!("KVM system event {} (data {data:x?})", system_event_name(kind));
                    return self.fault(FaultKind::SystemEvent, detail);
                }
                Ok(VcpuExit::Hlt) => {
                    return self.fault(FaultKind::Other, "vCPU halted with no in-kernel APIC to wake it".into())
                }
                Ok(VcpuExit::X86Rdmsr(m)) => {
                    match handlers.msrs.read(m.index) {
                        Ok(value) => *m.data = value,
                        Err(_) => *m.error = 1,
                    }
                    None
                }
                Ok(VcpuExit::X86Wrmsr(m)) => {
                    if handlers.msrs.write(m.index, m.data).is_err() {
                        *m.error = 1;
                    }
                    None
                }
                Ok(VcpuExit::Debug(_)) => {
                    if let Some(audit) = audit {
                        audit.step(&self.fd);
                    }
                    None
                }
                Ok(VcpuExit::Intr) => None,
                Ok(other) => {
                    let detail = format!("unhandled VM exit {other:?}");
                    return self.fault(FaultKind::Other, detail);
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
                Err(e) => return self.fault(FaultKind::Other, format!("KVM_RUN failed: {e}")),
            };
            if let (Some(audit), false) = (audit, is_debug) {
                audit.maybe_resume(&self.fd);
            }
            match request {
                None => {}
                Some(VmRequest::Exit(status)) => return VmExit::Guest(status),
                Some(VmRequest::Reset) => return VmExit::Reset,
            }
        }
    }

    fn fault(&self, kind: FaultKind, detail: String) -> VmExit {
        VmExit::Fault(Fault { vcpu: self.id, kind, detail, dump: regs::dump(&self.fd) })
    }

    /// Describes a KVM_EXIT_INTERNAL_ERROR from the `internal` member of `kvm_run`.
    fn internal_error(&mut self) -> String {
        let run = self.fd.get_kvm_run();
        // SAFETY: KVM fills the `internal` member of the exit union for
        // KVM_EXIT_INTERNAL_ERROR, which is the exit just returned.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let what = match internal.suberror {
            1 => "instruction emulation failed",
            2 => "simultaneous exceptions",
            3 => "delivery of an event failed",
            _ => "internal error",
        };
        let data = &internal.data[..(internal.ndata as usize).min(internal.data.len())];
        format!("KVM {what} (suberror {}, data {data:x?})", internal.suberror)
    }
}

fn system_event_name(kind: u32) -> &'static str {
    match kind {
        1 => "shutdown",
        2 => "reset",
        3 => "crash",
        _ => "unknown",
    }
}
