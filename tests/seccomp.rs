//! Seccomp: every thread kind runs under its own allow-list. The hidden test hook
//! `--seccomp-probe KIND` makes the first thread of a kind call something its list
//! forbids; the filter must stop the process and name the thread and the call. Every other
//! test in the suite runs with the filters on (the default), so they also show that the
//! lists allow all the real work: booting, traps, hypercalls, every migration mode.

mod common;
use common::procs::*;
use common::*;

/// The guest's own success status (exit-port value 0 gives (0 << 1) | 1).
const GUEST_OK: i32 = 1;
/// `popek run`'s status for a forbidden system call.
const VIOLATION: i32 = 20;

fn probe(kind: &str, mode: &str) -> Run {
    require_kvm();
    let scratch = Scratch::new(&format!("seccomp-{kind}-{mode}"));
    let api = scratch.0.join("api.sock").display().to_string();
    popek(&["run", "--no-stdin", "--api-socket", &api, "--seccomp", mode, "--seccomp-probe", kind], None)
}

#[test]
fn a_forbidden_call_from_the_vmm_vcpu_and_api_threads_is_stopped() {
    // execve(2) = 59 (no thread may run a program), socket(2) = 41 (the VMM thread may,
    // a vCPU or the control socket's threads may not).
    for (kind, call) in [("vmm", 59), ("vcpu", 41), ("api", 41)] {
        let run = probe(kind, "on");
        run.expect_status(VIOLATION)
            .expect_stderr(&format!("seccomp: the {kind} thread ("))
            .expect_stderr(&format!(") made the forbidden system call {call} "));
        assert!(!run.stderr.contains("was allowed"), "{}", run.stderr);
    }
    // Opening a file from a narrow thread is refused, not fatal (glibc itself tries).
    probe("api", "on").expect_stderr("api thread: openat gave: Permission denied");
}

#[test]
fn with_seccomp_log_or_off_the_same_calls_go_through_and_the_guest_runs() {
    for mode in ["log", "off"] {
        let run = probe("vcpu", mode);
        run.expect_status(GUEST_OK)
            .expect_stderr("seccomp probe: vcpu thread: socket was allowed")
            .expect_stdout("hello from ring 3");
    }
}

#[test]
fn a_forbidden_call_from_a_migration_thread_is_stopped_and_says_so() {
    require_kvm();
    let scratch = Scratch::new("seccomp-migration");
    // The source's post-copy reader is a migration thread; it starts after the
    // destination accepted, so the probe fires in the middle of a real migration.
    let (src, api) = workload(&scratch, &["--seccomp-probe", "migration"], "test=migrate pages=256 seconds=60");
    let (_dst, to) = destination(&scratch);
    let migrate = popek(&["migrate", "--api-socket", &api, "--to", &to, "--mode", "postcopy"], None);
    assert_ne!(migrate.status, 0, "the source died, the migration cannot report success: {}", migrate.stderr);
    let (status, _, err) = src.wait();
    assert_eq!(status, VIOLATION, "{err}");
    // Whichever migration thread starts first (the reader or the urgent server) trips it.
    assert!(err.contains("seccomp: the migration thread (postcopy-"), "{err}");
    assert!(err.contains(") made the forbidden system call 59 "), "{err}");
}
