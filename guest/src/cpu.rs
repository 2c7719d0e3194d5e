//! Descriptor tables and privilege changes: the TSS (so traps from ring 3 land on a kernel
//! stack), the IDT with one stub per exception, and the `iretq` that starts a ring-3 program.

use crate::boot::{TSS, USER_CODE, USER_DATA};
use core::arch::{asm, global_asm};
use core::ptr::addr_of_mut;

/// Saved state of an interrupted context, in the order `isr_common` pushes it.
#[repr(C)]
#[derive(Debug)]
pub struct TrapFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

#[repr(C, packed)]
struct TaskState {
    reserved0: u32,
    rsp: [u64; 3],
    reserved1: u64,
    ist: [u64; 7],
    reserved2: u64,
    reserved3: u16,
    iomap_base: u16,
}

/// The TSS followed by an I/O permission bitmap that allows every port: ring-3 programs
/// reach the UART, the exit port and the hypercall port directly. The bitmap, not IOPL,
/// because some hosts (PVM) run guest ring 3 with the host's IOPL 0 whatever RFLAGS says.
#[repr(C, packed)]
struct TaskStateWithIoBitmap {
    tss: TaskState,
    io_bitmap: [u8; 8192],
    /// The CPU may read one byte past the bitmap; all ones, as the SDM asks.
    end: u8,
}

const TSS_BASE_SIZE: usize = core::mem::size_of::<TaskState>();
const TSS_SIZE: usize = core::mem::size_of::<TaskStateWithIoBitmap>();

static mut TASK_STATE: TaskStateWithIoBitmap = TaskStateWithIoBitmap {
    tss: TaskState {
        reserved0: 0,
        rsp: [0; 3],
        reserved1: 0,
        ist: [0; 7],
        reserved2: 0,
        reserved3: 0,
        iomap_base: TSS_BASE_SIZE as u16,
    },
    io_bitmap: [0; 8192],
    end: 0xff,
};

#[repr(C, align(16))]
struct Stack([u8; 16384]);
static mut TRAP_STACK: Stack = Stack([0; 16384]);
static mut USER_STACK: Stack = Stack([0; 16384]);

#[repr(C, align(16))]
struct Idt([u64; 64]);
static mut IDT: Idt = Idt([0; 64]);

extern "C" {
    static mut gdt64: [u64; 7];
    fn isr_stubs();
}

/// Stub `n` sits at `isr_stubs + n * 16` (each is padded to 16 bytes).
const STUB_SIZE: u64 = 16;
const EXCEPTIONS: usize = 32;

/// Installs the TSS and the IDT. About 150 instructions: cheap even where ring 0 is emulated.
pub fn init() {
    // SAFETY: single-threaded boot code; these statics are only written here.
    unsafe {
        let tss = addr_of_mut!(TASK_STATE) as u64;
        let trap_stack_top = addr_of_mut!(TRAP_STACK) as u64 + 16384;
        (*addr_of_mut!(TASK_STATE)).tss.rsp[0] = trap_stack_top;
        let gdt = &mut *addr_of_mut!(gdt64);
        let slot = usize::from(TSS / 8);
        gdt[slot] = (TSS_SIZE as u64 - 1) | ((tss & 0xff_ffff) << 16) | (0x89 << 40) | (((tss >> 24) & 0xff) << 56);
        gdt[slot + 1] = tss >> 32;
        asm!("ltr ax", in("ax") TSS, options(nostack, preserves_flags));

        let idt = &mut *addr_of_mut!(IDT);
        for vector in 0..EXCEPTIONS {
            let handler = isr_stubs as *const () as u64 + vector as u64 * STUB_SIZE;
            // Interrupt gate, DPL 0, present; int3 (3) and into (4) get DPL 3 so ring 3
            // can raise them on purpose.
            let dpl: u64 = if vector == 3 || vector == 4 { 3 } else { 0 };
            idt.0[vector * 2] = (handler & 0xffff)
                | (u64::from(crate::boot::KERNEL_CODE) << 16)
                | ((0x8e | (dpl << 5)) << 40)
                | (((handler >> 16) & 0xffff) << 48);
            idt.0[vector * 2 + 1] = handler >> 32;
        }
        let pointer = DescriptorPointer { limit: (EXCEPTIONS * 16 - 1) as u16, base: idt.0.as_ptr() as u64 };
        asm!("lidt [{}]", in(reg) &pointer, options(readonly, nostack, preserves_flags));
    }
}

#[repr(C, packed)]
struct DescriptorPointer {
    limit: u16,
    base: u64,
}

/// Loads an empty IDT and raises an exception from ring 3: with no way to deliver it, or
/// the #DF it escalates to, the CPU shuts down (a triple fault). Raised in ring 3 because
/// hosts that emulate ring 0 (PVM) report a failed emulation, not a shutdown, for an
/// undeliverable exception raised there.
pub fn triple_fault() -> ! {
    let pointer = DescriptorPointer { limit: 0, base: 0 };
    // SAFETY: the IDT is never needed again: the next exception ends this CPU.
    unsafe { asm!("lidt [{}]", in(reg) &pointer, options(readonly, nostack, preserves_flags)) };
    enter_user(raise_undefined_opcode)
}

extern "C" fn raise_undefined_opcode() -> ! {
    // SAFETY: deliberately faults.
    unsafe { asm!("ud2", options(noreturn)) }
}

/// Runs `entry` in ring 3 with interrupts off; the TSS I/O bitmap lets it use every port.
pub fn enter_user(entry: extern "C" fn() -> !) -> ! {
    // SAFETY: the stack and code are mapped user-accessible; iretq never returns here.
    unsafe {
        let stack_top = addr_of_mut!(USER_STACK) as u64 + 16384;
        asm!(
            "push {ss}",
            "push {rsp}",
            "push 0x2",
            "push {cs}",
            "push {rip}",
            "iretq",
            ss = in(reg) u64::from(USER_DATA | 3),
            rsp = in(reg) stack_top,
            cs = in(reg) u64::from(USER_CODE | 3),
            rip = in(reg) entry as *const () as u64,
            options(noreturn)
        );
    }
}

/// An armed catch: the next exception is recorded and the faulting instruction skipped.
struct Catch {
    armed: bool,
    skip: u64,
    vector: Option<u64>,
}

static mut CATCH: Catch = Catch { armed: false, skip: 0, vector: None };

/// Runs `f`, which must execute exactly one possibly-faulting instruction of `len` bytes
/// (and nothing else that can fault), and returns the exception vector it raised, if any.
/// Works from ring 0 and ring 3: the handler runs in ring 0 and returns to the same ring.
pub fn catch(len: u64, f: impl FnOnce()) -> Option<u64> {
    // SAFETY: single CPU runs test programs; the handler is the only other user.
    unsafe {
        let c = &mut *addr_of_mut!(CATCH);
        c.armed = true;
        c.skip = len;
        c.vector = None;
        core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
        f();
        core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
        let c = &mut *addr_of_mut!(CATCH);
        c.armed = false;
        c.vector
    }
}

/// Called by `isr_common` with the saved state; returning resumes the interrupted code.
#[no_mangle]
extern "C" fn trap_handler(frame: &mut TrapFrame) {
    // SAFETY: see `catch`.
    let c = unsafe { &mut *addr_of_mut!(CATCH) };
    if c.armed {
        c.armed = false;
        c.vector = Some(frame.vector);
        frame.rip += c.skip;
        return;
    }
    // SAFETY: the trap suite's ring-3 phase asks for its next phase with an int3.
    if frame.vector == 3 && unsafe { core::ptr::replace(addr_of_mut!(crate::trap_suite::PHASE_SWITCH), false) } {
        crate::trap_suite::enable_phase2();
        return;
    }
    crate::println!(
        "guest: exception {} ({}) at rip={:#x} cs={:#x} rflags={:#x} error={:#x}",
        frame.vector,
        exception_name(frame.vector),
        frame.rip,
        frame.cs,
        frame.rflags,
        frame.error
    );
    crate::io::exit(popek_abi::exit_status::EXCEPTION);
}

fn exception_name(vector: u64) -> &'static str {
    const NAMES: [&str; 21] = [
        "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "CSO", "#TS", "#NP", "#SS", "#GP", "#PF",
        "reserved", "#MF", "#AC", "#MC", "#XM", "#VE",
    ];
    NAMES.get(vector as usize).copied().unwrap_or("exception")
}

// One 16-byte stub per exception vector: push a dummy error code where the CPU pushes none,
// push the vector, then save every register and call `trap_handler`.
global_asm!(
    r#"
    .macro ISR_NOERR n
    .p2align 4
    push 0
    push \n
    jmp isr_common
    .endm
    .macro ISR_ERR n
    .p2align 4
    push \n
    jmp isr_common
    .endm

    .section .text.isr, "ax"
    .p2align 4
    .global isr_stubs
isr_stubs:
    ISR_NOERR 0
    ISR_NOERR 1
    ISR_NOERR 2
    ISR_NOERR 3
    ISR_NOERR 4
    ISR_NOERR 5
    ISR_NOERR 6
    ISR_NOERR 7
    ISR_ERR 8
    ISR_NOERR 9
    ISR_ERR 10
    ISR_ERR 11
    ISR_ERR 12
    ISR_ERR 13
    ISR_ERR 14
    ISR_NOERR 15
    ISR_NOERR 16
    ISR_ERR 17
    ISR_NOERR 18
    ISR_NOERR 19
    ISR_NOERR 20
    ISR_ERR 21
    ISR_NOERR 22
    ISR_NOERR 23
    ISR_NOERR 24
    ISR_NOERR 25
    ISR_NOERR 26
    ISR_NOERR 27
    ISR_NOERR 28
    ISR_ERR 29
    ISR_ERR 30
    ISR_NOERR 31

    .p2align 4
isr_common:
    push rax
    push rbx
    push rcx
    push rdx
    push rsi
    push rdi
    push rbp
    push r8
    push r9
    push r10
    push r11
    push r12
    push r13
    push r14
    push r15
    mov rdi, rsp
    mov rbp, rsp
    and rsp, -16
    call trap_handler
    mov rsp, rbp
    pop r15
    pop r14
    pop r13
    pop r12
    pop r11
    pop r10
    pop r9
    pop r8
    pop rbp
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rbx
    pop rax
    add rsp, 16
    iretq
    "#
);
