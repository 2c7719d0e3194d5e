//! Boot paths end to end: the real `popek` binary on real KVM.

mod common;
use common::*;

/// Exit status for a guest exit-port value `v`, as QEMU's isa-debug-exit gives it.
fn guest_status(v: i32) -> i32 {
    ((v << 1) | 1) & 0xff
}

#[test]
fn direct_boot_runs_the_bundled_guest_in_ring_3() {
    require_kvm();
    popek(&["run"], None)
        .expect_status(guest_status(0))
        .expect_stdout("popek-guest: up\n")
        .expect_stdout("hello from ring 3\n");
}

#[test]
fn firmware_boot_reaches_the_same_guest() {
    require_kvm();
    popek(&["run", "--boot", "firmware"], None)
        .expect_status(guest_status(0))
        .expect_stdout("popek-guest: up\n")
        .expect_stdout("hello from ring 3\n");
}

#[test]
fn exit_port_status_is_qemu_compatible() {
    require_kvm();
    for code in [0, 1, 7, 100, 200] {
        let cmdline = format!("test=exit code={code}");
        popek(&["run", "--cmdline", &cmdline], None).expect_status(guest_status(code));
    }
}

#[test]
fn guest_sees_the_configured_memory() {
    require_kvm();
    // RAM in the map: everything but the reserved 0x9fc00..1 MiB (385 KiB).
    popek(&["run", "--memory", "64M", "--cmdline", "test=mem"], None)
        .expect_status(guest_status(0))
        .expect_stdout(&format!("mem: {} KiB of RAM", 64 * 1024 - 385));
    popek(&["run", "-m", "1G", "--cmdline", "test=mem"], None)
        .expect_stdout(&format!("mem: {} KiB", 1024 * 1024 - 385));
}

#[test]
fn initrd_reaches_a_pvh_guest_as_module_0() {
    require_kvm();
    let scratch = Scratch::new("initrd");
    let initrd = scratch.file("initrd.txt", b"popek initrd payload\n");
    popek(&["run", "--initrd", &initrd, "--cmdline", "test=initrd"], None)
        .expect_status(guest_status(0))
        .expect_stdout("initrd: 1 module(s), 21 bytes: popek initrd payload");
}

#[test]
fn guest_reads_its_console_from_stdin() {
    require_kvm();
    popek(&["run", "--cmdline", "test=echo"], Some(b"typed at the console\n"))
        .expect_status(guest_status(0))
        .expect_stdout("echo: typed at the console\n");
}

#[test]
fn firmware_rom_survives_guest_writes() {
    require_kvm();
    popek(&["run", "--boot", "firmware", "--cmdline", "test=rom"], None)
        .expect_status(guest_status(0))
        // The reset vector's first bytes: a near jump (0xe9) into the firmware.
        .expect_stdout("rom: intact (0x")
        .expect_stdout("e9)");
}

#[test]
fn triple_fault_is_reported_with_registers() {
    require_kvm();
    popek(&["run", "--cmdline", "test=triple-fault"], None)
        .expect_status(8)
        .expect_stdout("triple-fault: going down")
        .expect_stderr("triple fault")
        .expect_stderr("rip=")
        .expect_stderr("cr0=")
        .expect_stderr("efer=")
        .expect_stderr("cs: sel=");
}

#[test]
fn second_vcpu_starts_through_init_sipi() {
    require_kvm();
    popek(&["run", "--vcpus", "2", "--cmdline", "test=smp"], None)
        .expect_status(guest_status(0))
        .expect_stdout("smp: 2/2 cpus online");
    popek(&["run", "--vcpus", "4", "--cmdline", "test=smp"], None)
        .expect_status(guest_status(0))
        .expect_stdout("smp: 4/4 cpus online");
}

#[test]
fn reset_request_stops_the_vm() {
    require_kvm();
    popek(&["run", "--cmdline", "test=reset"], None).expect_status(0).expect_stderr("requested a reset");
}

#[test]
fn unclaimed_ports_are_not_fatal() {
    require_kvm();
    popek(&["run", "--cmdline", "test=probe"], None)
        .expect_status(guest_status(0))
        .expect_stdout("probe: port 0x510 reads 0xff");
}

#[test]
fn unknown_test_name_is_the_guests_error() {
    require_kvm();
    popek(&["run", "--cmdline", "test=nonesuch"], None)
        .expect_status(guest_status(2))
        .expect_stdout("unknown test 'nonesuch'");
}

#[test]
fn multiboot_kernel_gets_cmdline_and_module() {
    require_kvm();
    let scratch = Scratch::new("multiboot");
    let kernel = scratch.file("mb.elf", &multiboot_kernel(0x10_0000));
    let module = scratch.file("module.txt", b"MODULE-BYTES");
    popek(&["run", "--kernel", &kernel, "--cmdline", "hello multiboot", "--initrd", &module], None)
        .expect_status(guest_status(0x21))
        .expect_stdout("multiboot: hello multiboot module=MODULE-BYTES\n");
    // Without a module the kernel still boots and says nothing about one.
    let run = popek(&["run", "--kernel", &kernel, "--cmdline", "bare"], None);
    run.expect_status(guest_status(0x21)).expect_stdout("multiboot: bare\n");
    assert!(!run.stdout.contains("module="), "no module was given");
}

#[test]
fn exported_guest_is_the_bundled_elf() {
    let scratch = Scratch::new("export");
    let path = scratch.0.join("guest.elf");
    popek(&["export-guest", "--output", path.to_str().unwrap()], None).expect_status(0);
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(&bytes[..4], b"\x7fELF");
    assert_eq!(bytes[4], 2, "ELF64");
    require_kvm();
    popek(&["run", "--kernel", path.to_str().unwrap()], None).expect_stdout("hello from ring 3");
}
