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
