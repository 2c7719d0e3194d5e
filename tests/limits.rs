//! Bounded resources: nothing a peer or a control client sends makes the VMM allocate
//! without bound. One test per limit, each through the real binary (docs/security.md
//! lists the limits; the guest-side ones are in traps.rs and hypercall.rs).

mod common;
use common::procs::*;
use common::wire::read_frame;
use common::*;
use popek::migration::protocol::VERSION;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

/// The protocol's frame limit (docs/migration.md) and page-request limit.
const MAX_PAYLOAD: u64 = 64 << 20;
const MAX_REQUEST_PAGES: usize = 4096;

/// Resident memory of a process in KiB (VmRSS).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn a_frame_over_the_limit_is_refused_before_anything_is_allocated() {
    require_kvm();
    let scratch = Scratch::new("limit-frame");
    let (dst, to) = destination(&scratch);
    let path = to.strip_prefix("unix:").unwrap();
    let mut s = UnixStream::connect(path).unwrap();
    // A Hello that claims one byte more than the limit, then nothing.
    let mut header = common::wire::frame(1, b"", VERSION);
    header[8..16].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
    s.write_all(&header).unwrap();
    let (status, out, err) = dst.wait();
    assert_eq!(status, 18, "{err}");
    assert!(err.contains("exceeds the 67108864-byte limit"), "{err}");
    assert!(out.is_empty(), "nothing ran: {out}");
}

#[test]
fn an_endless_control_request_is_cut_at_the_limit_and_the_vm_answers_on() {
    require_kvm();
    let scratch = Scratch::new("limit-api");
    let (src, api) = workload(&scratch, &[], "test=migrate pages=64 seconds=60");
    let before = rss_kib(src.child.id());
    let mut client = UnixStream::connect(&api).unwrap();
    client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut reader = std::io::BufReader::new(client.try_clone().unwrap());
    // 16 MiB without a newline: the VM reads it in 64 KiB pieces, refusing each.
    let writer = std::thread::spawn(move || {
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..16 {
            if client.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    let mut line = String::new();
    std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
    assert!(line.contains("\"ok\":false"), "{line}");
    assert!(line.len() < 4096, "the refusal does not echo the request back: {} bytes", line.len());
    // Drain the remaining refusals so the writer can finish.
    let drain = std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = reader.read_to_end(&mut sink);
    });
    writer.join().unwrap();
    let grown = rss_kib(src.child.id()).saturating_sub(before);
    assert!(grown < 8 * 1024, "16 MiB of request grew the VMM by {grown} KiB");
    popek(&["status", "--api-socket", &api], None).expect_status(0).expect_stdout("\"running\"");
    drop(src);
    let _ = drain.join();
}

/// A post-copy destination that accepts everything up to the machine state, then floods
/// the source with page requests without ever reading its answers, for `seconds`.
fn flooding_destination(path: std::path::PathBuf, seconds: u64) -> std::thread::JoinHandle<u64> {
    let listener = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        let accept = common::wire::frame(2, br#"{"reason":""}"#, VERSION);
        let (mut s, _) = listener.accept().unwrap();
        read_frame(&mut s).unwrap();
        s.write_all(&accept).unwrap();
        let (mut urgent, _) = listener.accept().unwrap();
        assert_eq!(read_frame(&mut urgent).unwrap().0, 15, "the urgent channel's greeting");
        urgent.write_all(&accept).unwrap();
        while let Some((kind, _)) = read_frame(&mut s) {
            match kind {
                16 | 17 => s.write_all(&accept).unwrap(),
                4 => break,
                _ => {}
            }
        }
        // Requests for every page, over and over, at most MAX_REQUEST_PAGES each.
        let gpas: Vec<u8> = (0..MAX_REQUEST_PAGES as u64).flat_map(|i| (i * 4096).to_le_bytes()).collect();
        let request = common::wire::frame(10, &gpas, VERSION);
        s.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
        let end = Instant::now() + Duration::from_secs(seconds);
        let mut sent = 0;
        while Instant::now() < end && s.write_all(&request).is_ok() {
            sent += 1;
        }
        sent
    })
}

#[test]
fn a_flood_of_page_requests_stays_bounded_and_the_source_runs_on() {
    require_kvm();
    let scratch = Scratch::new("limit-requests");
    let (src, api) = workload(&scratch, &[], "test=migrate pages=2048 seconds=60");
    let path = scratch.0.join("flood.sock");
    let flood = flooding_destination(path.clone(), 3);
    let to = format!("unix:{}", path.display());
    let migrate =
        Proc::spawn(&scratch, "migrate", &["migrate", "--api-socket", &api, "--to", &to, "--mode", "postcopy"]);
    // Sample the source's memory while it is flooded.
    let pid = src.child.id();
    let mut peak = 0;
    let started = Instant::now();
    let mut baseline = None;
    while started.elapsed() < Duration::from_millis(2500) {
        let rss = rss_kib(pid);
        baseline.get_or_insert(rss);
        peak = peak.max(rss);
        std::thread::sleep(Duration::from_millis(20));
    }
    let sent = flood.join().unwrap();
    let (status, _, err) = migrate.wait();
    assert_eq!(status, 18, "the flooded migration fails: {err}");
    assert!(sent > 0, "the flood reached the source");
    let grown = peak.saturating_sub(baseline.unwrap_or(peak));
    // Without the bounded queue the reader would hold every request it was sent
    // (32 KiB each, as fast as the fake can write); with it, the socket stops the peer.
    eprintln!("{sent} request frames, the source grew by {grown} KiB");
    assert!(grown < 48 * 1024, "{sent} request frames grew the source by {grown} KiB");
    popek(&["status", "--api-socket", &api], None).expect_status(0).expect_stdout("\"running\"");
    // The VM kept all of its memory: a real move verifies every page.
    let (dst, to) = destination(&scratch);
    popek(&["migrate", "--api-socket", &api, "--to", &to], None).expect_status(0);
    assert_eq!(src.wait().0, 0);
    let (status, out, _) = dst.wait();
    assert_eq!(status, 1, "{out}");
    assert!(out.contains("2048 pages verified: ok"), "{out}");
}
