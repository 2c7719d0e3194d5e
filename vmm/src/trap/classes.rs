//! The Popek-Goldberg classes of x86 instructions, in one table.
//!
//! Popek and Goldberg (1974): an instruction is **privileged** if it traps when run outside
//! supervisor mode; **control-sensitive** if it changes the machine's configuration
//! (mode, memory map, interrupt state, devices); **behaviour-sensitive** if its effect
//! depends on that configuration (mode, privilege, location). A trap-and-emulate VMM
//! exists when every sensitive instruction is privileged. Robin and Irvine (2000, "Analysis
//! of the Intel Pentium's Ability to Support a Secure Virtual Machine Monitor") listed the
//! 17 x86 instructions that are sensitive but not privileged: SGDT, SIDT, SLDT, SMSW, STR,
//! PUSHF, POPF, LAR, LSL, VERR, VERW, PUSH/POP of segment registers, far CALL/JMP/RET,
//! INT n, and MOV to/from segment registers. They are marked `robin_irvine` below.
//!
//! Beyond their list, this table marks instructions whose sensitivity is configuration-
//! or host-dependent, with a note: CPUID (unprivileged on bare x86; VT-x/SVM always
//! intercept it, PVM runs guest ring 3 natively where it reports the host), RDTSC/RDTSCP
//! (privileged only with CR4.TSD), RDPMC (unless CR4.PCE), and the IOPL-dependent
//! CLI/STI/IN/OUT (privileged at the usual IOPL 0).

use iced_x86::{Instruction, Mnemonic, OpKind};
use serde::Serialize;

/// The primary class an instruction is counted in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Class {
    /// Traps outside ring 0: a trap-and-emulate VMM sees it.
    Privileged,
    /// Sensitive but runs silently outside ring 0: invisible to trap-and-emulate.
    SensitiveUnprivileged,
    /// Neither.
    Innocuous,
}

impl Class {
    pub fn name(self) -> &'static str {
        match self {
            Class::Privileged => "privileged",
            Class::SensitiveUnprivileged => "sensitive-unprivileged",
            Class::Innocuous => "innocuous",
        }
    }
}

/// What the table says about one instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Properties {
    pub privileged: bool,
    pub control_sensitive: bool,
    pub behaviour_sensitive: bool,
    /// One of Robin and Irvine's 17.
    pub robin_irvine: bool,
    /// Why, when it depends on configuration or host.
    pub note: &'static str,
}

impl Properties {
    /// The class the instruction is counted in.
    pub fn class(&self) -> Class {
        if self.privileged {
            Class::Privileged
        } else if self.control_sensitive || self.behaviour_sensitive {
            Class::SensitiveUnprivileged
        } else {
            Class::Innocuous
        }
    }
}

const fn p(privileged: bool, control: bool, behaviour: bool, robin_irvine: bool, note: &'static str) -> Properties {
    Properties { privileged, control_sensitive: control, behaviour_sensitive: behaviour, robin_irvine, note }
}

const INNOCUOUS: Properties = p(false, false, false, false, "");
const UMIP: &str = "traps at CPL>0 when CR4.UMIP is set";

fn uses_segment_register(instr: &Instruction) -> bool {
    (0..instr.op_count()).any(|i| instr.op_kind(i) == OpKind::Register && instr.op_register(i).is_segment_register())
}

fn uses_register(instr: &Instruction, test: fn(iced_x86::Register) -> bool) -> bool {
    (0..instr.op_count()).any(|i| instr.op_kind(i) == OpKind::Register && test(instr.op_register(i)))
}

/// The table: the Popek-Goldberg properties of a decoded instruction.
pub fn properties(instr: &Instruction) -> Properties {
    use Mnemonic::*;
    match instr.mnemonic() {
        // Robin and Irvine's 17 sensitive, unprivileged instructions.
        Sgdt | Sidt | Sldt | Str => p(false, false, true, true, UMIP),
        Smsw => p(false, false, true, true, UMIP),
        Pushf | Pushfd | Pushfq => p(false, false, true, true, "reveals IF and IOPL"),
        Popf | Popfd | Popfq => p(false, true, true, true, "silently keeps IF/IOPL outside ring 0"),
        Lar | Lsl | Verr | Verw => p(false, false, true, true, "result depends on CPL"),
        Push | Pop if uses_segment_register(instr) => p(false, false, true, true, "selector RPL reveals CPL"),
        Mov if uses_segment_register(instr) => p(false, true, true, true, "selector RPL reveals CPL"),
        Call | Jmp
            if instr.is_call_far()
                || instr.is_jmp_far()
                || instr.is_call_far_indirect()
                || instr.is_jmp_far_indirect() =>
        {
            p(false, true, true, true, "privilege checks on far transfers")
        }
        Retf => p(false, true, true, true, "privilege checks on far transfers"),
        Int | Into | Int3 | Int1 => p(false, true, true, true, "gate DPL checked against CPL"),
        // Configuration- or host-dependent.
        Cpuid => p(false, false, true, false, "VT-x/SVM intercept it; PVM ring 3 runs it natively"),
        Rdtsc | Rdtscp => p(false, false, true, false, "privileged only with CR4.TSD"),
        Rdpmc => p(true, false, true, false, "unprivileged with CR4.PCE"),
        Cli | Sti => p(true, true, false, false, "privileged when CPL > IOPL"),
        In | Out | Insb | Insw | Insd | Outsb | Outsw | Outsd => {
            p(true, true, true, false, "privileged when CPL > IOPL, unless the TSS I/O bitmap allows")
        }
        // Privileged: trap outside ring 0.
        Mov if uses_register(instr, |r| r.is_cr() || r.is_dr()) => p(true, true, true, false, ""),
        Hlt | Lgdt | Lidt | Lldt | Ltr | Lmsw | Clts | Invd | Wbinvd | Wbnoinvd | Invlpg | Invlpga | Invpcid
        | Wrmsr | Swapgs | Sysret | Sysretq | Sysexit | Sysexitq | Xsetbv | Xrstors | Xrstors64 | Monitor | Mwait
        | Monitorx | Mwaitx => p(true, true, false, false, ""),
        Rdmsr | Xsaves | Xsaves64 => p(true, false, true, false, ""),
        Vmcall | Vmmcall | Vmlaunch | Vmresume | Vmxoff | Vmxon | Vmread | Vmwrite | Vmptrld | Vmptrst | Vmclear
        | Invept | Invvpid | Vmrun | Vmload | Vmsave | Stgi | Clgi | Skinit => {
            p(true, true, true, false, "virtualization extensions")
        }
        Iret | Iretd | Iretq => p(false, true, true, false, "restores IF/IOPL only as CPL allows"),
        _ => INNOCUOUS,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions};

    fn props(bitness: u32, bytes: &[u8]) -> Properties {
        let mut d = Decoder::with_ip(bitness, bytes, 0, DecoderOptions::NONE);
        properties(&d.decode())
    }

    #[test]
    fn classic_examples() {
        assert_eq!(props(64, &[0x0f, 0x01, 0x00]).class(), Class::SensitiveUnprivileged, "sgdt");
        assert!(props(64, &[0x0f, 0x01, 0x00]).robin_irvine);
        assert_eq!(props(64, &[0x9d]).class(), Class::SensitiveUnprivileged, "popfq");
        assert_eq!(props(64, &[0x8e, 0xd8]).class(), Class::SensitiveUnprivileged, "mov ds, ax");
        assert_eq!(props(32, &[0x0e]).class(), Class::SensitiveUnprivileged, "push cs");
        assert_eq!(props(64, &[0xcb]).class(), Class::SensitiveUnprivileged, "retf");
        assert_eq!(props(64, &[0xf4]).class(), Class::Privileged, "hlt");
        assert_eq!(props(64, &[0x0f, 0x22, 0xd8]).class(), Class::Privileged, "mov cr3, rax");
        assert_eq!(props(64, &[0x0f, 0x32]).class(), Class::Privileged, "rdmsr");
        assert_eq!(props(64, &[0x90]).class(), Class::Innocuous, "nop");
        assert_eq!(props(64, &[0x50]).class(), Class::Innocuous, "push rax");
        assert_eq!(props(64, &[0x48, 0x89, 0xd8]).class(), Class::Innocuous, "mov rax, rbx");
        assert_eq!(props(64, &[0xff, 0xd0]).class(), Class::Innocuous, "call rax");
    }
}
