//! Architectural register state: the 32-bit flat protected-mode entry that PVH and
//! Multiboot both specify, the FPU and MSR defaults, the local APIC's LINT pins, and a
//! readable register dump for crash reports.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use std::fmt::Write as _;

/// Register set-up errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A KVM register ioctl failed.
    #[error("Cannot {what} of vCPU {vcpu}")]
    Kvm {
        what: &'static str,
        vcpu: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
}

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;

/// A flat 4 GiB segment; `kind` is the descriptor type (0xb code, 0x3 data).
fn flat_segment(selector: u16, kind: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: kind,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Puts the vCPU in 32-bit flat protected mode, paging off, at `entry` with the given EAX
/// and EBX: the entry state of both PVH (EBX = start_info) and Multiboot (EAX = magic,
/// EBX = info).
pub fn set_protected_mode_entry(vcpu: &VcpuFd, id: u32, entry: u32, eax: u32, ebx: u32) -> Result<(), Error> {
    let kvm = |what| move |source| Error::Kvm { what, vcpu: id, source };
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(kvm("read special registers"))?;
    sregs.cs = flat_segment(0x10, 0xb);
    let data = flat_segment(0x18, 0x3);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.cr0 = CR0_PE | CR0_ET;
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.set_sregs(&sregs).map_err(kvm("set special registers"))?;
    let regs =
        kvm_regs { rip: u64::from(entry), rax: u64::from(eax), rbx: u64::from(ebx), rflags: 0x2, ..Default::default() };
    vcpu.set_regs(&regs).map_err(kvm("set registers"))
}

/// The FPU state after FNINIT, plus the default MXCSR.
pub fn set_fpu(vcpu: &VcpuFd, id: u32) -> Result<(), Error> {
    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(|source| Error::Kvm { what: "set the FPU", vcpu: id, source })
}

const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;

/// MSRs a firmware would have set: fast string operations on, and memory write-back by
/// default (MTRRs enabled, default type WB). Best effort: a host that refuses one is logged.
pub fn set_boot_msrs(vcpu: &VcpuFd, id: u32) -> Result<(), Error> {
    let entries = [
        kvm_msr_entry { index: MSR_IA32_MISC_ENABLE, data: 1, ..Default::default() },
        kvm_msr_entry { index: MSR_MTRR_DEF_TYPE, data: (1 << 11) | 6, ..Default::default() },
    ];
    let msrs = Msrs::from_entries(&entries).map_err(|_| Error::Kvm {
        what: "build the MSR list",
        vcpu: id,
        source: kvm_ioctls::Error::new(libc::EINVAL),
    })?;
    let set = vcpu.set_msrs(&msrs).map_err(|source| Error::Kvm { what: "set MSRs", vcpu: id, source })?;
    if set != entries.len() {
        log::debug!("vCPU {id}: KVM accepted {set} of {} boot MSRs", entries.len());
    }
    Ok(())
}

const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const DELIVERY_EXTINT: u32 = 0x700;
const DELIVERY_NMI: u32 = 0x400;

fn lapic_reg(state: &kvm_lapic_state, offset: usize) -> u32 {
    let bytes: Vec<u8> = state.regs[offset..offset + 4].iter().map(|&b| b as u8).collect();
    u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

fn set_lapic_reg(state: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        state.regs[offset + i] = *b as _;
    }
}

/// Wires LINT0 to the PIC (ExtINT) and LINT1 to NMI, as a PC firmware does.
pub fn set_lint(vcpu: &VcpuFd, id: u32) -> Result<(), Error> {
    let kvm = |what| move |source| Error::Kvm { what, vcpu: id, source };
    let mut state = vcpu.get_lapic().map_err(kvm("read the local APIC"))?;
    let lint0 = lapic_reg(&state, APIC_LVT_LINT0);
    set_lapic_reg(&mut state, APIC_LVT_LINT0, (lint0 & !0x700) | DELIVERY_EXTINT);
    let lint1 = lapic_reg(&state, APIC_LVT_LINT1);
    set_lapic_reg(&mut state, APIC_LVT_LINT1, (lint1 & !0x700) | DELIVERY_NMI);
    vcpu.set_lapic(&state).map_err(kvm("set the local APIC"))
}

/// A few lines with what a crash report needs: RIP, control registers, EFER, segments.
pub fn dump(vcpu: &VcpuFd) -> String {
    let mut out = String::new();
    match vcpu.get_regs() {
        Ok(r) => {
            let _ = writeln!(out, "  rip={:#018x} rsp={:#018x} rflags={:#x}", r.rip, r.rsp, r.rflags);
            let _ = writeln!(out, "  rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x}", r.rax, r.rbx, r.rcx, r.rdx);
        }
        Err(e) => {
            let _ = writeln!(out, "  registers unavailable: {e}");
        }
    }
    match vcpu.get_sregs() {
        Ok(s) => {
            let _ = writeln!(
                out,
                "  cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
                s.cr0, s.cr2, s.cr3, s.cr4, s.efer
            );
            for (name, seg) in [("cs", &s.cs), ("ds", &s.ds), ("ss", &s.ss), ("tr", &s.tr)] {
                let _ = writeln!(
                    out,
                    "  {name}: sel={:#06x} base={:#x} limit={:#x} type={:#x} dpl={} l={} db={}",
                    seg.selector, seg.base, seg.limit, seg.type_, seg.dpl, seg.l, seg.db
                );
            }
            let _ = writeln!(
                out,
                "  gdt: base={:#x} limit={:#x}; idt: base={:#x} limit={:#x}",
                s.gdt.base, s.gdt.limit, s.idt.base, s.idt.limit
            );
        }
        Err(e) => {
            let _ = writeln!(out, "  special registers unavailable: {e}");
        }
    }
    out
}
