//! Popek's bundled test guest. A small kernel (PVH entry, long mode, descriptor tables) that
//! runs one test program, chosen with `test=NAME` on its command line, mostly in ring 3, and
//! ends the VM through the QEMU-compatible exit port. It boots unchanged under
//! `popek run` and `qemu-system-x86_64 -kernel`.
#![no_std]
#![no_main]

mod boot;
mod cpu;
mod hostile;
mod hyper_tests;
mod hypercall;
mod io;
mod migrate_workload;
mod programs;
mod smp;
mod start_info;
mod trap_suite;
mod trap_tests;

use start_info::StartInfo;

/// Called from `boot.rs` in long mode with the PVH start_info address.
#[no_mangle]
extern "C" fn kmain(start_info_paddr: u64) -> ! {
    io::serial_init();
    hypercall::detect();
    let info = StartInfo::from_paddr(start_info_paddr);
    let cmdline = info.map(|i| i.cmdline()).unwrap_or(&[]);
    if start_info::arg(cmdline, "console") == Some(b"serial") {
        hypercall::force_serial_console();
    }
    io::write_bytes(b"popek-guest: up\n");
    cpu::init();
    programs::run(info, cmdline)
}

#[panic_handler]
fn panic(panic: &core::panic::PanicInfo) -> ! {
    println!("guest: panic: {}", panic);
    io::exit(popek_abi::exit_status::FAILURE)
}
