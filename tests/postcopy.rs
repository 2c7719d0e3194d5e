//! Post-copy and hybrid migration between two real popek processes on real KVM: the vCPUs
//! move first and memory follows through userfaultfd. The guest's workload verifies every
//! page it stamped once it runs on the destination; a cut link is recovered; a killed
//! side is reported by the other, which does not hang.

mod common;
use common::procs::*;
use common::*;
use serde_json::Value;
use std::time::Duration;

/// `popek migrate` in the background (its stderr carries the progress lines).
fn migrate(scratch: &Scratch, api: &str, to: &str, mode: &str, extra: &[&str]) -> Proc {
    let report = scratch.0.join("report.json").display().to_string();
    let mut args = vec!["migrate", "--api-socket", api, "--to", to, "--mode", mode, "--report-json", &report];
    args.extend_from_slice(extra);
    Proc::spawn(scratch, "migrate", &args)
}

fn report(scratch: &Scratch) -> Value {
    serde_json::from_str(&std::fs::read_to_string(scratch.0.join("report.json")).unwrap()).unwrap()
}

/// The migration succeeded, the source ended, and the guest verified `pages` pages on the
/// destination. Returns the report.
fn arrived(scratch: &Scratch, mig: Proc, src: Proc, dst: Proc, pages: &str, mode: &str) -> Value {
    let (status, out, err) = mig.wait();
    assert_eq!(status, 0, "{out}\n{err}");
    let report = report(scratch);
    assert_eq!(report["mode"], mode);
    let (src_status, _, src_err) = src.wait();
    assert_eq!(src_status, 0, "the source ends once every page arrived: {src_err}");
    let (dst_status, dst_out, dst_err) = dst.wait();
    assert_eq!(dst_status, 1, "the guest's own success status:\n{dst_out}\n{dst_err}");
    assert!(dst_out.contains("migrate: moved (generation 1)"), "{dst_out}");
    assert!(dst_out.contains(&format!("{pages} pages verified: ok")), "{dst_out}");
    assert!(dst_out.contains("migrate: throughput (pages/ms)"), "{dst_out}");
    report
}

/// The post-copy part of a report adds up: every page the destination lacked arrived.
fn check_postcopy(report: &Value) -> &Value {
    let p = &report["postcopy"];
    let d = &p["destination"];
    let needed = p["pages_needed"].as_u64().unwrap();
    assert!(needed > 0, "{report}");
    assert_eq!(d["received_pages"].as_u64().unwrap(), needed, "every needed page installed: {report}");
    assert!(p["pages_pushed"].as_u64().unwrap() + p["pages_requested_sent"].as_u64().unwrap() >= needed);
    assert!(report["downtime_ms"].as_f64().unwrap() > 0.0);
    p
}

fn postcopy_dirtier(vcpus: &str) {
    let scratch = Scratch::new(&format!("pc-dirty-{vcpus}"));
    let (src, api) = workload(&scratch, &["--vcpus", vcpus], "test=migrate pages=2048 seconds=60");
    let (dst, to) = destination(&scratch);
    let mig = migrate(&scratch, &api, &to, "postcopy", &[]);
    let report = arrived(&scratch, mig, src, dst, "2048", "postcopy");
    let p = check_postcopy(&report);
    assert_eq!(report["vcpus"].as_u64().unwrap().to_string(), vcpus);
    // Nothing moved before the vCPUs but the page of the guest's generation word (the
    // destination writes it while restoring): the rest of RAM was needed.
    assert_eq!(p["pages_needed"].as_u64().unwrap(), (256 << 20 >> 12) - 1);
}

#[test]
fn postcopy_moves_a_dirtier_intact_one_vcpu() {
    require_kvm();
    postcopy_dirtier("1");
}

#[test]
fn postcopy_moves_a_dirtier_intact_two_vcpus() {
    require_kvm();
    postcopy_dirtier("2");
}

#[test]
fn postcopy_of_an_idle_guest() {
    require_kvm();
    let scratch = Scratch::new("pc-idle");
    // A working set of 64 pages stamped 200 times a second: next to idle.
    let (src, api) = workload(&scratch, &[], "test=migrate pages=64 rate=12800 seconds=60");
    let (dst, to) = destination(&scratch);
    let mig = migrate(&scratch, &api, &to, "postcopy", &[]);
    let report = arrived(&scratch, mig, src, dst, "64", "postcopy");
    let p = check_postcopy(&report);
    assert!(report["memory"]["zero_pages"].as_u64().unwrap() > 50_000, "untouched pages go as zeros: {report}");
    assert_eq!(p["reconnects"], 0);
}

#[test]
fn postcopy_of_a_guest_touching_all_memory_in_random_order() {
    require_kvm();
    let scratch = Scratch::new("pc-random");
    let (src, api) = workload(&scratch, &["--memory", "128M"], "test=migrate pages=all order=random seconds=60");
    let port = free_port();
    let to = format!("tcp:127.0.0.1:{port}");
    let dst = Proc::spawn(&scratch, "dst", &["run", "--no-stdin", "--incoming", &to]);
    dst.listening();
    let mig = migrate(&scratch, &api, &to, "postcopy", &[]);
    // 128 MiB less the 16 MiB below the working set, less what the kernel's info keeps.
    let report = arrived(&scratch, mig, src, dst, "", "postcopy");
    let d = &check_postcopy(&report)["destination"];
    assert!(d["demand_faults"].as_u64().unwrap() > 0, "a guest walking all of memory faults: {report}");
    assert!(d["fault_latency_p99_us"].as_u64().unwrap() >= d["fault_latency_p50_us"].as_u64().unwrap());
}

/// Over a Unix socket, with RAM allocated ahead: the source reads the destination's
/// messages on a thread of its own while it pushes on the same socket (see
/// `Stream::wait_readable`), and the urgent channel is a second connection to the path.
#[test]
fn postcopy_over_a_unix_socket_into_preallocated_ram() {
    require_kvm();
    let scratch = Scratch::new("pc-unix");
    let (src, api) = workload(&scratch, &["--memory", "128M"], "test=migrate pages=all seconds=60");
    let to = format!("unix:{}", scratch.0.join("dst.sock").display());
    let dst = Proc::spawn(&scratch, "dst", &["run", "--no-stdin", "--memory", "128M", "--prealloc", "--incoming", &to]);
    dst.listening();
    let mig = migrate(&scratch, &api, &to, "postcopy", &[]);
    let report = arrived(&scratch, mig, src, dst, "", "postcopy");
    let p = check_postcopy(&report);
    assert_eq!(p["reconnects"], 0, "{report}");
    // More than half: demand faults of a guest walking memory bring up to 256 pages each,
    // and on a loaded machine the guest outruns the push more often (25,483-32,767 of
    // 32,767 pushed in 10 runs on an idle one).
    let (pushed, needed) = (p["pages_pushed"].as_u64().unwrap(), p["pages_needed"].as_u64().unwrap());
    assert!(pushed > needed / 2, "the push carried most of the memory: {report}");
}

#[test]
fn hybrid_switches_to_postcopy_when_asked() {
    require_kvm();
    let scratch = Scratch::new("pc-hybrid-ask");
    // 16 MiB stamped at full speed; pre-copy capped at 50 MB/s cannot converge.
    let (src, api) = workload(&scratch, &[], "test=migrate pages=4096 seconds=60");
    let (dst, to) = destination(&scratch);
    // --manual-switch: without it, the rounds would be judged as not converging at round 1.
    // Uncompressed: the stamped pages compress ~100:1, and the cap would not slow them.
    let args = ["--max-bandwidth", "50M", "--compress", "off", "--max-rounds", "1000", "--manual-switch"];
    let mig = migrate(&scratch, &api, &to, "hybrid", &args);
    // Asked while round 1 is on the wire (it takes ~0.3 s at 50 MB/s): the switch comes
    // at the next round's check.
    wait_for("the first pre-copy round", || std::fs::read_to_string(&mig.err).unwrap().contains("\"round\":0"));
    popek(&["migrate-postcopy", "--api-socket", &api], None).expect_status(0).expect_stdout("switches to post-copy");
    let progress = std::fs::read_to_string(&mig.err).unwrap_or_default();
    let report = arrived(&scratch, mig, src, dst, "4096", "hybrid");
    let progress = progress + &std::fs::read_to_string(scratch.0.join("migrate.err")).unwrap();
    assert!(progress.contains("asked to (migrate-postcopy)"), "{progress}");
    let p = check_postcopy(&report);
    assert!(!report["rounds"].as_array().unwrap().is_empty(), "pre-copy ran first: {report}");
    // Only the re-dirtied pages were left for post-copy.
    assert!(p["pages_needed"].as_u64().unwrap() < 10_000, "{report}");
}

#[test]
fn hybrid_over_a_rate_limited_link_switches_when_precopy_cannot_keep_up() {
    require_kvm();
    let scratch = Scratch::new("pc-hybrid-netns");
    let hosts = Hosts::new();
    // 200 Mbit/s is 25 MB/s; the guest re-stamps 16 MiB many times a second.
    hosts.shape("200mbit");
    let api = scratch.0.join("api0.sock").display().to_string();
    let cmdline = "test=migrate pages=4096 seconds=60";
    let src = hosts.popek(&scratch, 0, "src", &["run", "--no-stdin", "--api-socket", &api, "--cmdline", cmdline]);
    wait_for("the source workload", || src.stdout().contains("migrate: ready"));
    let to = "tcp:198.18.0.2:7100";
    let dst = hosts.popek(&scratch, 1, "dst", &["run", "--no-stdin", "--insecure", "--incoming", to]);
    dst.listening();
    let mig = migrate(&scratch, &api, to, "hybrid", &[]);
    let report = arrived(&scratch, mig, src, dst, "4096", "hybrid");
    let progress = std::fs::read_to_string(scratch.0.join("migrate.err")).unwrap();
    assert!(progress.contains("the rounds stopped converging"), "{progress}");
    // Judged during round 0 (17 MB at 25 MB/s), whose unsent rest post-copy then moved.
    assert!(progress.contains(r#""round":0,"switch_to_postcopy""#), "{progress}");
    check_postcopy(&report);
}

/// A post-copy slow enough (bandwidth capped) to act on while it runs: returns the
/// processes once the VM runs on the destination.
fn slow_postcopy(scratch: &Scratch, to: &str, dst_args: &[&str], extra: &[&str]) -> (Proc, Proc, Proc) {
    let (src, api) = workload(scratch, &["--memory", "128M"], "test=migrate pages=all seconds=60");
    let dst = Proc::spawn(scratch, "dst", dst_args);
    dst.listening();
    // Uncompressed, as in `hybrid_switches_to_postcopy_when_asked`: slow for sure.
    let mut args = vec!["--max-bandwidth", "30M", "--compress", "off"];
    args.extend_from_slice(extra);
    let mig = migrate(scratch, &api, to, "postcopy", &args);
    wait_for("the VM to run on the destination", || {
        std::fs::read_to_string(&mig.err).unwrap_or_default().contains("running on the destination")
    });
    std::thread::sleep(Duration::from_millis(300));
    (src, dst, mig)
}

#[test]
fn a_link_cut_during_postcopy_is_recovered_and_the_guest_checks_out() {
    require_kvm();
    link_cut_recovered("pc-cut", &[]);
}

/// With RAM allocated ahead, the receiver reads pages straight into it: a cut in the
/// middle of a frame leaves those pages unmapped, to come again after the recovery.
#[test]
fn a_link_cut_during_postcopy_into_preallocated_ram_is_recovered() {
    require_kvm();
    link_cut_recovered("pc-cut-prealloc", &["--prealloc", "--memory", "128M"]);
}

fn link_cut_recovered(name: &str, dst_extra: &[&str]) {
    let scratch = Scratch::new(name);
    let port = free_port();
    let dst_addr = format!("tcp:127.0.0.1:{port}");
    let proxy = Proxy::start(format!("127.0.0.1:{port}"));
    let via = format!("tcp:127.0.0.1:{}", proxy.port);
    let mut dst_args = vec!["run", "--no-stdin", "--incoming", &dst_addr];
    dst_args.extend_from_slice(dst_extra);
    let (src, dst, mig) = slow_postcopy(&scratch, &via, &dst_args, &[]);
    proxy.cut();
    let report = arrived(&scratch, mig, src, dst, "", "postcopy");
    let p = check_postcopy(&report);
    assert!(p["reconnects"].as_u64().unwrap() >= 1, "{report}");
    assert!(p["destination"]["recoveries"].as_u64().unwrap() >= 1, "{report}");
    assert!(proxy.connections.load(std::sync::atomic::Ordering::SeqCst) >= 2);
    let progress = std::fs::read_to_string(scratch.0.join("migrate.err")).unwrap();
    assert!(progress.contains("link re-established"), "{progress}");
    let dst_err = std::fs::read_to_string(scratch.0.join("dst.err")).unwrap();
    assert!(dst_err.contains("post-copy link lost"), "{dst_err}");
}

#[test]
fn a_killed_destination_during_postcopy_is_reported_by_the_source() {
    require_kvm();
    let scratch = Scratch::new("pc-kill-dst");
    let to = format!("tcp:127.0.0.1:{}", free_port());
    let (src, mut dst, mig) =
        slow_postcopy(&scratch, &to, &["run", "--no-stdin", "--incoming", &to], &["--recover-timeout", "2"]);
    dst.child.kill().unwrap();
    let (status, _, err) = mig.wait();
    assert_eq!(status, 18, "{err}");
    assert!(err.contains("unrecoverable"), "{err}");
    let (src_status, _, src_err) = src.wait();
    assert_eq!(src_status, 18, "{src_err}");
    assert!(src_err.contains("not re-established"), "{src_err}");
}

#[test]
fn a_killed_source_during_postcopy_is_reported_by_the_destination() {
    require_kvm();
    let scratch = Scratch::new("pc-kill-src");
    let to = format!("tcp:127.0.0.1:{}", free_port());
    let dst_args = ["run", "--no-stdin", "--recover-timeout", "2", "--incoming", &to];
    let (mut src, dst, _mig) = slow_postcopy(&scratch, &to, &dst_args, &[]);
    src.child.kill().unwrap();
    let (status, _, err) = dst.wait();
    assert_eq!(status, 18, "{err}");
    assert!(err.contains("post-copy link lost"), "{err}");
    assert!(err.contains("unrecoverable"), "{err}");
}

/// A destination with its RAM allocated ahead (`--prealloc`), for both ways of filling it.
fn prealloc_destination(scratch: &Scratch, memory: &str) -> (Proc, String) {
    let to = format!("unix:{}", scratch.0.join("dst.sock").display());
    let dst = Proc::spawn(scratch, "dst", &["run", "--no-stdin", "--prealloc", "--memory", memory, "--incoming", &to]);
    dst.listening();
    assert!(std::fs::read_to_string(&dst.err).unwrap().contains("allocated 256 MiB of guest RAM"));
    (dst, to)
}

#[test]
fn postcopy_into_preallocated_ram_maps_pages_with_minor_faults() {
    require_kvm();
    let scratch = Scratch::new("pc-prealloc");
    let (src, api) = workload(&scratch, &[], "test=migrate pages=2048 order=random seconds=60");
    let (dst, to) = prealloc_destination(&scratch, "256M");
    let mig = migrate(&scratch, &api, &to, "postcopy", &[]);
    let report = arrived(&scratch, mig, src, dst, "2048", "postcopy");
    check_postcopy(&report);
}

#[test]
fn stop_copy_into_preallocated_ram_and_a_size_mismatch_is_refused() {
    require_kvm();
    let scratch = Scratch::new("pc-prealloc-stop");
    let (src, api) = workload(&scratch, &[], "test=migrate pages=2048 seconds=60");
    // A destination prepared for another size refuses, and the source runs on.
    let to = format!("unix:{}", scratch.0.join("small.sock").display());
    let small =
        Proc::spawn(&scratch, "small", &["run", "--no-stdin", "--prealloc", "--memory", "128M", "--incoming", &to]);
    small.listening();
    popek(&["migrate", "--api-socket", &api, "--to", &to], None)
        .expect_status(18)
        .expect_stderr("prepared 134217728 bytes of RAM");
    assert_eq!(small.wait().0, 18);
    let (dst, to) = prealloc_destination(&scratch, "256M");
    let mig = migrate(&scratch, &api, &to, "stop-copy", &["--verify-memory"]);
    let report = arrived(&scratch, mig, src, dst, "2048", "stop-copy");
    assert_eq!(report["memory_verified"], true, "the destination's RAM equals the source's at the pause: {report}");
}
