//! Trap-and-emulate: exit statistics and trace, MSR emulation, CPUID, classification, audit.

mod common;
use common::*;

#[test]
fn stats_table_json_and_bounded_trace() {
    require_kvm();
    let scratch = Scratch::new("stats");
    let json = scratch.0.join("stats.json");
    let trace = scratch.0.join("trace.jsonl");
    let run = popek(
        &[
            "run",
            "--stats",
            "--stats-json",
            json.to_str().unwrap(),
            "--trace-exits",
            trace.to_str().unwrap(),
            "--trace-limit",
            "5",
            "--cmdline",
            "test=probe console=serial",
        ],
        None,
    );
    run.expect_status(1)
        .expect_stderr("exit kind")
        .expect_stderr("io-out")
        .expect_stderr("io-in");
    // The probe reads the unclaimed port 0x510 once and writes it once.
    let stats: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(stats["unclaimed"]["pio"]["0x510"], 2, "{stats:#}");
    let vcpu0 = &stats["exits"]["vcpus"][0];
    let serial_writes = vcpu0["by_target"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["kind"] == "io-out" && t["target"] == 0x3f8)
        .expect("serial output counted per port");
    // Every console byte went through the UART (console=serial): one exit each.
    let bytes = run.stdout.len() as u64;
    assert_eq!(
        serial_writes["count"].as_u64().unwrap(),
        bytes,
        "one io-out exit per console byte"
    );
    let lines: Vec<String> = std::fs::read_to_string(&trace)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(lines.len(), 6, "5 exits and a truncation marker");
    let first: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    assert!(first["kind"].is_string() && first["t_ns"].is_u64() && first["vcpu"] == 0);
    assert_eq!(lines[5], "{\"truncated\":true}");
}

#[test]
fn msr_block_and_unknown_msr_policies() {
    require_kvm();
    let scratch = Scratch::new("msr");
    let json = scratch.0.join("stats.json");
    popek(
        &[
            "run",
            "--cmdline",
            "test=msr",
            "--stats-json",
            json.to_str().unwrap(),
        ],
        None,
    )
    .expect_status(1)
    .expect_stdout(
        "identity=0x4b45504f50 version=0x1 scratch=0x123456789abcdef0 readonly-write=#GP",
    )
    .expect_stdout("unknown-read=#GP unknown-write=#GP");
    let stats = std::fs::read_to_string(&json).unwrap();
    assert!(
        stats.contains("\"rdmsr\"") && stats.contains("\"wrmsr\""),
        "MSR exits counted: {stats}"
    );
    popek(
        &["run", "--cmdline", "test=msr", "--msr-policy", "zero"],
        None,
    )
    .expect_status(1)
    .expect_stdout("readonly-write=#GP unknown-read=0x0 unknown-write=0x0");
}

#[test]
fn cpuid_shows_popek_to_ring_0() {
    require_kvm();
    let run = popek(&["run", "--cmdline", "test=cpuid"], None);
    run.expect_status(1)
        .expect_stdout("cpuid: ring0 signature=\"PopekPopekVM\" max-leaf=0x40000001 features=0x7f port=0x5f0 version=1")
        .expect_stdout("cpuid: ring3 signature=");
}

/// Assembles a flat 64-bit binary with a known mix of classes.
fn known_mix() -> Vec<u8> {
    use iced_x86::code_asm::*;
    let mut a = CodeAssembler::new(64).unwrap();
    a.sgdt(ptr(rax)).unwrap(); // sensitive-unprivileged (Robin & Irvine)
    a.pushfq().unwrap(); // sensitive-unprivileged
    a.popfq().unwrap(); // sensitive-unprivileged
    a.mov(ds, ax).unwrap(); // sensitive-unprivileged
    a.hlt().unwrap(); // privileged
    a.mov(cr3, rax).unwrap(); // privileged
    a.rdmsr().unwrap(); // privileged
    a.nop().unwrap(); // innocuous
    a.add(rax, rbx).unwrap(); // innocuous
    a.assemble(0x4000).unwrap()
}

#[test]
fn classify_a_flat_binary_exactly() {
    let scratch = Scratch::new("classify");
    let image = scratch.file("mix.bin", &known_mix());
    let run = popek(
        &[
            "classify", &image, "--flat", "--bits", "64", "--base", "0x4000", "--json",
        ],
        None,
    );
    run.expect_status(0);
    let report: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(report["instructions"], 9);
    assert_eq!(report["by_class"]["sensitive-unprivileged"], 4);
    assert_eq!(report["by_class"]["privileged"], 3);
    assert_eq!(report["by_class"]["innocuous"], 2);
    let sites = report["sites"].as_array().unwrap();
    assert_eq!(sites.len(), 4);
    assert_eq!(sites[0]["address"], 0x4000);
    assert_eq!(sites[0]["bytes"], "0f 01 00");
    assert!(sites[0]["instruction"]
        .as_str()
        .unwrap()
        .starts_with("sgdt"));
    assert_eq!(report["robin_irvine"]["sgdt"], 1);
    // The table says the same.
    popek(&["classify", &image, "--flat", "--base", "0x4000"], None)
        .expect_status(0)
        .expect_stdout("sensitive-unprivileged                 4")
        .expect_stdout("0x0000004000  0f 01 00");
}

#[test]
fn classify_the_bundled_guest_and_refuse_bad_input() {
    let scratch = Scratch::new("classify-guest");
    let guest = scratch.0.join("guest.elf");
    popek(&["export-guest", "-o", guest.to_str().unwrap()], None).expect_status(0);
    let run = popek(&["classify", guest.to_str().unwrap()], None);
    run.expect_status(0)
        .expect_stdout("64-bit code")
        .expect_stdout(".text")
        .expect_stdout("mov ds,ax");
    run.expect_stderr("popek: classified ");
    let junk = scratch.file("junk", b"not a kernel");
    popek(&["classify", &junk], None)
        .expect_status(4)
        .expect_stderr("not an ELF image");
    popek(&["classify", &junk, "--flat", "--bits", "12"], None)
        .expect_status(4)
        .expect_stderr("--bits must be 16, 32 or 64");
    popek(&["classify", "/nonexistent"], None)
        .expect_status(4)
        .expect_stderr("cannot read /nonexistent");
}

#[test]
fn audit_steps_ring_0_and_never_crashes_the_guest() {
    require_kvm();
    let scratch = Scratch::new("audit");
    let json = scratch.0.join("stats.json");
    let run = popek(
        &["run", "--audit", "--stats-json", json.to_str().unwrap()],
        None,
    );
    // The guest's program (ring 3) ran to its normal end: the audit did not disturb it.
    run.expect_status(1)
        .expect_stdout("hello from ring 3")
        .expect_stderr("audit: host ");
    let stats: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let audit = &stats["audit"];
    assert!(audit["stepped"].as_u64().unwrap() > 100, "{audit:#}");
    assert!(audit["by_class"]["privileged"].as_u64().unwrap() > 0);
    // The boot path's segment loads are sensitive-unprivileged, executed at CPL 0.
    let movs = audit["sensitive_unprivileged"]["mov"]
        .as_array()
        .expect("mov sites");
    assert!(movs.iter().all(|s| s["cpl"] == 0));
    if audit["steps_user_mode"] == false {
        assert!(
            audit["user_mode_pauses"].as_u64().unwrap() >= 1,
            "stepping paused before ring 3"
        );
        assert_eq!(
            audit["by_cpl"]
                .as_object()
                .unwrap()
                .keys()
                .collect::<Vec<_>>(),
            vec!["0"]
        );
    }
    // A limit stops stepping and the guest still completes.
    let run = popek(&["run", "--audit", "--audit-limit", "50"], None);
    run.expect_status(1)
        .expect_stderr("50 instructions stepped (limit 50 reached)");
}

#[test]
fn audit_of_firmware_boot_reads_the_rom() {
    require_kvm();
    let run = popek(&["run", "--boot", "firmware", "--audit"], None);
    run.expect_status(1).expect_stdout("hello from ring 3");
    // The firmware's far jump and segment loads run in real and protected mode at CPL 0.
    run.expect_stderr("sensitive-unprivileged jmp");
    assert!(!run.stderr.contains("unreadable"), "{}", run.stderr);
}
