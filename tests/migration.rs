//! Live migration between two real popek processes on real KVM: stop-and-copy over unix and
//! TCP sockets, 1 and 2 vCPUs, with the guest's workload verifying its memory on the
//! destination; failures leave the source VM running.

mod common;
use common::procs::*;
use common::wire::{read_frame, write_frame};
use common::*;
use popek::migration::protocol::VERSION;
use std::path::{Path, PathBuf};

fn source(scratch: &Scratch, vcpus: &str) -> (Proc, String) {
    source_moving(scratch, vcpus, 1)
}

fn source_moving(scratch: &Scratch, vcpus: &str, moves: u32) -> (Proc, String) {
    workload(scratch, &["--vcpus", vcpus], &format!("test=migrate pages=2048 seconds=60 moves={moves}"))
}

/// The source ended once the destination ran the VM, and the guest found all `pages`
/// pages intact there.
fn expect_arrived(src: Proc, dst: Proc, pages: u32) {
    assert_eq!(src.wait().0, 0);
    let (status, out, _) = dst.wait();
    assert_eq!(status, 1, "{out}");
    assert!(out.contains(&format!("{pages} pages verified: ok")), "{out}");
}

fn migrate_to(api: &str, to: &str, report: &Path) -> Run {
    popek(
        &["migrate", "--api-socket", api, "--to", to, "--verify-memory", "--report-json", report.to_str().unwrap()],
        None,
    )
}

fn precopy_with(api: &str, to: &str, report: &Path, extra: &[&str]) -> Run {
    let mut args =
        vec!["migrate", "--api-socket", api, "--to", to, "--mode", "precopy", "--verify-memory", "--report-json"];
    args.push(report.to_str().unwrap());
    args.extend(extra);
    popek(&args, None)
}

/// Stop-and-copy to a fresh destination on a Unix socket; checks the move and the guest's
/// memory on arrival (1 vCPU).
fn move_intact(scratch: &Scratch, src: Proc, api: &str) {
    let (dst, dst_addr) = destination(scratch);
    let run = migrate_to(api, &dst_addr, &scratch.0.join("report.json"));
    check_moved(scratch, src, dst, &run, 1);
}

fn check_moved(scratch: &Scratch, src: Proc, dst: Proc, run: &Run, vcpus: u64) {
    check_moved_as(scratch, src, dst, run, vcpus, "stop-copy")
}

fn check_moved_as(scratch: &Scratch, src: Proc, dst: Proc, run: &Run, vcpus: u64, mode: &str) {
    run.expect_status(0).expect_stdout("\"downtime_ms\"");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(scratch.0.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["mode"], mode);
    assert_eq!(report["memory_verified"], true, "the destination's RAM equals the source's at the pause");
    assert_eq!(report["vcpus"], vcpus);
    assert!(report["downtime_ms"].as_f64().unwrap() > 0.0);
    assert!(report["memory"]["zero_pages"].as_u64().unwrap() > 0, "zero pages are skipped");
    let (src_status, _, src_err) = src.wait();
    assert_eq!(src_status, 0, "the source ends once the destination runs: {src_err}");
    assert!(src_err.contains("the VM moved away"));
    let (dst_status, dst_out, dst_err) = dst.wait();
    assert_eq!(dst_status, 1, "the guest's own success status on the destination:\n{dst_out}\n{dst_err}");
    assert!(dst_out.contains("migrate: moved (generation 1)"), "{dst_out}");
    assert!(dst_out.contains("2048 pages verified: ok"), "{dst_out}");
}

#[test]
fn stop_copy_over_a_unix_socket_one_vcpu() {
    require_kvm();
    let scratch = Scratch::new("mig-unix");
    let (src, api) = source(&scratch, "1");
    move_intact(&scratch, src, &api);
}

#[test]
fn stop_copy_over_tcp_two_vcpus() {
    require_kvm();
    let scratch = Scratch::new("mig-tcp");
    let port = 20000 + (std::process::id() % 20000) as u16;
    let dst_addr = format!("tcp:127.0.0.1:{port}");
    let dst = Proc::spawn(&scratch, "dst", &["run", "--no-stdin", "--incoming", &dst_addr]);
    let (src, api) = source(&scratch, "2");
    dst.listening();
    let run = migrate_to(&api, &dst_addr, &scratch.0.join("report.json"));
    check_moved(&scratch, src, dst, &run, 2);
}

#[test]
fn failed_migrations_leave_the_source_running() {
    require_kvm();
    let scratch = Scratch::new("mig-fail");
    let (src, api) = source(&scratch, "1");
    // Nobody listening: refused at connect.
    let nowhere = format!("unix:{}", scratch.0.join("nobody.sock").display());
    migrate_to(&api, &nowhere, &scratch.0.join("r0.json")).expect_status(18).expect_stderr("Cannot connect");
    // A destination that cannot host the VM refuses in the handshake: here, one whose KVM
    // device is missing.
    let bad_addr = format!("unix:{}", scratch.0.join("bad.sock").display());
    let bad = Proc::spawn(
        &scratch,
        "bad",
        &["run", "--no-stdin", "--incoming", &bad_addr, "--kvm-device", "/nonexistent/kvm"],
    );
    bad.listening();
    migrate_to(&api, &bad_addr, &scratch.0.join("r1.json")).expect_status(18).expect_stderr("cannot build the VM");
    let (bad_status, _, bad_err) = bad.wait();
    assert_eq!(bad_status, 18, "{bad_err}");
    // A bad mode or address is refused before anything happens.
    popek(&["migrate", "--api-socket", &api, "--to", "carrier-pigeon", "--mode", "stop-copy"], None).expect_status(18);
    popek(&["migrate", "--api-socket", &api, "--to", &nowhere, "--mode", "teleport"], None).expect_status(18);
    // Still running, and its memory intact: a real migration afterwards verifies it.
    popek(&["status", "--api-socket", &api], None).expect_status(0).expect_stdout("\"running\"");
    move_intact(&scratch, src, &api);
}

#[test]
fn forged_streams_are_refused_and_nothing_runs() {
    require_kvm();
    let scratch = Scratch::new("mig-forged");
    for (i, garbage) in [
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        vec![0u8; 64],
        b"PPKM\x01\x00\x01\x00\xff\xff\xff\xff\xff\xff\xff\xff".to_vec(),
    ]
    .iter()
    .enumerate()
    {
        expect_refused(&scratch, &format!("dst{i}"), &[], garbage);
    }
}

#[test]
fn precopy_with_the_guest_dirtying_memory_one_and_two_vcpus() {
    require_kvm();
    for vcpus in ["1", "2"] {
        let scratch = Scratch::new(&format!("mig-pre{vcpus}"));
        let (src, api) = source(&scratch, vcpus);
        let (dst, dst_addr) = destination(&scratch);
        let run = precopy_with(&api, &dst_addr, &scratch.0.join("report.json"), &[]);
        // Progress: one line per round on stderr.
        run.expect_stderr("popek: migration {").expect_stderr("\"round\":0");
        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(scratch.0.join("report.json")).unwrap()).unwrap();
        assert!(!report["rounds"].as_array().unwrap().is_empty(), "{report:#}");
        check_moved_as(&scratch, src, dst, &run, vcpus.parse().unwrap(), "precopy");
    }
}

#[test]
fn precopy_sends_pages_sent_again_as_deltas_unless_told_not_to() {
    require_kvm();
    for cache in ["128M", "0"] {
        let scratch = Scratch::new(&format!("mig-delta{cache}"));
        let (src, api) = source(&scratch, "1");
        let (dst, dst_addr) = destination(&scratch);
        let report_path = scratch.0.join("report.json");
        // Never converging (a 0 ms limit), four rounds of the dirtier re-stamping all of
        // its pages (each whole round takes long enough at 20 MB/s, on any host): from the
        // first round that re-sends nearly everything on, deltas.
        let extra = ["--downtime-limit", "0", "--max-rounds", "4", "--max-bandwidth", "20M", "--delta-cache", cache];
        let run = precopy_with(&api, &dst_addr, &report_path, &extra);
        let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report_path).unwrap()).unwrap();
        let deltas = report["memory"]["delta_pages"].as_u64().unwrap();
        if cache == "0" {
            assert_eq!(deltas, 0, "{report:#}");
        } else {
            run.expect_stderr("pages sent again go as deltas");
            assert!(deltas > 0, "{report:#}");
            // Round 0 filled the cache: round 1, the dirtier's whole working set again,
            // goes as deltas already (a few dozen bytes a page, not 4 KiB).
            let round1 = &report["rounds"][1];
            let bytes = round1["mb_s"].as_f64().unwrap() * round1["ms"].as_f64().unwrap() * 1e3;
            let pages = round1["pages"].as_f64().unwrap();
            assert!(pages > 1000.0 && bytes < pages * 512.0, "round 1: {bytes} bytes for {pages} pages: {report:#}");
        }
        // The destination's RAM is still checked byte for byte, and the guest its pages.
        check_moved_as(&scratch, src, dst, &run, 1, "precopy");
    }
}

#[test]
fn a_slow_link_gets_compressed_frames_unless_told_not_to() {
    require_kvm();
    // Post-copy's pushed pages (PostcopyPagesLz4) too.
    for (mode, compress) in [("stop-copy", "auto"), ("stop-copy", "off"), ("postcopy", "auto")] {
        let scratch = Scratch::new(&format!("mig-lz4{mode}{compress}"));
        let (src, api) = source(&scratch, "1");
        let (dst, dst_addr) = destination(&scratch);
        let report_path = scratch.0.join("report.json");
        // 16 MB/s: the first frame (4 MiB, sent raw to time the link) takes a quarter of a
        // second; compressing is hundreds of times faster than that on any host.
        let (report_arg, args) = (report_path.to_str().unwrap(), ["--max-bandwidth", "16M", "--compress", compress]);
        let mut argv = vec!["migrate", "--api-socket", &api, "--to", &dst_addr, "--mode", mode];
        if mode == "stop-copy" {
            argv.push("--verify-memory");
        }
        argv.extend(["--report-json", report_arg]);
        argv.extend(args);
        let run = popek(&argv, None);
        let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report_path).unwrap()).unwrap();
        let (frames, saved) = (&report["memory"]["compressed_frames"], &report["memory"]["compression_saved"]);
        let wire = report["memory"]["bytes_on_wire"].as_u64().unwrap();
        if compress == "off" {
            assert_eq!(frames, 0, "{report:#}");
            assert!(wire > 2048 * 4096, "the stamped pages went whole: {report:#}");
        } else {
            assert!(frames.as_u64().unwrap() > 0 && saved.as_u64().unwrap() > 4 << 20, "{report:#}");
            assert!(wire < 2048 * 4096, "{report:#}");
        }
        // Compressed or not, the destination's RAM is the source's (stop-and-copy checks),
        // and the guest's pages are intact.
        if mode == "stop-copy" {
            check_moved(&scratch, src, dst, &run, 1);
        } else {
            run.expect_status(0);
            expect_arrived(src, dst, 2048);
        }
    }
}

#[test]
fn back_and_forth_ten_times() {
    require_kvm();
    let scratch = Scratch::new("mig-10");
    let (current, api) = source_moving(&scratch, "1", 10);
    hop_ten_times(current, api, |hop| {
        let to = format!("unix:{}", scratch.0.join(format!("dst{hop}.sock")).display());
        let api = scratch.0.join(format!("api{hop}.sock")).display().to_string();
        let dst = Proc::spawn(
            &scratch,
            &format!("hop{hop}"),
            &["run", "--no-stdin", "--incoming", &to, "--api-socket", &api],
        );
        (dst, to, api)
    });
}

/// Moves the VM ten times: `next(hop)` starts the next destination and returns it with its
/// migration address and control socket. Alternates the modes; checks each previous host
/// ends once the next runs the VM, and that the guest verified its memory after the last.
fn hop_ten_times(mut current: Proc, mut api: String, mut next: impl FnMut(u16) -> (Proc, String, String)) {
    for hop in 1..=10u16 {
        let (dst, to, dst_api) = next(hop);
        dst.listening();
        let mode = if hop % 2 == 0 { "stop-copy" } else { "precopy" };
        popek(&["migrate", "--api-socket", &api, "--to", &to, "--mode", mode, "--verify-memory"], None)
            .expect_status(0);
        let (status, _, err) = current.wait();
        assert_eq!(status, 0, "hop {hop}: the previous host ends once the next one runs the VM: {err}");
        current = dst;
        api = dst_api;
    }
    // Ten moves later the guest has verified its memory after each and ends successfully;
    // its console output continued on every host.
    let (status, out, err) = current.wait();
    assert_eq!(status, 1, "{out}\n{err}");
    assert!(out.contains("migrate: moved (generation 10)") && out.contains("pages verified: ok"), "{out}");
}

#[test]
fn a_killed_destination_leaves_the_source_running() {
    require_kvm();
    let scratch = Scratch::new("mig-kill");
    let (src, api) = source(&scratch, "1");
    // A destination that accepts and then dies mid-transfer: a listener we close.
    let path = scratch.0.join("dying.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let killer = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut header = [0u8; 64];
        let _ = std::io::Read::read(&mut stream, &mut header);
        drop(stream);
    });
    let to = format!("unix:{}", path.display());
    migrate_to(&api, &to, &scratch.0.join("r.json")).expect_status(18);
    killer.join().unwrap();
    popek(&["status", "--api-socket", &api], None).expect_status(0).expect_stdout("\"running\"");
    // And it still moves, intact, to a real destination.
    move_intact(&scratch, src, &api);
}

#[test]
fn authentication_with_a_shared_key() {
    require_kvm();
    let scratch = Scratch::new("mig-auth");
    let key = scratch.file("key", b"a shared secret of some length\n");
    let other = scratch.file("other", b"another secret, not the same one\n");
    let (src, api) = workload(&scratch, &["--auth-key", &key], "test=migrate pages=512 seconds=60");
    // A destination with another key, and one with none: both refuse; the source runs on.
    for (i, dst_key) in [Some(other.as_str()), None].iter().enumerate() {
        let addr = format!("unix:{}", scratch.0.join(format!("bad{i}.sock")).display());
        let mut args = vec!["run", "--no-stdin", "--incoming", &addr];
        if let Some(k) = dst_key {
            args.extend(["--auth-key", k]);
        }
        let dst = Proc::spawn(&scratch, &format!("bad{i}"), &args);
        dst.listening();
        migrate_to(&api, &addr, &scratch.0.join("r.json")).expect_status(18).expect_stderr("auth");
        let (status, out, err) = dst.wait();
        assert_eq!(status, 18, "{err}");
        assert!(out.is_empty(), "nothing ran: {out}");
    }
    popek(&["status", "--api-socket", &api], None).expect_status(0).expect_stdout("\"running\"");
    // The same key: the move goes through.
    let addr = format!("unix:{}", scratch.0.join("dst.sock").display());
    let dst = Proc::spawn(&scratch, "dst", &["run", "--no-stdin", "--incoming", &addr, "--auth-key", &key]);
    dst.listening();
    migrate_to(&api, &addr, &scratch.0.join("report.json")).expect_status(0);
    expect_arrived(src, dst, 512);
}

#[test]
fn non_loopback_incoming_needs_a_key_or_insecure() {
    popek(&["run", "--incoming", "tcp:0.0.0.0:1"], None).expect_status(4).expect_stderr("without --auth-key");
    let scratch = Scratch::new("mig-shortkey");
    let short = scratch.file("short", b"tiny");
    popek(&["run", "--incoming", "tcp:0.0.0.0:1", "--auth-key", &short], None)
        .expect_status(4)
        .expect_stderr("shorter than 16 bytes");
}

/// A destination that follows the protocol up to `phase`, then drops the connection.
fn fake_destination(path: PathBuf, phase: &'static str) -> std::thread::JoinHandle<()> {
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let Some(_hello) = read_frame(&mut s) else { return };
        if phase == "hello" {
            return;
        }
        let version = if phase == "version" { VERSION + 1 } else { VERSION };
        write_frame(&mut s, 2, br#"{"reason":""}"#, version);
        if phase == "accept" || phase == "version" {
            return;
        }
        let mut memory = 0;
        while let Some((kind, payload)) = read_frame(&mut s) {
            if kind == 18 {
                // Populate (stop-and-copy, before the pause): dies unanswered, or allocates.
                if phase == "populate" {
                    return;
                }
                write_frame(&mut s, 2, br#"{"reason":""}"#, VERSION);
                continue;
            }
            memory += payload.len();
            if phase == "memory" && memory > 64 * 1024 {
                return;
            }
            if kind == 6 {
                // Complete: a dead destination never says Running.
                return;
            }
        }
    })
}

#[test]
fn a_cut_at_each_phase_leaves_the_source_running() {
    require_kvm();
    let scratch = Scratch::new("mig-cuts");
    let (src, api) = source(&scratch, "1");
    for phase in ["hello", "version", "accept", "populate", "memory", "complete"] {
        for mode in ["stop-copy", "precopy"] {
            if phase == "populate" && mode == "precopy" {
                continue; // only stop-and-copy sends Populate
            }
            let path = scratch.0.join(format!("{phase}-{mode}.sock"));
            let fake = fake_destination(path.clone(), phase);
            let to = format!("unix:{}", path.display());
            let run = popek(&["migrate", "--api-socket", &api, "--to", &to, "--mode", mode], None);
            run.expect_status(18);
            if phase == "version" {
                run.expect_stderr(&format!("protocol version {}", VERSION + 1));
            }
            fake.join().unwrap();
            popek(&["status", "--api-socket", &api], None).expect_status(0).expect_stdout("\"running\"");
        }
    }
    // Eleven failed attempts later the VM is intact: a real move verifies every page.
    move_intact(&scratch, src, &api);
}

#[test]
fn a_destination_refuses_a_vm_it_cannot_host() {
    require_kvm();
    let scratch = Scratch::new("mig-size");
    let path = scratch.0.join("dst.sock");
    let addr = format!("unix:{}", path.display());
    let dst = Proc::spawn(&scratch, "dst", &["run", "--no-stdin", "--incoming", &addr]);
    dst.listening();
    let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
    let hello = br#"{"popek_version":"0.1.0","memory_bytes":1099511627776,"vcpus":1,"firmware":false,"msr_policy_zero":false,"tsc_khz":null,"cpuid_crc32":0}"#;
    write_frame(&mut s, 1, hello, VERSION);
    let (kind, payload) = read_frame(&mut s).expect("an answer");
    assert_eq!(kind, 3, "Refuse");
    let reason = String::from_utf8_lossy(&payload);
    assert!(reason.contains("cannot host the VM") && reason.contains("too large"), "{reason}");
    let (status, out, err) = dst.wait();
    assert_eq!(status, 18, "{err}");
    assert!(out.is_empty());
}

#[test]
fn across_two_network_namespaces_back_and_forth_ten_times() {
    require_kvm();
    let scratch = Scratch::new("mig-netns");
    let hosts = Hosts::new();
    let key = scratch.file("key", b"the two hosts share this key\n");
    let api = scratch.0.join("api0.sock").display().to_string();
    let current = hosts.popek(
        &scratch,
        0,
        "hop0",
        &[
            "run",
            "--no-stdin",
            "--auth-key",
            &key,
            "--api-socket",
            &api,
            "--cmdline",
            "test=migrate pages=2048 seconds=60 moves=10",
        ],
    );
    wait_for("the source workload", || current.stdout().contains("migrate: ready"));
    hop_ten_times(current, api, |hop| {
        let host = usize::from(hop % 2);
        let to = format!("tcp:198.18.0.{}:{}", host + 1, 7000 + hop);
        let api = scratch.0.join(format!("api{hop}.sock")).display().to_string();
        let args = ["run", "--no-stdin", "--auth-key", &key, "--incoming", &to, "--api-socket", &api];
        let dst = hosts.popek(&scratch, host, &format!("hop{hop}"), &args);
        (dst, to, api)
    });
}

#[test]
fn rate_limited_precopy_of_a_rate_limited_dirtier_and_stats() {
    require_kvm();
    let scratch = Scratch::new("mig-rate");
    // 4096 pages at 5,000 pages/s (20 MB/s): a dirtier pre-copy at 64 MiB/s outruns.
    let (src, api) = workload(&scratch, &[], "test=migrate pages=4096 rate=5000 seconds=60");
    popek(&["stats", "--api-socket", &api], None)
        .expect_status(0)
        .expect_stdout("\"exits\"")
        .expect_stdout("\"hypercalls\"");
    let (dst, dst_addr) = destination(&scratch);
    let report = scratch.0.join("report.json");
    let run = popek(
        &[
            "migrate",
            "--api-socket",
            &api,
            "--to",
            &dst_addr,
            "--mode",
            "precopy",
            "--max-bandwidth",
            "64M",
            "--verify-memory",
            "--report-json",
            report.to_str().unwrap(),
        ],
        None,
    );
    run.expect_status(0).expect_stderr("popek: migrated to");
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    // The first pass moves 16 MiB of stamped pages at most at 64 MiB/s: at least 0.2 s.
    let first = &r["rounds"][0];
    assert!(first["mb_s"].as_f64().unwrap() < 64.0 * 1.05 * 1.048_576, "{first}");
    assert_eq!(r["memory_verified"], true);
    expect_arrived(src, dst, 4096);
    popek(&["migrate", "--api-socket", &api, "--to", &dst_addr, "--max-bandwidth", "fast"], None).expect_status(2);
}

#[test]
fn precopy_with_auto_converge_moves_a_fast_dirtier_intact() {
    require_kvm();
    let scratch = Scratch::new("mig-ac");
    let (src, api) = workload(&scratch, &[], "test=migrate pages=8192 seconds=60");
    let (dst, dst_addr) = destination(&scratch);
    let report = scratch.0.join("report.json");
    let args = [
        "migrate",
        "--api-socket",
        &api,
        "--to",
        &dst_addr,
        "--mode",
        "precopy",
        "--auto-converge",
        "--max-rounds",
        "20",
        "--verify-memory",
        "--report-json",
        report.to_str().unwrap(),
    ];
    popek(&args, None).expect_status(0);
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(r["memory_verified"], true);
    expect_arrived(src, dst, 8192);
}

/// Relays one connection from `listen` to `target`, recording what the source sent.
fn recording_relay(listen: PathBuf, target: PathBuf) -> std::thread::JoinHandle<Vec<u8>> {
    let listener = std::os::unix::net::UnixListener::bind(&listen).unwrap();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut src, _) = listener.accept().unwrap();
        let mut dst = std::os::unix::net::UnixStream::connect(&target).unwrap();
        let (mut src_back, mut dst_back) = (src.try_clone().unwrap(), dst.try_clone().unwrap());
        let back = std::thread::spawn(move || {
            let _ = std::io::copy(&mut dst_back, &mut src_back);
        });
        let mut recorded = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        while let Ok(n) = src.read(&mut buf) {
            if n == 0 || dst.write_all(&buf[..n]).is_err() {
                break;
            }
            recorded.extend_from_slice(&buf[..n]);
        }
        let _ = dst.shutdown(std::net::Shutdown::Write);
        let _ = back.join();
        recorded
    })
}

/// Frame boundaries of a recorded stream: (offset, kind, payload length).
fn frames(stream: &[u8]) -> Vec<(usize, u16, usize)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 16 <= stream.len() {
        let kind = u16::from_le_bytes([stream[at + 6], stream[at + 7]]);
        let len = u64::from_le_bytes(stream[at + 8..at + 16].try_into().unwrap()) as usize;
        out.push((at, kind, len));
        at += 16 + len;
    }
    out
}

/// Sends `bytes` to a fresh destination (with `extra` arguments), closes, and checks it
/// refuses cleanly: status 18, the failure said, no guest output, no panic.
fn expect_refused(scratch: &Scratch, tag: &str, extra: &[&str], bytes: &[u8]) -> String {
    use std::io::Write;
    let path = scratch.0.join(format!("{tag}.sock"));
    let addr = format!("unix:{}", path.display());
    let mut args = vec!["run", "--no-stdin", "--incoming", &addr];
    args.extend_from_slice(extra);
    let dst = Proc::spawn(scratch, tag, &args);
    dst.listening();
    let mut stream = std::os::unix::net::UnixStream::connect(&path).unwrap();
    let _ = stream.write_all(bytes);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let (status, out, err) = dst.wait();
    assert_eq!(status, 18, "{tag}: refused cleanly (status 18): {err}");
    assert!(err.contains("incoming migration failed"), "{tag}: {err}");
    assert!(out.is_empty(), "{tag}: no guest ran from a bad stream: {out}");
    assert!(!err.contains("panicked"), "{tag}: {err}");
    err
}

#[test]
fn truncated_corrupted_and_replayed_streams_are_refused() {
    require_kvm();
    // Raw Memory frames (kind 5), then compressed ones (MemoryLz4, 19).
    for (compress, memory_kind) in [("off", 5), ("on", 19)] {
        streams_cut_and_corrupted_are_refused(
            &Scratch::new(&format!("mig-streamfuzz-{compress}")),
            compress,
            memory_kind,
        );
    }
}

fn streams_cut_and_corrupted_are_refused(scratch: &Scratch, compress: &str, memory_kind: u16) {
    // Record a real stop-and-copy stream through a relay (the move itself succeeds).
    let (src, api) = source(scratch, "1");
    let (dst, dst_addr) = destination(scratch);
    let relay_path = scratch.0.join("relay.sock");
    let recorder = recording_relay(relay_path.clone(), dst_addr.trim_start_matches("unix:").into());
    let report = scratch.0.join("report.json");
    let to = format!("unix:{}", relay_path.display());
    let argv = ["migrate", "--api-socket", &api, "--to", &to, "--verify-memory", "--compress", compress];
    let run = popek(&[&argv[..], &["--report-json", report.to_str().unwrap()]].concat(), None);
    check_moved(scratch, src, dst, &run, 1);
    let stream = recorder.join().unwrap();
    let frames = frames(&stream);
    let kinds: Vec<u16> = frames.iter().map(|f| f.1).collect();
    assert_eq!(kinds.first(), Some(&1), "Hello first: {kinds:?}");
    assert_eq!(kinds.last(), Some(&6), "Complete last: {kinds:?}");
    let state = frames.iter().find(|f| f.1 == 4).expect("a State frame");
    let memory = frames.iter().find(|f| f.1 == memory_kind && f.2 > 4096).expect("a Memory frame with data");

    // Cut at the end of every frame but the last, and inside frames.
    for (i, &(at, _, len)) in frames.iter().enumerate() {
        expect_refused(scratch, &format!("cut{i}"), &[], &stream[..at + 16 + len / 2]);
    }
    // A flipped bit in page data (CRC32 of the memory stream; a compressed frame may
    // instead no longer decompress) and in the state.
    let mut bad = stream.clone();
    bad[memory.0 + 16 + memory.2 - 100] ^= 0x10;
    let err = expect_refused(scratch, "memflip", &[], &bad);
    assert!(err.contains("checksum") || err.contains("decompress"), "{err}");
    // A bit flipped in the middle of the state: caught by the state's own checksum before
    // anything of it is restored.
    let mut bad = stream.clone();
    bad[state.0 + 16 + state.2 / 2] ^= 0x10;
    let err = expect_refused(scratch, "stateflip", &[], &bad);
    assert!(err.contains("Machine state checksum mismatch"), "{err}");
    // A Memory frame replayed: the checksum no longer adds up.
    let mut replayed = stream[..memory.0 + 16 + memory.2].to_vec();
    replayed.extend_from_slice(&stream[memory.0..]);
    let err = expect_refused(scratch, "replay", &[], &replayed);
    assert!(err.contains("checksum"), "{err}");
    // Hello twice.
    let mut twice = stream[..frames[1].0].to_vec();
    twice.extend_from_slice(&stream);
    expect_refused(scratch, "hello2", &[], &twice);
}

#[test]
fn a_recorded_authenticated_stream_cannot_be_replayed() {
    require_kvm();
    let scratch = Scratch::new("mig-replay-auth");
    let key = scratch.file("key", b"a key both sides share, 32 bytes");
    let api = scratch.0.join("src.sock").display().to_string();
    let src = Proc::spawn(
        &scratch,
        "src",
        &["run", "--no-stdin", "--auth-key", &key, "--api-socket", &api, "--cmdline", "test=migrate pages=256"],
    );
    wait_for("the source workload", || src.stdout().contains("migrate: ready"));
    let dst_path = scratch.0.join("dst.sock");
    let dst_addr = format!("unix:{}", dst_path.display());
    let dst = Proc::spawn(&scratch, "dst", &["run", "--no-stdin", "--auth-key", &key, "--incoming", &dst_addr]);
    dst.listening();
    let relay_path = scratch.0.join("relay.sock");
    let recorder = recording_relay(relay_path.clone(), dst_path);
    popek(&["migrate", "--api-socket", &api, "--to", &format!("unix:{}", relay_path.display())], None).expect_status(0);
    expect_arrived(src, dst, 256);
    let stream = recorder.join().unwrap();
    // The same bytes again, to a destination holding the same key: its fresh nonce makes
    // the recorded proof worthless.
    let err = expect_refused(&scratch, "replayed", &["--auth-key", &key], &stream);
    assert!(err.contains("incoming migration failed"), "{err}");
}

/// A destination for post-copy and hybrid that dies at `phase`: after Hello, after
/// Accept, after taking the urgent channel, or once the machine state arrived (the VM
/// never ran there). It answers the barriers (Sync, Discard) hybrid's rounds send.
fn fake_postcopy_destination(path: PathBuf, phase: &'static str) -> std::thread::JoinHandle<&'static str> {
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        let accept = br#"{"reason":""}"#;
        let (mut s, _) = listener.accept().unwrap();
        let Some(_hello) = read_frame(&mut s) else { return "nothing" };
        if phase == "hello" {
            return "hello";
        }
        write_frame(&mut s, 2, accept, VERSION);
        if phase == "accept" {
            return "accept";
        }
        let (mut urgent, _) = listener.accept().unwrap();
        if read_frame(&mut urgent).map(|f| f.0) != Some(15) {
            return "no urgent channel";
        }
        write_frame(&mut urgent, 2, accept, VERSION);
        if phase == "urgent" {
            return "urgent";
        }
        while let Some((kind, _)) = read_frame(&mut s) {
            match kind {
                16 | 17 => write_frame(&mut s, 2, accept, VERSION),
                4 => return "state", // die before the VM could run here
                _ => {}
            }
        }
        "no state"
    })
}

#[test]
fn a_postcopy_that_fails_before_the_vm_runs_there_leaves_the_source_running() {
    require_kvm();
    let scratch = Scratch::new("mig-pc-cuts");
    let (src, api) = source(&scratch, "1");
    for phase in ["hello", "accept", "urgent", "state"] {
        for mode in ["postcopy", "hybrid"] {
            let path = scratch.0.join(format!("{phase}-{mode}.sock"));
            let fake = fake_postcopy_destination(path.clone(), phase);
            let to = format!("unix:{}", path.display());
            let run = popek(&["migrate", "--api-socket", &api, "--to", &to, "--mode", mode], None);
            run.expect_status(18);
            assert_eq!(fake.join().unwrap(), phase, "{mode}: the fake destination got as far as planned");
            popek(&["status", "--api-socket", &api], None).expect_status(0).expect_stdout("\"running\"");
        }
    }
    // Eight failed attempts later the VM is intact: a real move verifies every page.
    move_intact(&scratch, src, &api);
}
