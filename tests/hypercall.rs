//! The paravirtual hypercall device, driven by the bundled guest through the real binary.

mod common;
use common::*;

#[test]
fn every_call_and_error_path() {
    require_kvm();
    let run = popek(&["run", "--cmdline", "test=hypercall"], None);
    run.expect_status(1).expect_stdout("hypercall: console write ok\n").expect_stdout(" checks passed");
    assert!(!run.stdout.contains("FAILED"), "{}", run.stdout);
    let checks: u32 = run
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("hypercall: ")?.strip_suffix(" checks passed")?.parse().ok())
        .expect("a checks-passed line");
    assert!(checks >= 30, "the guest ran {checks} checks");
}

#[test]
fn random_and_malformed_calls_leave_the_vmm_up() {
    require_kvm();
    let run = popek(&["run", "--cmdline", "test=hyperfuzz iterations=20000"], None);
    run.expect_status(1).expect_stdout("hyperfuzz: 20000 calls").expect_stdout("vmm-alive=true");
    let line = run.stdout.lines().find(|l| l.starts_with("hyperfuzz:")).unwrap();
    for key in ["ok", "efault", "einval", "enosys", "bad-blocks"] {
        let value: u64 = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{key}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        assert!(value > 0, "{key} never happened: {line}");
    }
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
}

#[test]
fn console_output_is_the_same_through_the_device_and_the_uart() {
    require_kvm();
    let device = popek(&["run"], None);
    let uart = popek(&["run", "--cmdline", "console=serial"], None);
    device.expect_status(1);
    uart.expect_status(1);
    assert_eq!(device.stdout, uart.stdout);
    assert!(device.stdout.contains("hello from ring 3"));
}

#[test]
fn benchmark_program_reports_every_row() {
    require_kvm();
    let run = popek(&["run", "--cmdline", "test=hyperbench iterations=2000"], None);
    run.expect_status(1);
    for row in ["ring0 null-port", "ring0 ping", "ring0 doorbell", "ring3 null-port", "ring3 ping", "ring3 doorbell"] {
        let line = run
            .stdout
            .lines()
            .find(|l| l.starts_with(&format!("bench latency {row} ")))
            .unwrap_or_else(|| panic!("no row {row}:\n{}", run.stdout));
        assert!(line.contains("n=2000"), "{line}");
        assert!(!line.contains("median_ns=0 "), "{line}");
    }
    run.expect_stdout("bench console uart bytes=16384").expect_stdout("bench console hypercall bytes=16384");
}
