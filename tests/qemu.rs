//! The bundled guest ELF boots unmodified under QEMU's `-kernel` (PVH), microvm and pc, so
//! every comparison with QEMU runs the same guest. Under QEMU there is no Popek hypercall
//! device: the guest must fall back to the UART. tools/setup.sh installs QEMU.

mod common;
use common::*;

fn qemu(machine: &str, guest: &str, cmdline: &str) -> Run {
    let qemu = "qemu-system-x86_64";
    let mut command = std::process::Command::new(qemu);
    command.args(["-M", machine, "-m", "128M", "-display", "none", "-no-reboot", "-nodefaults"]);
    command.args(["-chardev", "stdio,id=s0", "-device", "isa-serial,chardev=s0"]);
    command.args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", "-kernel", guest, "-append", cmdline]);
    if std::path::Path::new("/dev/kvm").exists() {
        command.arg("-enable-kvm");
    }
    run_command(&mut command, None)
}

#[test]
fn bundled_guest_boots_under_qemu_microvm_and_pc() {
    let scratch = Scratch::new("qemu");
    let guest = scratch.0.join("guest.elf");
    popek(&["export-guest", "-o", guest.to_str().unwrap()], None).expect_status(0);
    let guest = guest.to_str().unwrap();
    for machine in ["microvm", "pc"] {
        qemu(machine, guest, "test=hello")
            .expect_status(1)
            .expect_stdout("popek-guest: up")
            .expect_stdout("hello from ring 3");
    }
    // The same exit statuses as under Popek, and no hypercall device.
    qemu("microvm", guest, "test=exit code=7").expect_status(15);
    qemu("microvm", guest, "test=hypercall").expect_status(3).expect_stdout("no Popek hypercall device");
}
