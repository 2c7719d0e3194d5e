//! A VM: the KVM VM fd, guest memory, the in-kernel irqchip and PIT, the devices, the
//! vCPUs. `Vm::new` builds it all from a [`VmConfig`]; `Vm::run` runs it until the guest
//! or a fault ends it.

use crate::arch::x86_64::cpuid;
use crate::boot::{self, BootPlan};
use crate::config::VmConfig;
use crate::devices::console::Console;
use crate::devices::debug_exit::DebugExit;
use crate::devices::doorbell::Doorbell;
use crate::devices::hypercall::{HypercallDevice, HypercallState};
use crate::devices::i8042::I8042;
use crate::devices::rom::{NullDevice, RomWrites};
use crate::devices::serial::{self, SerialDevice};
use crate::devices::{bus, Bus};
use crate::memory::{self, GuestRam, Rom};
use crate::trap::audit::{Audit, AuditReport};
use crate::trap::exits::{ExitReport, Recorder};
use crate::trap::msr::{self, MsrEmulation};
use crate::vcpu::{self, Handlers, Vcpu, VcpuControl, VmExit, Wanted};
use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, Kvm, NoDatamatch, VmFd};
use popek_abi::{layout, ports};
use std::ffi::CString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{mpsc, Arc, Mutex};
use vmm_sys_util::eventfd::EventFd;

/// VM creation errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The KVM device node is missing.
    #[error(
        "{0} does not exist: KVM is not available on this host (is virtualization enabled and the kvm module loaded?)"
    )]
    NoKvm(PathBuf),
    /// No permission to open it.
    #[error("No permission to open {0} (add your user to the 'kvm' group, or run as root)")]
    KvmPermission(PathBuf),
    /// Any other failure to open it.
    #[error("Cannot open {path}")]
    OpenKvm {
        path: PathBuf,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Opened, but it does not speak the KVM API.
    #[error("{path} is not a KVM device (KVM API version {version}, expected 12)")]
    NotKvm { path: PathBuf, version: i32 },
    /// A VM-level KVM ioctl failed.
    #[error("Cannot {what}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] memory::Error),
    /// Loading the kernel.
    #[error(transparent)]
    Boot(#[from] boot::Error),
    /// A vCPU.
    #[error(transparent)]
    Vcpu(#[from] vcpu::Error),
    /// CPUID.
    #[error(transparent)]
    Cpuid(#[from] cpuid::Error),
    /// Saving or restoring machine state.
    #[error("Machine state: {0}")]
    State(String),
    /// Device wiring.
    #[error("Cannot wire the devices")]
    Bus(#[from] bus::Error),
    /// An eventfd or thread.
    #[error("Cannot create {what}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// KVM's stable API version.
const KVM_API_VERSION: i32 = 12;
/// Three pages Intel VT-x needs for real mode without unrestricted guest; just below the
/// firmware ROM, inside the MMIO hole.
const TSS_ADDRESS: usize = 0xfffb_d000;
/// The UART's IRQ line (ISA IRQ 4, as on a PC).
const SERIAL_GSI: u32 = 4;

/// A built VM, ready to run.
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    ram: GuestRam,
    rom: Option<Rom>,
    vcpus: Vec<Vcpu>,
    handlers: Arc<Handlers>,
    serial: Arc<SerialDevice>,
    hypercalls: Arc<HypercallState>,
    rom_writes: Arc<RomWrites>,
    doorbell: Option<Doorbell>,
    plan: BootPlan,
    /// Per-vCPU steering and threads, once running.
    controls: Vec<Arc<VcpuControl>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// vCPU threads made before the VM runs (a migration destination's, ahead of the
    /// downtime), in vCPU order.
    threads_ahead: Vec<crate::parked::Parked>,
    paused_rx: mpsc::Receiver<crate::vcpu::PausedReport>,
    config: VmConfig,
    /// vCPU 0's TSC frequency, which a migration destination must be able to offer.
    tsc_khz: Option<u32>,
}

impl Vm {
    /// Builds the VM: KVM objects, memory, devices, the loaded kernel, configured vCPUs.
    /// Guest console output goes to `console`.
    pub fn new(config: &VmConfig, console: Box<dyn Write + Send>) -> Result<Self, Error> {
        Self::build(config, console, None)
    }

    /// Builds an empty VM for a migration to fill: same devices and vCPUs, no kernel.
    /// A VM to receive a migration into, with RAM as `ram` says.
    pub fn new_incoming(config: &VmConfig, console: Box<dyn Write + Send>, ram: IncomingRam) -> Result<Self, Error> {
        Self::build(config, console, Some(ram))
    }

    /// `incoming`: None for a fresh boot, or the RAM a migration comes into.
    fn build(config: &VmConfig, console: Box<dyn Write + Send>, incoming: Option<IncomingRam>) -> Result<Self, Error> {
        let load_kernel = incoming.is_none();
        let kvm = open_kvm(&config.kvm_device)?;
        let fd = kvm.create_vm().map_err(|source| Error::Kvm { what: "create a VM", source })?;
        // The MSR filter goes first of all: installed after the irqchip or after memory
        // slots, it waits up to ~18 ms for an SRCU grace period (seen on PVM).
        if let Err(e) = msr::enable(&fd) {
            log::warn!("MSR accesses cannot be sent to the VMM on this host (KVM_CAP_X86_USER_SPACE_MSR): {e}");
        }
        // Memory slots (the ROM's too) go in before the irqchip: on some hosts (seen on PVM) the first slot
        // added after KVM_CREATE_IRQCHIP waits ~5 ms for an SRCU grace period, which would
        // be half of Popek's time to first guest byte.
        let ram = match incoming {
            Some(IncomingRam::Prepared(ram)) => ram,
            None | Some(IncomingRam::Anonymous) => memory::create_ram(config.memory_bytes)?,
        };
        let slots = memory::register_ram(&fd, &ram)?;
        let plan = if load_kernel {
            boot::load(config, &ram)?
        } else {
            let rom = (config.boot == crate::config::BootMode::Firmware).then_some(crate::bundled::FIRMWARE_ROM);
            BootPlan { entry: boot::Entry::ResetVector, rom, protocol: "migrated" }
        };
        let rom = plan.rom.map(|image| Rom::map(&fd, &kvm, slots, image)).transpose()?;
        fd.set_tss_address(TSS_ADDRESS).map_err(|source| Error::Kvm { what: "set the TSS address", source })?;
        fd.create_irq_chip().map_err(|source| Error::Kvm { what: "create the in-kernel irqchip", source })?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        fd.create_pit2(pit).map_err(|source| Error::Kvm { what: "create the in-kernel PIT", source })?;

        let console = Console::new(console);
        let interrupt = eventfd("the serial eventfd")?;
        fd.register_irqfd(&interrupt, SERIAL_GSI)
            .map_err(|source| Error::Kvm { what: "wire the serial IRQ", source })?;
        let serial = Arc::new(SerialDevice::new(interrupt, console.clone()));
        let rings = Arc::new(AtomicU64::new(0));
        let trace = config.trace_exits.as_ref().map(|(path, limit)| (path.as_path(), *limit));
        let recorder =
            Recorder::new(config.vcpus, trace).map_err(|source| Error::Io { what: "the exit trace file", source })?;
        let hypercalls = Arc::new(HypercallState::new(&ram, rings.clone(), recorder.clone()));
        let hypercall = Arc::new(HypercallDevice::new(ram.clone(), console, hypercalls.clone()));
        let doorbell_fd = eventfd("the doorbell eventfd")?;
        fd.register_ioevent(&doorbell_fd, &IoEventAddress::Pio(u64::from(ports::DOORBELL)), NoDatamatch)
            .map_err(|source| Error::Kvm { what: "register the doorbell ioeventfd", source })?;
        let doorbell = Some(Doorbell::new(doorbell_fd, rings));
        let rom_writes = Arc::new(RomWrites::default());
        let with_rom = rom.is_some().then(|| rom_writes.clone());
        let (pio, mmio) = wire_devices(serial.clone(), hypercall, with_rom)?;
        let msrs = MsrEmulation::new(config.msr_policy);
        let audit = config.audit.map(|limit| {
            let rom_copy = rom.as_ref().map(|r| (layout::FIRMWARE_BASE, r.bytes().to_vec()));
            Audit::new(ram.clone(), rom_copy, limit)
        });
        // Registers, special registers and events (KVM_SYNC_X86_*: 0x7), all three.
        let sync_regs = kvm.check_extension_int(kvm_ioctls::Cap::SyncRegs) & 0x7 == 0x7;
        let msr_indexes = crate::migration::state::msr_indexes(&kvm).map_err(|e| Error::State(e.to_string()))?;
        let (paused_tx, paused_rx) = mpsc::channel();
        let handlers = Arc::new(Handlers {
            pio,
            mmio,
            msrs,
            recorder,
            audit,
            sync_regs,
            msr_indexes,
            paused: Mutex::new(paused_tx),
        });

        let base_cpuid = cpuid::supported(&kvm)?;
        let mut vcpus =
            (0..config.vcpus).map(|id| Vcpu::new(&fd, id, config.vcpus, &base_cpuid)).collect::<Result<Vec<_>, _>>()?;
        if !load_kernel {
            // A migration restores into these: what they hold now spares the restore the
            // sets that would change nothing (see `FreshParts`), outside the downtime.
            for vcpu in &mut vcpus {
                vcpu.remember_fresh_parts().map_err(|e| Error::State(e.to_string()))?;
            }
        }
        if let (Some(boot_vcpu), true) = (vcpus.first(), load_kernel) {
            boot_vcpu.set_entry(&plan.entry)?;
        }
        install_kick_handler()?;
        let tsc_khz = vcpus.first().and_then(|v| v.tsc_khz());
        Ok(Vm {
            tsc_khz,
            kvm,
            fd,
            ram,
            rom,
            vcpus,
            handlers,
            serial,
            hypercalls,
            rom_writes,
            doorbell,
            plan,
            controls: Vec::new(),
            threads: Vec::new(),
            threads_ahead: Vec::new(),
            paused_rx,
            config: config.clone(),
        })
    }

    /// The boot protocol the kernel was loaded with ("pvh" or "multiboot").
    pub fn protocol(&self) -> &'static str {
        self.plan.protocol
    }

    /// The firmware ROM's bytes, if mapped.
    pub fn rom_bytes(&self) -> Option<&[u8]> {
        self.rom.as_ref().map(Rom::bytes)
    }

    /// The hypercall device's shared state (call counts, free page hints, generation).
    pub fn hypercalls(&self) -> &Arc<HypercallState> {
        &self.hypercalls
    }

    /// Guest writes to the firmware ROM that were dropped.
    pub fn rom_writes_dropped(&self) -> u64 {
        self.rom_writes.dropped()
    }

    /// Exit counts so far (flushes the exit trace).
    pub fn exit_report(&self) -> ExitReport {
        self.handlers.recorder.flush();
        self.handlers.recorder.report()
    }

    /// The single-step audit's findings, if the VM is audited.
    pub fn audit_report(&self) -> Option<AuditReport> {
        self.handlers.audit.as_ref().map(Audit::report)
    }

    /// Port and MMIO accesses that hit no device, by address.
    pub fn unclaimed(&self) -> (std::collections::HashMap<u64, u64>, std::collections::HashMap<u64, u64>) {
        (self.handlers.pio.unclaimed_counts(), self.handlers.mmio.unclaimed_counts())
    }

    /// Guest memory.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// The VM fd (for state and dirty-log work).
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Makes the vCPU threads now, to be handed their vCPUs when the VM runs: a migration
    /// destination calls this before the downtime, which then needs no thread starts.
    /// `first`: vCPU 0's, made earlier still (`Vcpu::thread_ahead(0)`).
    pub fn make_vcpu_threads_ahead(&mut self, first: Option<crate::parked::Parked>) -> Result<(), Error> {
        let mut first = first;
        self.threads_ahead = self
            .vcpus
            .iter()
            .map(|v| match first.take().filter(|_| v.id() == 0) {
                Some(thread) => Ok(thread),
                None => Vcpu::thread_ahead(v.id()),
            })
            .collect::<Result<_, _>>()?;
        // Up before the caller goes on (see `Parked::wait_ready`).
        self.threads_ahead.iter().for_each(crate::parked::Parked::wait_ready);
        Ok(())
    }

    /// Runs every vCPU on its own thread, feeds `input` (if any) to the UART, and returns
    /// the first reason to stop. vCPU threads still blocked in KVM_RUN end with the process.
    pub fn run<R: std::io::Read + Send + 'static>(&mut self, input: Option<R>) -> Result<VmExit, Error> {
        self.run_with(input, None, |_| {})
    }

    /// Like `run`, also serving control requests from `requests`; `started` is called once
    /// every vCPU thread has its vCPU (a migration destination confirms then). A
    /// destination's vCPUs wait until `started` calls [`Vm::resume_all`] or returns.
    pub fn run_with<R: std::io::Read + Send + 'static>(
        &mut self,
        input: Option<R>,
        requests: Option<mpsc::Receiver<crate::api::Call>>,
        started: impl FnOnce(&mut Vm),
    ) -> Result<VmExit, Error> {
        let (tx, rx) = mpsc::channel();
        // A migration destination (its vCPU threads were made ahead) holds its vCPUs out
        // of the guest until `started` has sent Running. Handed their vCPUs, they can take
        // the core of the thread that still has to send it, and a guest in KVM_RUN keeps
        // it for a whole time slice: 2.5-3.5 ms, in 1 of 5 idle migrations here (traced).
        let hold = !self.threads_ahead.is_empty();
        let mut ahead = std::mem::take(&mut self.threads_ahead).into_iter();
        for vcpu in self.vcpus.drain(..) {
            let control = Arc::new(VcpuControl::default());
            if hold {
                control.set(Wanted::Stall);
            }
            self.controls.push(control.clone());
            self.threads.push(vcpu.spawn(self.handlers.clone(), control, tx.clone(), ahead.next())?);
        }
        drop(tx);
        // A held VM is let go by `started` as soon as it said so (a destination, once
        // Running is sent), or here.
        started(self);
        if hold {
            self.resume_all();
        }
        // After `started`: on a migration destination these thread starts would otherwise
        // sit in the downtime. Nothing is lost meanwhile: console input waits in its pipe,
        // doorbell rings in their eventfd.
        if let Some(input) = input {
            serial::spawn_input_thread(self.serial.clone(), input)
                .map_err(|source| Error::Io { what: "the serial input thread", source })?;
        }
        if let Some(doorbell) = self.doorbell.take() {
            spawn_event_loop(doorbell)?;
        }
        loop {
            if let Some(requests) = &requests {
                while let Ok(call) = requests.try_recv() {
                    if let Some(exit) = crate::api::serve(self, call) {
                        return Ok(exit);
                    }
                }
            }
            let timeout = if requests.is_some() {
                std::time::Duration::from_millis(2)
            } else {
                std::time::Duration::from_secs(3600)
            };
            match rx.recv_timeout(timeout) {
                Ok(VmExit::Stopped) => {}
                Ok(exit) => return Ok(exit),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(Error::Io {
                        what: "a vCPU (all vCPU threads ended without a result)",
                        source: std::io::Error::other("no vCPU reported"),
                    })
                }
            }
        }
    }

    /// The configuration the VM was built from.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Pauses every vCPU: each completes its in-flight I/O, saves its state and waits.
    pub fn pause_all(&mut self) -> Result<Vec<crate::migration::state::VcpuState>, String> {
        self.begin_pause();
        self.finish_pause()
    }

    /// Asks every vCPU to pause and kicks it out of KVM_RUN, without waiting: the caller
    /// can work while they stop, then must call [`Vm::finish_pause`].
    pub fn begin_pause(&self) {
        while self.paused_rx.try_recv().is_ok() {}
        for c in &self.controls {
            c.set(Wanted::Pause);
        }
        for thread in &self.threads {
            kick(thread);
        }
    }

    /// Waits until every vCPU asked by [`Vm::begin_pause`] has saved its state. A vCPU
    /// still in KVM_RUN is kicked again every 2 ms, in case a signal landed just before it
    /// entered KVM_RUN. On failure the vCPUs run again.
    pub fn finish_pause(&mut self) -> Result<Vec<crate::migration::state::VcpuState>, String> {
        let mut states: Vec<Option<Box<crate::migration::state::VcpuState>>> =
            (0..self.controls.len()).map(|_| None).collect();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut failure = None;
        while states.iter().any(Option::is_none) && failure.is_none() {
            if std::time::Instant::now() > deadline {
                failure = Some("a vCPU did not pause within 5 s".to_string());
                break;
            }
            match self.next_paused() {
                Ok((id, Ok(state))) => {
                    if let Some(slot) = states.get_mut(id as usize) {
                        *slot = Some(state);
                    }
                }
                Ok((id, Err(e))) => failure = Some(format!("vCPU {id}: {e}")),
                Err(_) => {
                    for (i, thread) in self.threads.iter().enumerate() {
                        if states[i].is_none() {
                            kick(thread);
                        }
                    }
                }
            }
        }
        if let Some(failure) = failure {
            self.resume_all();
            return Err(failure);
        }
        Ok(states.into_iter().flatten().map(|state| *state).collect())
    }

    /// The next vCPU's report, polled for up to `PAUSE_SPIN` (see `crate::spin`) before
    /// sleeping for up to 2 ms: a sleeping receiver took 25-40 us to wake on the 2-core
    /// test host once the vCPU had sent its state, inside the downtime.
    fn next_paused(&self) -> Result<crate::vcpu::PausedReport, std::sync::mpsc::RecvTimeoutError> {
        match crate::spin::until(PAUSE_SPIN, || self.paused_rx.try_recv().ok()) {
            Some(report) => Ok(report),
            None => self.paused_rx.recv_timeout(std::time::Duration::from_millis(2)),
        }
    }

    /// Lets every paused vCPU run again.
    pub fn resume_all(&self) {
        for c in &self.controls {
            c.set(Wanted::Run);
        }
    }

    /// Ends every vCPU thread (after the VM moved away).
    pub fn stop_all(&self) {
        for c in &self.controls {
            c.set(Wanted::Stop);
        }
    }

    /// The guest's TSC frequency in kHz, when KVM reports it.
    pub fn tsc_khz(&self) -> Option<u32> {
        self.tsc_khz
    }

    /// Gives every (not yet running) vCPU the TSC frequency `khz`, if this KVM can scale
    /// the TSC; the error says why not.
    pub fn set_tsc_khz(&mut self, khz: u32) -> Result<(), String> {
        if !self.kvm.check_extension(kvm_ioctls::Cap::TscControl) {
            return Err("this KVM cannot scale the TSC (no KVM_CAP_TSC_CONTROL)".into());
        }
        for vcpu in &self.vcpus {
            vcpu.set_tsc_khz(khz).map_err(|e| format!("KVM refused TSC frequency {khz} kHz: {e}"))?;
        }
        self.tsc_khz = Some(khz);
        Ok(())
    }

    /// Everything `--stats-json` and the `stats` request report.
    pub fn stats_json(&self) -> serde_json::Value {
        let (pio, mmio) = self.unclaimed();
        let hex = |m: std::collections::HashMap<u64, u64>| -> std::collections::BTreeMap<String, u64> {
            m.into_iter().map(|(k, v)| (format!("{k:#x}"), v)).collect()
        };
        let calls: std::collections::BTreeMap<String, u64> =
            self.hypercalls.call_counts().into_iter().map(|(nr, n)| (nr.to_string(), n)).collect();
        serde_json::json!({
            "exits": self.exit_report(),
            "unclaimed": { "pio": hex(pio), "mmio": hex(mmio) },
            "hypercalls": {
                "calls": calls,
                "bad_requests": self.hypercalls.bad_calls(),
                "free_pages": self.hypercalls.free_page_count(),
                "generation": self.hypercalls.generation(),
            },
            "rom_writes_dropped": self.rom_writes_dropped(),
            "audit": self.audit_report(),
        })
    }

    /// CRC32 of the host's supported CPUID, which a migration destination must match.
    pub fn cpuid_crc32(&self) -> Result<u32, Error> {
        let cpuid = cpuid::supported(&self.kvm)?;
        let mut crc = crc32fast::Hasher::new();
        for e in cpuid.as_slice() {
            // KVM reports the APIC ID of the host CPU the caller runs on (leaf 1 EBX[31:24],
            // leaves 0xB/0x1F EDX): not a feature, and it changes from call to call.
            let ebx = if e.function == 1 { e.ebx & 0x00ff_ffff } else { e.ebx };
            let edx = if matches!(e.function, 0xb | 0x1f) { 0 } else { e.edx };
            for v in [e.function, e.index, e.flags, e.eax, ebx, e.ecx, edx] {
                crc.update(&v.to_le_bytes());
            }
        }
        Ok(crc.finalize())
    }

    /// KVM dirty-page logging on the RAM slots, for pre-copy.
    pub fn set_dirty_logging(&self, on: bool) -> Result<(), Error> {
        Ok(memory::set_dirty_logging(&self.fd, &self.ram, on)?)
    }

    /// Pages written since the last call (guest writes and the VMM's own).
    pub fn take_dirty(&self) -> Result<Vec<Vec<u64>>, Error> {
        Ok(memory::take_dirty(&self.fd, &self.ram)?)
    }

    /// Marks pages dirty again (they were taken but not sent).
    pub fn redirty(&self, dirty: &[Vec<u64>]) {
        use vm_memory::GuestMemoryBackend;
        for (region, bits) in self.ram.iter().zip(dirty) {
            let bitmap = vm_memory::MmapRegion::bitmap(&**region);
            for bit in crate::migration::pages::set_bits(bits) {
                bitmap.set_bit(bit as usize);
            }
        }
    }

    /// A throttle for pre-copy, at 0% until told otherwise.
    pub fn throttle(&self) -> Throttle {
        use std::os::unix::thread::JoinHandleExt;
        use std::sync::atomic::Ordering::SeqCst;
        let percent = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let controls = self.controls.clone();
        let threads: Vec<libc::pthread_t> = self.threads.iter().map(|t| t.as_pthread_t()).collect();
        let (p, s, c) = (percent.clone(), stop.clone(), controls.clone());
        let thread = std::thread::Builder::new()
            .name("throttle".into())
            .spawn(move || {
                crate::seccomp::enter_or_exit(crate::seccomp::ThreadKind::Migration);
                const PERIOD_US: u64 = 10_000;
                // park_timeout, not sleep: dropping the throttle unparks it at once, so the
                // migration never waits for the rest of a period before it pauses.
                while !s.load(SeqCst) {
                    let share = u64::from(p.load(SeqCst));
                    if share == 0 {
                        std::thread::park_timeout(std::time::Duration::from_micros(PERIOD_US));
                        continue;
                    }
                    for (control, thread) in c.iter().zip(&threads) {
                        control.set(Wanted::Stall);
                        kick_pthread(*thread);
                    }
                    std::thread::park_timeout(std::time::Duration::from_micros(PERIOD_US * share / 100));
                    for control in &c {
                        control.set(Wanted::Run);
                    }
                    if !s.load(SeqCst) {
                        std::thread::park_timeout(std::time::Duration::from_micros(PERIOD_US * (100 - share) / 100));
                    }
                }
            })
            .ok();
        Throttle { percent, stop, thread, controls }
    }

    /// Whether the vCPUs are paused.
    pub fn is_paused(&self) -> bool {
        self.controls.first().is_some_and(|c| c.get() == Wanted::Pause)
    }

    /// The VM-level and device state (vCPUs must be paused).
    pub fn save_machine(
        &self,
        vcpus: Vec<crate::migration::state::VcpuState>,
    ) -> Result<crate::migration::state::MachineState, Error> {
        let vm = crate::migration::state::VmState::save(&self.fd).map_err(|e| Error::State(e.to_string()))?;
        let mut devices = self.hypercalls.export();
        devices.serial = self.serial.registers();
        devices.msr_scratch = self.handlers.msrs.scratch();
        Ok(crate::migration::state::MachineState { vm, vcpus, devices })
    }

    /// Restores a migrated machine into this freshly built VM (before `run`).
    pub fn restore_machine(&mut self, machine: &crate::migration::state::MachineState) -> Result<(), Error> {
        if machine.vcpus.len() != self.vcpus.len() {
            return Err(Error::State(format!("{} vCPU states for {} vCPUs", machine.vcpus.len(), self.vcpus.len())));
        }
        let started = std::time::Instant::now();
        machine.vm.restore(&self.fd).map_err(|e| Error::State(e.to_string()))?;
        log::debug!("restore: VM state in {:?}", started.elapsed());
        for (vcpu, state) in self.vcpus.iter_mut().zip(&machine.vcpus) {
            if vcpu.id() != state.id {
                return Err(Error::State(format!("vCPU state {} for vCPU {}", state.id, vcpu.id())));
            }
            vcpu.restore(state).map_err(|e| Error::State(e.to_string()))?;
            log::debug!("restore: vCPU {} by {:?}", state.id, started.elapsed());
        }
        self.serial.restore_registers(&machine.devices.serial);
        self.handlers.msrs.set_scratch(&machine.devices.msr_scratch);
        self.hypercalls.import(&machine.devices);
        Ok(())
    }

    /// The last step of a restore, once all of RAM is here (or, in post-copy, served on
    /// demand): tells the guest it moved, through its generation word.
    pub fn publish_generation(&self) {
        self.hypercalls.publish_generation(&self.ram);
    }
}

/// The RAM a migration comes into.
pub enum IncomingRam {
    /// Fresh anonymous memory, 4 KiB pages. Not transparent huge pages: one page written
    /// in the downtime into a 2 MiB area not yet touched costs zeroing all of it (up to
    /// ~4 ms on this project's nested test host), and in post-copy it would make the
    /// neighbourhood present, which userfaultfd then never sees missing. `--prealloc`
    /// is the way to fill RAM fast.
    Anonymous,
    /// RAM allocated ahead of time (`memory::Prepared`).
    Prepared(GuestRam),
}

/// How long `finish_pause` polls for the vCPUs' reports before it sleeps: a vCPU takes
/// 0.1-0.3 ms here to leave the guest and save its state.
const PAUSE_SPIN: std::time::Duration = std::time::Duration::from_millis(1);

/// Kicks a vCPU thread out of KVM_RUN.
fn kick(thread: &std::thread::JoinHandle<()>) {
    use std::os::unix::thread::JoinHandleExt;
    kick_pthread(thread.as_pthread_t());
}

fn kick_pthread(thread: libc::pthread_t) {
    // SAFETY: the VM holds the thread's JoinHandle for as long as it can be kicked, so the
    // thread exists; the kick signal's handler does nothing, so delivery only interrupts
    // KVM_RUN with EINTR.
    unsafe { libc::pthread_kill(thread, vmm_sys_util::signal::SIGRTMIN()) };
}

/// Pre-copy's vCPU throttle: every 10 ms, stalls the vCPUs for `percent` of it, so a guest
/// that dirties memory faster than the link carries it slows down until pre-copy
/// converges (QEMU calls this auto-converge). Stopped (vCPUs running) on drop.
pub struct Throttle {
    percent: Arc<std::sync::atomic::AtomicU32>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    controls: Vec<Arc<VcpuControl>>,
}

impl Throttle {
    /// Sets the share of time the vCPUs are stalled (0 to 90).
    pub fn set(&self, percent: u32) {
        self.percent.store(percent.min(90), std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
        for c in &self.controls {
            if c.get() == Wanted::Stall {
                c.set(Wanted::Run);
            }
        }
    }
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The kick signal's handler, installed once per process.
fn install_kick_handler() -> Result<(), Error> {
    static ONCE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        vmm_sys_util::signal::register_signal_handler(vmm_sys_util::signal::SIGRTMIN(), on_kick)
            .map_err(|e| e.to_string())
    })
    .clone()
    .map_err(|e| Error::State(format!("cannot install the vCPU kick signal handler: {e}")))
}

fn open_kvm(path: &Path) -> Result<Kvm, Error> {
    let c_path = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| Error::NoKvm(path.to_path_buf()))?;
    let kvm = Kvm::new_with_path(&c_path).map_err(|source| match source.errno() {
        libc::ENOENT => Error::NoKvm(path.to_path_buf()),
        libc::EACCES | libc::EPERM => Error::KvmPermission(path.to_path_buf()),
        _ => Error::OpenKvm { path: path.to_path_buf(), source },
    })?;
    let version = kvm.get_api_version();
    if version != KVM_API_VERSION {
        return Err(Error::NotKvm { path: path.to_path_buf(), version });
    }
    Ok(kvm)
}

fn eventfd(what: &'static str) -> Result<EventFd, Error> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(|source| Error::Io { what, source })
}

/// The event-manager thread: serves the doorbell (and, later, other fd-driven devices)
/// without stopping any vCPU.
fn spawn_event_loop(doorbell: Doorbell) -> Result<(), Error> {
    let io = |source| Error::Io { what: "the event loop", source };
    let mut manager = event_manager::EventManager::<Arc<Mutex<dyn event_manager::MutEventSubscriber + Send>>>::new()
        .map_err(|e| io(std::io::Error::other(format!("{e:?}"))))?;
    event_manager::SubscriberOps::add_subscriber(&mut manager, Arc::new(Mutex::new(doorbell)));
    std::thread::Builder::new()
        .name("event-loop".into())
        .spawn(move || {
            crate::seccomp::enter_or_exit(crate::seccomp::ThreadKind::Api);
            loop {
                if let Err(e) = manager.run() {
                    log::error!("event loop: {e:?}");
                    return;
                }
            }
        })
        .map_err(io)?;
    Ok(())
}

fn wire_devices(
    serial: Arc<SerialDevice>,
    hypercall: Arc<HypercallDevice>,
    rom_writes: Option<Arc<RomWrites>>,
) -> Result<(Bus, Bus), bus::Error> {
    let mut pio = Bus::new("port I/O", 0xff);
    pio.insert(u64::from(ports::SERIAL_COM1), u64::from(ports::SERIAL_LEN), serial)?;
    pio.insert(u64::from(ports::DEBUG_EXIT), 1, Arc::new(DebugExit))?;
    let i8042_len = u64::from(ports::I8042_COMMAND - ports::I8042_DATA) + 1;
    pio.insert(u64::from(ports::I8042_DATA), i8042_len, Arc::new(I8042))?;
    pio.insert(u64::from(ports::HYPERCALL), 4, hypercall)?;
    pio.insert(u64::from(ports::NULL), 4, Arc::new(NullDevice))?;
    let mut mmio = Bus::new("MMIO", 0);
    if let Some(rom_writes) = rom_writes {
        mmio.insert(layout::FIRMWARE_BASE, layout::FIRMWARE_SIZE, rom_writes)?;
    }
    Ok((pio, mmio))
}
