//! A hostile guest, within bounds: random values to random ports, MMIO addresses and
//! MSRs, and random privileged instructions, for `iterations=N` rounds (ring 0). The VMM
//! must stay up and bounded; the guest keeps itself alive by leaving out the few targets
//! that would end or reset it (the exit port, the i8042, its own local APIC and IOAPIC,
//! the MSRs that define its own execution) and prints what it did.

use crate::cpu::catch;
use crate::hypercall::call;
use crate::println;
use crate::programs::Context;
use crate::start_info::{arg, parse_number};
use core::arch::asm;
use popek_abi::exit_status::{FAILURE, SUCCESS};
use popek_abi::{hypercall as hc, layout, ports};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn safe_port(port: u16) -> bool {
    let com1 = ports::SERIAL_COM1..ports::SERIAL_COM1 + ports::SERIAL_LEN;
    // Exit port, i8042 reset, the console, the PICs, and the PCI reset control.
    let reserved = [ports::DEBUG_EXIT, ports::I8042_COMMAND, 0x20, 0x21, 0xa0, 0xa1, 0xcf9];
    !(reserved.contains(&port) || com1.contains(&port))
}

fn safe_mmio(addr: u64) -> bool {
    let page = addr & !0xfff;
    page != layout::LAPIC_BASE && page != layout::IOAPIC_BASE
}

/// MSRs whose change would break the guest itself (EFER, APIC base, segment bases, syscall
/// targets, TSC, PAT, MTRRs, ...): writes go to indexes outside every architectural range.
fn random_unknown_msr(rng: &mut Rng) -> u32 {
    0x6000_0000 | (rng.next() as u32 & 0x0fff_ffff)
}

pub fn hostile(context: &Context) -> u8 {
    let iterations = arg(context.cmdline, "iterations").and_then(parse_number).unwrap_or(2000);
    let mut seed = 0u64;
    call(hc::RANDOM, [&mut seed as *mut u64 as u64, 8, 0, 0]);
    let mut rng = Rng(seed | 1);
    let (mut port_ops, mut mmio_ops, mut msr_ops, mut msr_faults, mut priv_ops, mut priv_faults) =
        (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    for _ in 0..iterations {
        let r = rng.next();
        match r % 4 {
            0 => {
                let port = (rng.next() & 0xffff) as u16;
                if safe_port(port) {
                    let value = rng.next() as u32;
                    // SAFETY: ring 0 port I/O to a port the guest does not depend on.
                    unsafe {
                        match r >> 8 & 3 {
                            0 => {
                                asm!("out dx, al", in("dx") port, in("al") value as u8, options(nostack))
                            }
                            1 => {
                                asm!("out dx, eax", in("dx") port, in("eax") value, options(nostack))
                            }
                            2 => asm!("in al, dx", in("dx") port, out("al") _, options(nostack)),
                            _ => asm!("in eax, dx", in("dx") port, out("eax") _, options(nostack)),
                        }
                    }
                    port_ops += 1;
                }
            }
            1 => {
                // Anywhere in the 32-bit MMIO hole, ROM included.
                let addr = (layout::MMIO_HOLE_START + rng.next() % (layout::FOUR_GIB - layout::MMIO_HOLE_START)) & !7;
                if safe_mmio(addr) {
                    // SAFETY: identity-mapped MMIO hole; no RAM of the guest's lives there.
                    unsafe {
                        if r >> 8 & 1 == 0 {
                            core::ptr::write_volatile(addr as *mut u64, rng.next());
                        } else {
                            core::ptr::read_volatile(addr as *const u64);
                        }
                    }
                    mmio_ops += 1;
                }
            }
            2 => {
                let (index, value) =
                    if r >> 8 & 1 == 0 { (rng.next() as u32, 0) } else { (random_unknown_msr(&mut rng), rng.next()) };
                let write = r >> 9 & 1 == 1 && index >= 0x6000_0000;
                // SAFETY: a possibly-faulting RDMSR/WRMSR under `catch` (2 bytes each).
                let fault = catch(2, || unsafe {
                    if write {
                        asm!("wrmsr", in("ecx") index, in("eax") value as u32, in("edx") (value >> 32) as u32, options(nostack));
                    } else {
                        asm!("rdmsr", in("ecx") index, out("eax") _, out("edx") _, options(nostack));
                    }
                });
                msr_ops += 1;
                msr_faults += u64::from(fault.is_some());
            }
            _ => {
                let addr = rng.next() & 0xffff_ffff;
                // SAFETY: privileged instructions that only read state or flush caches and
                // TLBs, under `catch` with their exact lengths.
                let fault = match r >> 8 & 3 {
                    0 => catch(2, || unsafe {
                        asm!("rdpmc", in("ecx") rng.next() as u32 & 0xff, out("eax") _, out("edx") _, options(nostack))
                    }),
                    1 => catch(3, || unsafe { asm!("invlpg [rdi]", in("rdi") addr, options(nostack)) }),
                    2 => catch(2, || unsafe { asm!("wbinvd", options(nostack)) }),
                    _ => catch(3, || unsafe { asm!("mov rax, dr6", out("rax") _, options(nostack)) }),
                };
                priv_ops += 1;
                priv_faults += u64::from(fault.is_some());
            }
        }
    }
    let alive = call(hc::PING, [0; 4]) == 0;
    println!(
        "hostile: {} rounds: ports={} mmio={} msrs={} (#GP {}) privileged={} (faults {}) vmm-alive={}",
        iterations, port_ops, mmio_ops, msr_ops, msr_faults, priv_ops, priv_faults, alive
    );
    if alive {
        SUCCESS
    } else {
        FAILURE
    }
}
