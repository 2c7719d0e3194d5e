//! Run-time audit: single-step the boot vCPU (KVM_SET_GUEST_DEBUG), decode each executed
//! instruction from guest memory (translating guest-virtual addresses with KVM_TRANSLATE),
//! and count it by Popek-Goldberg class, recording where sensitive-unprivileged
//! instructions ran and at which privilege level.
//!
//! Hosts that cannot step user mode (PVM: the guest would receive the debug trap itself)
//! get stepping switched off just before an IRET/SYSRET into ring 3, and back on at the
//! vCPU's next exit to the VMM from ring 0. The report says so.

use super::classes::{properties, Class};
use crate::arch::x86_64::host::HostKind;
use crate::memory::GuestRam;
use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter, Mnemonic};
use kvm_bindings::{kvm_guest_debug, kvm_sregs, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP};
use kvm_ioctls::VcpuFd;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};

/// Sites kept per mnemonic.
const SITES_PER_MNEMONIC: usize = 8;

/// One executed sensitive-unprivileged instruction.
#[derive(Debug, Clone, Serialize)]
pub struct AuditSite {
    pub rip: u64,
    pub cpl: u8,
    pub instruction: String,
    pub count: u64,
}

/// The audit's findings.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AuditReport {
    pub host: &'static str,
    pub steps_user_mode: bool,
    pub stepped: u64,
    pub limit: u64,
    pub limit_reached: bool,
    pub by_class: BTreeMap<&'static str, u64>,
    pub by_cpl: BTreeMap<u8, u64>,
    /// Times stepping was switched off before entering ring 3, and back on in ring 0.
    pub user_mode_pauses: u64,
    pub resumes: u64,
    pub unreadable: u64,
    pub sensitive_unprivileged: BTreeMap<String, Vec<AuditSite>>,
    /// Wall time from one step's exit to the next (KVM's step and exit plus the VMM's work).
    pub ns_per_step: f64,
    /// Of that, the VMM's own work (registers, translation, decode, classification).
    pub vmm_ns_per_step: f64,
}

#[derive(Default)]
struct State {
    report: AuditReport,
    stepping: bool,
    /// KVM fills registers into `kvm_run` at every exit (KVM_CAP_SYNC_REGS): no ioctls.
    sync_regs: bool,
    /// Guest-virtual page -> guest-physical page, valid for `cr3`.
    translations: std::collections::HashMap<u64, u64>,
    cr3: u64,
    /// When the previous step's handling ended, while stepping continuously.
    last: Option<Instant>,
    wall: Duration,
    wall_steps: u64,
    busy: Duration,
}

/// The audit of one vCPU.
pub struct Audit {
    ram: GuestRam,
    rom: Option<(u64, Vec<u8>)>,
    host: HostKind,
    state: Mutex<State>,
}

/// Single-step on or off for `vcpu`.
fn set_stepping(vcpu: &VcpuFd, on: bool) -> Result<(), kvm_ioctls::Error> {
    let control = if on { KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP } else { 0 };
    vcpu.set_guest_debug(&kvm_guest_debug { control, ..Default::default() })
}

fn bitness(sregs: &kvm_sregs) -> u32 {
    const EFER_LMA: u64 = 1 << 10;
    if sregs.efer & EFER_LMA != 0 && sregs.cs.l != 0 {
        64
    } else if sregs.cs.db != 0 {
        32
    } else {
        16
    }
}

impl Audit {
    /// An audit stepping at most `limit` instructions; `rom` is (base, bytes) of the
    /// firmware ROM, which is not RAM.
    pub fn new(ram: GuestRam, rom: Option<(u64, Vec<u8>)>, limit: u64) -> Self {
        let host = HostKind::detect();
        let report =
            AuditReport { host: host.name(), steps_user_mode: host.can_step_user_mode(), limit, ..Default::default() };
        Audit { ram, rom, host, state: Mutex::new(State { report, ..Default::default() }) }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts stepping the boot vCPU; `sync_regs` says the host has KVM_CAP_SYNC_REGS.
    pub fn start(&self, vcpu: &mut VcpuFd, sync_regs: bool) -> Result<(), kvm_ioctls::Error> {
        if sync_regs {
            vcpu.set_sync_valid_reg(kvm_ioctls::SyncReg::Register);
            vcpu.set_sync_valid_reg(kvm_ioctls::SyncReg::SystemRegister);
        }
        set_stepping(vcpu, true)?;
        let mut state = self.state();
        state.stepping = true;
        state.sync_regs = sync_regs;
        Ok(())
    }

    /// Reads guest bytes at a linear address; translations are cached per page for the
    /// current CR3 (one KVM_TRANSLATE per page, not per instruction).
    fn fetch(&self, vcpu: &VcpuFd, linear: u64, paging: bool, buf: &mut [u8]) -> bool {
        // An instruction may straddle a page boundary: translate each page it touches.
        let mut done = 0;
        while done < buf.len() {
            let addr = linear.wrapping_add(done as u64);
            let in_page = (4096 - (addr & 0xfff)) as usize;
            let len = in_page.min(buf.len() - done);
            let Some(gpa) = self.translate(vcpu, addr, paging) else {
                return done > 0 && self.partial(buf, done);
            };
            if !self.read_physical(gpa, &mut buf[done..done + len]) {
                return done > 0 && self.partial(buf, done);
            }
            done += len;
        }
        true
    }

    /// A fetch that ran off mapped memory after `done` bytes: decoding what there is is
    /// still right for instructions shorter than that.
    fn partial(&self, buf: &mut [u8], done: usize) -> bool {
        buf[done..].fill(0);
        true
    }

    fn translate(&self, vcpu: &VcpuFd, linear: u64, paging: bool) -> Option<u64> {
        if !paging {
            return Some(linear);
        }
        let page = linear & !0xfff;
        let cached = self.state().translations.get(&page).copied();
        let base = match cached {
            Some(base) => base,
            None => {
                let t = vcpu.translate_gva(page).ok().filter(|t| t.valid != 0)?;
                self.state().translations.insert(page, t.physical_address & !0xfff);
                t.physical_address & !0xfff
            }
        };
        Some(base | (linear & 0xfff))
    }

    fn read_physical(&self, gpa: u64, buf: &mut [u8]) -> bool {
        if self.ram.read_slice(buf, GuestAddress(gpa)).is_ok() {
            return true;
        }
        if let Some((base, rom)) = &self.rom {
            if let Some(bytes) = gpa.checked_sub(*base).and_then(|o| rom.get(o as usize..o as usize + buf.len())) {
                buf.copy_from_slice(bytes);
                return true;
            }
        }
        false
    }

    /// Handles one single-step debug exit.
    pub fn step(&self, vcpu: &VcpuFd) {
        let entered = Instant::now();
        let (regs, sregs) = if self.state().sync_regs {
            let sync = vcpu.sync_regs();
            (sync.regs, sync.sregs)
        } else {
            let (Ok(regs), Ok(sregs)) = (vcpu.get_regs(), vcpu.get_sregs()) else {
                return;
            };
            (regs, sregs)
        };
        {
            let mut state = self.state();
            if state.cr3 != sregs.cr3 {
                state.cr3 = sregs.cr3;
                state.translations.clear();
            }
        }
        let cpl = (sregs.cs.selector & 3) as u8;
        let bits = bitness(&sregs);
        let linear = if bits == 64 { regs.rip } else { sregs.cs.base.wrapping_add(regs.rip) & 0xffff_ffff };
        let paging = sregs.cr0 & (1 << 31) != 0;
        let mut bytes = [0u8; 15];
        let fetched = self.fetch(vcpu, linear, paging, &mut bytes);
        let mut decoder = Decoder::with_ip(bits, &bytes, regs.rip, DecoderOptions::NONE);
        let instr = decoder.decode();
        // Decided before taking the state lock: it reads guest memory through `fetch`.
        let entering_user = fetched
            && !self.host.can_step_user_mode()
            && cpl == 0
            && self.enters_user_mode(vcpu, &instr, &regs, paging);
        let mut state = self.state();
        if let Some(last) = state.last.take() {
            state.wall += entered - last;
            state.wall_steps += 1;
        }
        let report = &mut state.report;
        if !fetched {
            report.unreadable += 1;
            return;
        }
        let class = properties(&instr).class();
        report.stepped += 1;
        *report.by_class.entry(class.name()).or_insert(0) += 1;
        *report.by_cpl.entry(cpl).or_insert(0) += 1;
        if class == Class::SensitiveUnprivileged {
            let key = format!("{:?}", instr.mnemonic()).to_lowercase();
            let sites = report.sensitive_unprivileged.entry(key).or_default();
            let full = sites.len() >= SITES_PER_MNEMONIC;
            match sites.iter_mut().find(|s| s.rip == regs.rip) {
                Some(site) => site.count += 1,
                None if !full => {
                    let mut text = String::new();
                    IntelFormatter::new().format(&instr, &mut text);
                    sites.push(AuditSite { rip: regs.rip, cpl, instruction: text, count: 1 });
                }
                None => {}
            }
        }
        let mut stop = false;
        if report.stepped >= report.limit {
            report.limit_reached = true;
            stop = true;
        } else if entering_user {
            report.user_mode_pauses += 1;
            stop = true;
        }
        if stop {
            state.stepping = false;
            if let Err(e) = set_stepping(vcpu, false) {
                log::warn!("audit: cannot stop single-stepping: {e}");
            }
        }
        let now = Instant::now();
        state.busy += now - entered;
        state.last = state.stepping.then_some(now);
    }

    /// Whether `instr` (about to run at CPL 0) returns to ring 3.
    fn enters_user_mode(
        &self,
        vcpu: &VcpuFd,
        instr: &iced_x86::Instruction,
        regs: &kvm_bindings::kvm_regs,
        paging: bool,
    ) -> bool {
        match instr.mnemonic() {
            Mnemonic::Sysret | Mnemonic::Sysretq | Mnemonic::Sysexit | Mnemonic::Sysexitq => true,
            Mnemonic::Iret | Mnemonic::Iretd | Mnemonic::Iretq => {
                // The CS to return to is the second slot of the IRET frame.
                let slot = if instr.mnemonic() == Mnemonic::Iretq { 8 } else { 4 };
                let mut cs = [0u8; 2];
                self.fetch(vcpu, regs.rsp.wrapping_add(slot), paging, &mut cs) && cs[0] & 3 == 3
            }
            _ => false,
        }
    }

    /// Called on the audited vCPU's other exits: resumes stepping once it is back in ring 0.
    pub fn maybe_resume(&self, vcpu: &VcpuFd) {
        let mut state = self.state();
        if state.stepping || state.report.limit_reached {
            return;
        }
        if matches!(vcpu.get_sregs(), Ok(s) if s.cs.selector & 3 == 0) && set_stepping(vcpu, true).is_ok() {
            state.stepping = true;
            state.report.resumes += 1;
        }
    }

    /// The findings so far.
    pub fn report(&self) -> AuditReport {
        let state = self.state();
        let mut report = state.report.clone();
        if report.stepped > 0 {
            report.vmm_ns_per_step = state.busy.as_nanos() as f64 / report.stepped as f64;
        }
        if state.wall_steps > 0 {
            report.ns_per_step = state.wall.as_nanos() as f64 / state.wall_steps as f64 + report.vmm_ns_per_step;
        }
        report
    }
}

impl AuditReport {
    /// The table the audit prints at the end of the run.
    pub fn table(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "audit: host {} ({}), {} instructions stepped{}",
            self.host,
            if self.steps_user_mode { "steps ring 3" } else { "cannot step ring 3: stepping paused in ring 3" },
            self.stepped,
            if self.limit_reached { format!(" (limit {} reached)", self.limit) } else { String::new() }
        );
        for (class, n) in &self.by_class {
            let _ = writeln!(out, "  {class:<24}{n:>10}");
        }
        if self.unreadable > 0 {
            let _ = writeln!(out, "  unreadable instruction bytes {:>5}", self.unreadable);
        }
        for (cpl, n) in &self.by_cpl {
            let _ = writeln!(out, "  stepped at CPL {cpl:<14}{n:>10}");
        }
        let _ = writeln!(
            out,
            "  ring-3 entries not stepped {:>7}, stepping resumed {}",
            self.user_mode_pauses, self.resumes
        );
        let _ = writeln!(
            out,
            "  {:.0} ns per stepped instruction, of which {:.0} ns in the VMM (registers, translation, decode)",
            self.ns_per_step, self.vmm_ns_per_step
        );
        for (mnemonic, sites) in &self.sensitive_unprivileged {
            for s in sites {
                let _ = writeln!(
                    out,
                    "  sensitive-unprivileged {mnemonic:<8} at {:#x} CPL {} x{}: {}",
                    s.rip, s.cpl, s.count, s.instruction
                );
            }
        }
        out
    }
}
