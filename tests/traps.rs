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
    run.expect_status(1).expect_stderr("exit kind").expect_stderr("io-out").expect_stderr("io-in");
    // The probe reads the unclaimed port 0x510 once and writes it once.
    let stats: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
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
    assert_eq!(serial_writes["count"].as_u64().unwrap(), bytes, "one io-out exit per console byte");
    let lines: Vec<String> = std::fs::read_to_string(&trace).unwrap().lines().map(String::from).collect();
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
    popek(&["run", "--cmdline", "test=msr", "--stats-json", json.to_str().unwrap()], None)
        .expect_status(1)
        .expect_stdout("identity=0x4b45504f50 version=0x1 scratch=0x123456789abcdef0 readonly-write=#GP")
        .expect_stdout("unknown-read=#GP unknown-write=#GP");
    let stats = std::fs::read_to_string(&json).unwrap();
    assert!(stats.contains("\"rdmsr\"") && stats.contains("\"wrmsr\""), "MSR exits counted: {stats}");
    popek(&["run", "--cmdline", "test=msr", "--msr-policy", "zero"], None)
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
    let run = popek(&["classify", &image, "--flat", "--bits", "64", "--base", "0x4000", "--json"], None);
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
    assert!(sites[0]["instruction"].as_str().unwrap().starts_with("sgdt"));
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
    run.expect_status(0).expect_stdout("64-bit code").expect_stdout(".text").expect_stdout("mov ds,ax");
    run.expect_stderr("popek: classified ");
    let junk = scratch.file("junk", b"not a kernel");
    popek(&["classify", &junk], None).expect_status(4).expect_stderr("not an ELF image");
    popek(&["classify", &junk, "--flat", "--bits", "12"], None)
        .expect_status(4)
        .expect_stderr("--bits must be 16, 32 or 64");
    popek(&["classify", "/nonexistent"], None).expect_status(4).expect_stderr("cannot read /nonexistent");
}

#[test]
fn audit_steps_ring_0_and_never_crashes_the_guest() {
    require_kvm();
    let scratch = Scratch::new("audit");
    let json = scratch.0.join("stats.json");
    let run = popek(&["run", "--audit", "--stats-json", json.to_str().unwrap()], None);
    // The guest's program (ring 3) ran to its normal end: the audit did not disturb it.
    run.expect_status(1).expect_stdout("hello from ring 3").expect_stderr("audit: host ");
    let stats: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let audit = &stats["audit"];
    assert!(audit["stepped"].as_u64().unwrap() > 100, "{audit:#}");
    assert!(audit["by_class"]["privileged"].as_u64().unwrap() > 0);
    // The boot path's segment loads are sensitive-unprivileged, executed at CPL 0.
    let movs = audit["sensitive_unprivileged"]["mov"].as_array().expect("mov sites");
    assert!(movs.iter().all(|s| s["cpl"] == 0));
    if audit["steps_user_mode"] == false {
        assert!(audit["user_mode_pauses"].as_u64().unwrap() >= 1, "stepping paused before ring 3");
        assert_eq!(audit["by_cpl"].as_object().unwrap().keys().collect::<Vec<_>>(), vec!["0"]);
    }
    // A limit stops stepping and the guest still completes.
    let run = popek(&["run", "--audit", "--audit-limit", "50"], None);
    run.expect_status(1).expect_stderr("50 instructions stepped (limit 50 reached)");
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

/// The host's KVM flavour, as popek detects it (docs/traps.md explains the differences).
fn host_kind() -> &'static str {
    let loaded = |m: &str| std::path::Path::new("/sys/module").join(m).exists();
    if loaded("kvm_pvm") {
        "pvm"
    } else {
        "hardware"
    }
}

/// Instructions PVM's ring-0 emulator does not implement: run there, they end the VM with
/// an emulation failure, so the suite leaves them out of ring 0 on PVM.
const PVM_RING0_SKIP: &str = "lar,lsl,verr,verw,int-n,int3";

/// Expected cells: ring 0, ring 3, ring 3 with CR4.TSD and UMIP. `U` stands for the UMIP
/// outcome (`#GP` when the guest CPU has UMIP, else `ok`); `*` is not compared; `a|b`
/// accepts either outcome (a row that depends on the host CPU, said where it is used).
const EXPECTED_PVM: &[(&str, &str, &str, &str)] = &[
    ("sgdt", "ok", "ok", "U"),
    ("sidt", "ok", "ok", "U"),
    ("sldt", "ok", "ok", "U"),
    ("smsw", "ok", "ok", "U"),
    ("str", "ok", "ok", "U"),
    ("pushf", "ok", "differs", "differs"),
    ("popf", "ok", "ok", "ok"),
    ("lar", "-", "differs", "differs"),
    ("lsl", "-", "differs", "differs"),
    ("verr", "-", "differs", "differs"),
    ("verw", "-", "differs", "differs"),
    ("push-fs", "ok", "ok", "ok"),
    ("pop-fs", "ok", "#GP", "#GP"),
    ("mov-from-seg", "ok", "differs", "differs"),
    ("mov-to-seg", "ok", "#GP", "#GP"),
    ("far-ret", "ok", "#GP", "#GP"),
    ("int-n", "-", "#UD", "#UD"),
    ("int3", "-", "#BP", "#BP"),
    // Ring 3 executes CPUID on the host CPU (`differs`: the host hypervisor's leaves)
    // unless the host CPU's CPUID faulting makes it trap to PVM (`ok`: Popek's); this
    // project's PVM hosts have shown both (docs/traps.md).
    ("cpuid", "ok", "differs|ok", "differs|ok"),
    ("rdtsc", "ok", "ok", "ok"),
    ("rdpmc", "#GP", "#GP", "#GP"),
    ("hlt", "-", "#GP", "#GP"),
    ("cli", "ok", "#GP", "#GP"),
    ("sti", "ok", "#GP", "#GP"),
    ("in", "ok+exit", "ok+exit", "ok+exit"),
    ("out", "ok+exit", "ok+exit", "ok+exit"),
    ("mov-from-cr", "ok", "#GP", "#GP"),
    ("mov-to-cr", "ok", "#GP", "#GP"),
    ("mov-from-dr", "ok", "#GP", "#GP"),
    ("mov-to-dr", "ok", "#GP", "#GP"),
    ("lgdt", "ok", "#GP", "#GP"),
    ("lidt", "ok", "#GP", "#GP"),
    ("lldt", "ok", "#GP", "#GP"),
    ("clts", "ok", "#GP", "#GP"),
    ("invlpg", "ok", "#GP", "#GP"),
    ("wbinvd", "ok", "#GP", "#GP"),
    ("rdmsr", "ok+exit", "#GP", "#GP"),
    ("wrmsr", "ok+exit", "#GP", "#GP"),
    ("swapgs", "ok", "#GP", "#GP"),
];

/// VT-x/SVM: derived from the architecture and KVM's intercepts (ring 3 runs in non-root
/// mode, CPUID always exits to KVM, CR4.TSD is honoured natively). Not yet observed on a
/// hardware runner: the first such CI run confirms or corrects it.
const EXPECTED_HARDWARE: &[(&str, &str, &str, &str)] = &[
    ("sgdt", "ok", "ok", "U"),
    ("sidt", "ok", "ok", "U"),
    ("sldt", "ok", "ok", "U"),
    ("smsw", "ok", "ok", "U"),
    ("str", "ok", "ok", "U"),
    ("pushf", "ok", "ok", "ok"),
    ("popf", "ok", "differs", "differs"),
    ("lar", "ok", "differs", "differs"),
    ("lsl", "ok", "differs", "differs"),
    ("verr", "ok", "differs", "differs"),
    ("verw", "ok", "differs", "differs"),
    ("push-fs", "ok", "ok", "ok"),
    ("pop-fs", "ok", "#GP", "#GP"),
    ("mov-from-seg", "ok", "differs", "differs"),
    ("mov-to-seg", "ok", "#GP", "#GP"),
    ("far-ret", "ok", "#GP", "#GP"),
    ("int-n", "#DB", "#GP", "#GP"),
    ("int3", "#BP", "#BP", "#BP"),
    ("cpuid", "ok", "ok", "ok"),
    ("rdtsc", "ok", "ok", "#GP"),
    ("rdpmc", "*", "*", "*"),
    ("hlt", "-", "#GP", "#GP"),
    ("cli", "ok", "#GP", "#GP"),
    ("sti", "ok", "#GP", "#GP"),
    ("in", "ok+exit", "ok+exit", "ok+exit"),
    ("out", "ok+exit", "ok+exit", "ok+exit"),
    ("mov-from-cr", "ok", "#GP", "#GP"),
    ("mov-to-cr", "ok", "#GP", "#GP"),
    ("mov-from-dr", "ok", "#GP", "#GP"),
    ("mov-to-dr", "ok", "#GP", "#GP"),
    ("lgdt", "ok", "#GP", "#GP"),
    ("lidt", "ok", "#GP", "#GP"),
    ("lldt", "ok", "#GP", "#GP"),
    ("clts", "ok", "#GP", "#GP"),
    ("invlpg", "ok", "#GP", "#GP"),
    ("wbinvd", "ok", "#GP", "#GP"),
    ("rdmsr", "ok+exit", "#GP", "#GP"),
    ("wrmsr", "ok+exit", "#GP", "#GP"),
    ("swapgs", "ok", "#GP", "#GP"),
];

#[test]
fn trap_suite_matches_the_expected_table_for_this_host() {
    require_kvm();
    let (expected, cmdline) = match host_kind() {
        "pvm" => (EXPECTED_PVM, format!("test=traps ring0-skip={PVM_RING0_SKIP}")),
        _ => (EXPECTED_HARDWARE, "test=traps".to_string()),
    };
    let run = popek(&["run", "--cmdline", &cmdline], None);
    run.expect_status(1).expect_stdout("trap-suite done");
    let umip = run.stdout.contains("trap-suite umip=yes");
    let mut observed = std::collections::BTreeMap::new();
    for line in run.stdout.lines().filter_map(|l| l.strip_prefix("trap ")) {
        let cells: Vec<&str> = line.split_whitespace().collect();
        observed.insert(cells[0].to_string(), cells[1..].to_vec());
    }
    let mut mismatches = Vec::new();
    for (name, r0, r3, r3x) in expected {
        let got = observed.get(*name).unwrap_or_else(|| panic!("row {name} missing:\n{}", run.stdout));
        for (column, (want, have)) in [r0, r3, r3x].iter().zip(got).enumerate() {
            let want = match **want {
                "U" if umip => "#GP",
                "U" => "ok",
                other => other,
            };
            if want != "*" && !want.split('|').any(|w| w == *have) {
                mismatches.push(format!("{name} column {column}: expected {want}, got {have}"));
            }
        }
    }
    assert_eq!(observed.len(), expected.len(), "rows:\n{}", run.stdout);
    assert!(mismatches.is_empty(), "host {}: {:#?}\n{}", host_kind(), mismatches, run.stdout);
}

/// Runs popek with output to files and returns (exit status, stdout, max RSS in KiB).
// The child is reaped by wait4 (for its rusage), not by Child::wait.
#[allow(clippy::zombie_processes)]
fn popek_max_rss(args: &[&str], scratch: &Scratch, tag: &str) -> (i32, String, i64) {
    let out_path = scratch.0.join(format!("{tag}.out"));
    let child = std::process::Command::new(popek_bin())
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut status = 0;
    // SAFETY: a zeroed rusage is a valid out-parameter for wait4.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child; status and usage are valid out-parameters.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as i32);
    let code = if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { -1 };
    (code, std::fs::read_to_string(out_path).unwrap(), usage.ru_maxrss)
}

#[test]
fn hostile_guest_leaves_the_vmm_up_and_bounded() {
    require_kvm();
    let scratch = Scratch::new("hostile");
    let (small_status, small_out, small_rss) =
        popek_max_rss(&["run", "--cmdline", "test=hostile iterations=2000"], &scratch, "small");
    let (big_status, big_out, big_rss) =
        popek_max_rss(&["run", "--cmdline", "test=hostile iterations=40000"], &scratch, "big");
    assert_eq!(small_status, 1, "{small_out}");
    assert_eq!(big_status, 1, "{big_out}");
    for out in [&small_out, &big_out] {
        assert!(out.contains("vmm-alive=true"), "{out}");
        let line = out.lines().find(|l| l.starts_with("hostile:")).unwrap();
        for key in ["ports=", "mmio=", "msrs=", "privileged="] {
            let n: u64 =
                line.split(key).nth(1).and_then(|r| r.split_whitespace().next()).and_then(|v| v.parse().ok()).unwrap();
            assert!(n > 0, "{key} {line}");
        }
    }
    // 20 times the rounds, thousands of distinct ports and addresses: memory stays put
    // (exit and unclaimed-address tables are bounded).
    assert!(big_rss < small_rss + 8 * 1024, "max RSS grew from {small_rss} KiB to {big_rss} KiB");
}
