//! Bad input gets a clear one-line message and a distinct exit status, never a panic.

mod common;
use common::*;

const BAD_INPUT: i32 = 4;
const NO_KVM: i32 = 6;

fn expect_clean_failure(run: &Run, status: i32, message: &str) {
    run.expect_status(status).expect_stderr("popek: error: ").expect_stderr(message);
    assert!(!run.stderr.contains("panicked"), "popek panicked:\n{}", run.stderr);
}

#[test]
fn missing_kernel_file() {
    let run = popek(&["run", "--kernel", "/nonexistent/kernel.elf"], None);
    expect_clean_failure(&run, BAD_INPUT, "Cannot read kernel image /nonexistent/kernel.elf: No such file");
}

#[test]
fn not_an_elf() {
    require_kvm();
    let scratch = Scratch::new("notelf");
    let kernel = scratch.file("kernel.txt", b"this is plainly not a kernel\n");
    expect_clean_failure(&popek(&["run", "--kernel", &kernel], None), BAD_INPUT, "not an ELF image");
    let empty = scratch.file("empty", b"");
    expect_clean_failure(&popek(&["run", "--kernel", &empty], None), BAD_INPUT, "not an ELF image");
}

#[test]
fn truncated_elf() {
    require_kvm();
    let scratch = Scratch::new("truncated");
    let guest = scratch.0.join("guest.elf");
    popek(&["export-guest", "-o", guest.to_str().unwrap()], None).expect_status(0);
    let bytes = std::fs::read(&guest).unwrap();
    for cut in [20, 64, 100, bytes.len() / 2, bytes.len() - 1] {
        let kernel = scratch.file(&format!("cut{cut}"), &bytes[..cut]);
        expect_clean_failure(&popek(&["run", "--kernel", &kernel], None), BAD_INPUT, "truncated or malformed ELF");
    }
}

#[test]
fn segment_outside_guest_ram() {
    require_kvm();
    let scratch = Scratch::new("outside");
    let high64 = scratch.file("high64.elf", &elf64(0x4000_0000, &[0x90; 64]));
    expect_clean_failure(
        &popek(&["run", "--memory", "64M", "--kernel", &high64], None),
        BAD_INPUT,
        "segment at 0x40000000..0x40000040 lies outside guest RAM",
    );
    let high32 = scratch.file("high32.elf", &multiboot_kernel(0x2000_0000));
    expect_clean_failure(&popek(&["run", "-m", "64M", "--kernel", &high32], None), BAD_INPUT, "lies outside guest RAM");
    let low = scratch.file("low.elf", &multiboot_kernel(0x6000));
    expect_clean_failure(&popek(&["run", "--kernel", &low], None), BAD_INPUT, "overlaps Popek's boot data");
}

#[test]
fn elf_without_a_boot_protocol() {
    require_kvm();
    let scratch = Scratch::new("noproto");
    let plain64 = scratch.file("plain64.elf", &elf64(0x10_0000, &[0xf4; 16]));
    expect_clean_failure(&popek(&["run", "--kernel", &plain64], None), BAD_INPUT, "without a PVH entry note");
    let plain32 = scratch.file("plain32.elf", &elf32(0x10_0000, 0x10_0000, &[0xf4; 16]));
    expect_clean_failure(&popek(&["run", "--kernel", &plain32], None), BAD_INPUT, "without a Multiboot header");
    let multiboot = scratch.file("mb.elf", &multiboot_kernel(0x10_0000));
    expect_clean_failure(
        &popek(&["run", "--boot", "firmware", "--kernel", &multiboot], None),
        BAD_INPUT,
        "--boot firmware needs a PVH kernel",
    );
}

#[test]
fn memory_sizes() {
    expect_clean_failure(&popek(&["run", "--memory", "1M"], None), BAD_INPUT, "is too small: the minimum is 8 MiB");
    expect_clean_failure(&popek(&["run", "--memory", "lots"], None), BAD_INPUT, "'lots' is not a memory size");
    expect_clean_failure(&popek(&["run", "--memory", "12X"], None), BAD_INPUT, "'12X' is not a memory size");
    expect_clean_failure(&popek(&["run", "--memory", "1000G"], None), BAD_INPUT, "too large");
}

#[test]
fn missing_initrd_and_bad_vcpus() {
    expect_clean_failure(
        &popek(&["run", "--initrd", "/nonexistent/initrd"], None),
        BAD_INPUT,
        "Cannot read initrd /nonexistent/initrd",
    );
    expect_clean_failure(&popek(&["run", "--vcpus", "0"], None), BAD_INPUT, "--vcpus must be between 1 and 32");
    let long = "x".repeat(5000);
    expect_clean_failure(&popek(&["run", "--cmdline", &long], None), BAD_INPUT, "command line is 5000 bytes");
}

#[test]
fn initrd_too_large_for_memory() {
    require_kvm();
    let scratch = Scratch::new("biginitrd");
    let initrd = scratch.file("big", &vec![0u8; 12 << 20]);
    expect_clean_failure(
        &popek(&["run", "-m", "8M", "--initrd", &initrd], None),
        BAD_INPUT,
        "does not fit in guest RAM",
    );
}

#[test]
fn no_kvm_device() {
    expect_clean_failure(
        &popek(&["run", "--kvm-device", "/nonexistent/kvm"], None),
        NO_KVM,
        "/nonexistent/kvm does not exist: KVM is not available",
    );
    expect_clean_failure(&popek(&["run", "--kvm-device", "/dev/null"], None), NO_KVM, "/dev/null is not a KVM device");
}

/// A KVM device node the caller may not open. As root (CI here): a copy of /dev/kvm's node
/// with mode 000, opened without CAP_DAC_OVERRIDE (root keeps ownership, loses the
/// bypass). As another user (a hosted runner): any mode-000 file gives the same EACCES.
#[test]
fn no_permission_for_kvm() {
    require_kvm();
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    let scratch = Scratch::new("perm");
    let node = scratch.0.join("kvm");
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let run = if root {
        let meta = std::fs::metadata("/dev/kvm").unwrap();
        assert!(meta.file_type().is_char_device());
        let c_node = std::ffi::CString::new(node.to_str().unwrap()).unwrap();
        // SAFETY: mknod with a valid NUL-terminated path; creates a device node for the test.
        let rc = unsafe { libc::mknod(c_node.as_ptr(), libc::S_IFCHR, meta.rdev()) };
        assert_eq!(rc, 0, "mknod: {}", std::io::Error::last_os_error());
        std::fs::set_permissions(&node, std::fs::Permissions::from_mode(0o000)).unwrap();
        run_command(
            std::process::Command::new("setpriv")
                .args(["--inh-caps=-all", "--bounding-set=-all", "--"])
                .arg(popek_bin())
                .args(["run", "--kvm-device", node.to_str().unwrap()]),
            None,
        )
    } else {
        std::fs::write(&node, b"").unwrap();
        std::fs::set_permissions(&node, std::fs::Permissions::from_mode(0o000)).unwrap();
        popek(&["run", "--kvm-device", node.to_str().unwrap()], None)
    };
    expect_clean_failure(&run, NO_KVM, "No permission to open");
}

#[test]
fn usage_errors_exit_2_and_help_explains_exit_codes() {
    popek(&["run", "--no-such-flag"], None).expect_status(2).expect_stderr("--no-such-flag");
    popek(&["--help"], None).expect_status(0).expect_stdout("Exit status").expect_stdout("run");
    popek(&["run", "--help"], None).expect_status(0).expect_stdout("--kernel").expect_stdout("--boot");
}
