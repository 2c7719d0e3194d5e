//! Popek's firmware: the code at the x86 reset vector. The CPU starts in real mode with
//! CS base 0xffff0000 and IP 0xfff0; this switches to flat 32-bit protected mode, reads the
//! hand-off block the VMM left in RAM (see `popek_abi::FirmwareHandoff` and
//! docs/architecture.md), and jumps to the kernel's PVH entry with EBX = start_info, the
//! same state a direct PVH boot starts in. It is about 25 instructions: on hosts that
//! emulate guest ring 0 every one of them costs about a microsecond.
#![no_std]
#![no_main]

use core::arch::global_asm;
use popek_abi::{exit_status, handoff_offsets, layout, ports, FIRMWARE_HANDOFF_MAGIC};

global_asm!(
    r#"
    .section .text.firmware, "ax"
    .code16
fw_start:
    cli
    cld
    /* o32 lgdt cs:[fw_gdt_pointer]: CS (base 0xffff0000 after reset) is the only segment
       that reaches the ROM in real mode, so the operand is an offset from the ROM base; the
       32-bit operand size loads the full 32-bit GDT base. */
    .byte 0x66, 0x2e, 0x0f, 0x01, 0x16
    .word fw_gdt_pointer - {rom_base}
    mov eax, cr0
    or al, 1
    mov cr0, eax
    /* ljmpl 0x08:fw_protected */
    .byte 0x66, 0xea
    .long fw_protected
    .word 0x08

    .code32
fw_protected:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov fs, ax
    mov gs, ax
    mov esi, {handoff}
    cmp dword ptr [esi + {off_magic}], {magic_lo}
    jne fw_no_handoff
    cmp dword ptr [esi + {off_magic} + 4], {magic_hi}
    jne fw_no_handoff
    mov ebx, dword ptr [esi + {off_ebx}]
    mov eax, dword ptr [esi + {off_entry}]
    jmp eax

fw_no_handoff:
    mov esi, offset fw_message
    mov dx, {serial}
1:
    lodsb
    test al, al
    jz 2f
    out dx, al
    jmp 1b
2:
    mov dx, {exit_port}
    mov al, {no_handoff}
    out dx, al
3:
    hlt
    jmp 3b

fw_message:
    .asciz "popek-firmware: no hand-off block from the VMM\n"

    .p2align 3
    /* Accessed bits preset: the CPU would otherwise write them, and this is ROM. */
fw_gdt:
    .quad 0
    .quad 0x00cf9b000000ffff
    .quad 0x00cf93000000ffff
fw_gdt_pointer:
    .word 23
    .long fw_gdt

    .section .reset_vector, "ax"
    .code16
    .global reset_vector
reset_vector:
    jmp fw_start
    .code32
    "#,
    rom_base = const layout::FIRMWARE_BASE,
    handoff = const layout::FIRMWARE_HANDOFF,
    off_magic = const handoff_offsets::MAGIC,
    off_entry = const handoff_offsets::ENTRY,
    off_ebx = const handoff_offsets::EBX,
    magic_lo = const FIRMWARE_HANDOFF_MAGIC & 0xffff_ffff,
    magic_hi = const FIRMWARE_HANDOFF_MAGIC >> 32,
    serial = const ports::SERIAL_COM1,
    exit_port = const ports::DEBUG_EXIT,
    no_handoff = const exit_status::FIRMWARE_NO_HANDOFF,
);

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    loop {}
}
