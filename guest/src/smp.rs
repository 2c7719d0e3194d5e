//! Finding the other CPUs (MP table) and starting them (INIT/SIPI through the local APIC).
//! An application processor starts in real mode at the trampoline, which the linker places
//! at 0x8000; it switches to protected mode, counts itself online and halts.

use core::arch::global_asm;
use core::ptr::{addr_of, read_volatile, write_volatile};
use popek_abi::layout::LAPIC_BASE;

const TRAMPOLINE: u64 = 0x8000;
const MAX_CPUS: usize = 64;

global_asm!(
    r#"
    .section .trampoline, "awx"
    .code16
    .global ap_trampoline
ap_trampoline:
    cli
    xor ax, ax
    mov ds, ax
    lgdt [ap_gdt_pointer]
    mov eax, cr0
    or eax, 1
    mov cr0, eax
    /* ljmpl 0x08:ap_protected (hand-encoded: a 32-bit far jump from 16-bit code) */
    .byte 0x66, 0xea
    .long ap_protected
    .word 0x08
    .code32
ap_protected:
    mov ax, 0x10
    mov ds, ax
    lock inc dword ptr [ap_online]
1:
    cli
    hlt
    jmp 1b

    .p2align 3
ap_gdt:
    .quad 0
    .quad 0x00cf9b000000ffff
    .quad 0x00cf93000000ffff
ap_gdt_pointer:
    .word 23
    .long ap_gdt
    .p2align 2
    .global ap_online
ap_online:
    .long 0
    .code64
    "#
);

extern "C" {
    static ap_online: u32;
}

/// What the MP table says about the processors.
pub struct Cpus {
    pub count: usize,
    pub apic_ids: [u8; MAX_CPUS],
    pub bsp: u8,
}

fn read_u8(addr: u64) -> u8 {
    // SAFETY: identity-mapped low memory / BIOS area, read only.
    unsafe { read_volatile(addr as *const u8) }
}

fn read_u32(addr: u64) -> u32 {
    u32::from_le_bytes([read_u8(addr), read_u8(addr + 1), read_u8(addr + 2), read_u8(addr + 3)])
}

fn checksum_ok(addr: u64, len: u64) -> bool {
    (0..len).fold(0u8, |sum, i| sum.wrapping_add(read_u8(addr + i))) == 0
}

/// Scans the places the MP specification names (last KiB of base memory, then the BIOS ROM
/// area) for the floating pointer structure "_MP_".
fn find_floating_pointer() -> Option<u64> {
    let regions = [(0x9fc00u64, 0x400u64), (0xf0000, 0x10000)];
    for (start, len) in regions {
        let mut addr = start;
        while addr < start + len {
            if read_u32(addr) == u32::from_le_bytes(*b"_MP_") && checksum_ok(addr, 16) {
                return Some(addr);
            }
            addr += 16;
        }
    }
    None
}

/// Reads the processor entries of the MP configuration table.
pub fn discover() -> Option<Cpus> {
    let floating = find_floating_pointer()?;
    let table = u64::from(read_u32(floating + 4));
    if table == 0 || read_u32(table) != u32::from_le_bytes(*b"PCMP") {
        return None;
    }
    let length = u64::from(read_u8(table + 4)) | (u64::from(read_u8(table + 5)) << 8);
    let entries = u64::from(read_u8(table + 34)) | (u64::from(read_u8(table + 35)) << 8);
    if !checksum_ok(table, length) {
        return None;
    }
    let mut cpus = Cpus { count: 0, apic_ids: [0; MAX_CPUS], bsp: 0 };
    let mut entry = table + 44;
    for _ in 0..entries {
        match read_u8(entry) {
            0 => {
                let flags = read_u8(entry + 3);
                if flags & 1 != 0 && cpus.count < MAX_CPUS {
                    cpus.apic_ids[cpus.count] = read_u8(entry + 1);
                    cpus.count += 1;
                    if flags & 2 != 0 {
                        cpus.bsp = read_u8(entry + 1);
                    }
                }
                entry += 20;
            }
            _ => entry += 8,
        }
    }
    Some(cpus)
}

fn lapic_write(offset: u64, value: u32) {
    // SAFETY: the local APIC page is identity-mapped; MMIO write.
    unsafe { write_volatile((LAPIC_BASE + offset) as *mut u32, value) }
}

fn lapic_read(offset: u64) -> u32 {
    // SAFETY: the local APIC page is identity-mapped; MMIO read.
    unsafe { read_volatile((LAPIC_BASE + offset) as *const u32) }
}

fn send_ipi(apic_id: u8, command: u32) {
    const ICR_LOW: u64 = 0x300;
    const ICR_HIGH: u64 = 0x310;
    const DELIVERY_PENDING: u32 = 1 << 12;
    lapic_write(ICR_HIGH, u32::from(apic_id) << 24);
    lapic_write(ICR_LOW, command);
    while lapic_read(ICR_LOW) & DELIVERY_PENDING != 0 {
        core::hint::spin_loop();
    }
}

/// This CPU's local APIC ID.
pub fn own_apic_id() -> u8 {
    (lapic_read(0x20) >> 24) as u8
}

/// Number of application processors that reached the trampoline.
pub fn online() -> u32 {
    // SAFETY: written by APs with a locked increment; read volatile.
    unsafe { read_volatile(addr_of!(ap_online)) }
}

/// Sends INIT then SIPI (twice, as the MP specification asks) to every other CPU.
pub fn start_aps(cpus: &Cpus) {
    const INIT: u32 = 0x4500;
    const STARTUP: u32 = 0x4600;
    let me = own_apic_id();
    for &id in &cpus.apic_ids[..cpus.count] {
        if id == me {
            continue;
        }
        send_ipi(id, INIT);
        send_ipi(id, STARTUP | (TRAMPOLINE >> 12) as u32);
        send_ipi(id, STARTUP | (TRAMPOLINE >> 12) as u32);
    }
}
