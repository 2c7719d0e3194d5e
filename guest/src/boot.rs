//! From the PVH entry (32-bit protected mode, paging off, EBX = start_info) to Rust in long
//! mode. Everything here is static data or straight-line code: on hosts where guest ring 0
//! is emulated one instruction at a time, a table built by the linker costs nothing at run
//! time, while a loop filling it would cost thousands of emulated instructions.

use core::arch::global_asm;

/// Selectors of the GDT below; `user_*` are used with RPL 3.
pub const KERNEL_CODE: u16 = 0x08;
pub const KERNEL_DATA: u16 = 0x10;
pub const USER_DATA: u16 = 0x18;
pub const USER_CODE: u16 = 0x20;
pub const TSS: u16 = 0x28;

// The PVH ELF note: name "Xen", type XEN_ELFNOTE_PHYS32_ENTRY (18), a 32-bit entry address.
global_asm!(
    r#"
    .section .note.Xen, "a"
    .p2align 2
    .long 4
    .long 4
    .long 18
    .asciz "Xen"
    .long pvh_start
    "#
);

global_asm!(
    r#"
    .section .text.boot, "ax"
    .code32
    .global pvh_start
pvh_start:
    cli
    mov edi, ebx
    lgdt [gdt64_pointer]
    mov eax, offset pml4
    mov cr3, eax
    mov eax, cr4
    or eax, 0x20
    mov cr4, eax
    mov ecx, 0xc0000080
    rdmsr
    or eax, 0x100
    wrmsr
    mov eax, cr0
    or eax, 0x80000001
    mov cr0, eax
    /* ljmp KERNEL_CODE:long_mode (hand-encoded ptr16:32 far jump) */
    .byte 0xea
    .long long_mode
    .word {kcode}

    .code64
long_mode:
    mov ax, {kdata}
    mov ds, ax
    mov es, ax
    mov ss, ax
    xor eax, eax
    mov fs, ax
    mov gs, ax
    mov rsp, offset boot_stack_top
    mov edi, edi
    call kmain
2:
    hlt
    jmp 2b

    .section .data.gdt, "aw"
    .p2align 4
    .global gdt64
gdt64:
    .quad 0
    .quad 0x00af9b000000ffff
    .quad 0x00cf93000000ffff
    .quad 0x00cff3000000ffff
    .quad 0x00affb000000ffff
    .quad 0
    .quad 0
gdt64_end:
    .p2align 4
    .global gdt64_pointer
gdt64_pointer:
    .word gdt64_end - gdt64 - 1
    .quad gdt64

    .section .data.pagetables, "aw"
    .p2align 12
pml4:
    .quad pdpt + 0x7
    .fill 511, 8, 0
pdpt:
    .quad pd0 + 0x7
    .quad pd1 + 0x7
    .quad pd2 + 0x7
    .quad pd3 + 0x7
    .fill 508, 8, 0
    /* Identity map of the first 4 GiB with 2 MiB pages, user-accessible (ring-3 programs
       touch the UART, LAPIC and ROM directly); the top GiB is uncached (MMIO). */
pd0:
    .set i, 0
    .rept 512
    .quad (i << 21) | 0x87
    .set i, i + 1
    .endr
pd1:
    .rept 512
    .quad (i << 21) | 0x87
    .set i, i + 1
    .endr
pd2:
    .rept 512
    .quad (i << 21) | 0x87
    .set i, i + 1
    .endr
pd3:
    .rept 512
    .quad (i << 21) | 0x97
    .set i, i + 1
    .endr

    .section .bss.stack, "aw", @nobits
    .p2align 12
    .global boot_stack_top
boot_stack:
    .skip 32768
boot_stack_top:
    "#,
    kcode = const KERNEL_CODE,
    kdata = const KERNEL_DATA,
);
