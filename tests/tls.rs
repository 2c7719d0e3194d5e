//! Migration over mutual TLS (`--tls-cert`, `--tls-key`, `--tls-ca` on both sides): the
//! guest arrives intact in every mode that opens several connections, nothing readable
//! crosses the wire, and a peer without a certificate from the shared CA is refused
//! before any state moves while the source VM runs on.

mod common;
use common::procs::*;
use common::*;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

/// A CA and, for each side, a certificate it signed naming this host.
struct Pki {
    ca: String,
    source: (String, String),
    destination: (String, String),
}

fn issue(scratch: &Scratch, tag: &str) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, format!("popek test CA {tag}"));
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf = |side: &str| {
        let key = KeyPair::generate().unwrap();
        let params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        (
            scratch.file(&format!("{tag}-{side}.crt"), cert.pem().as_bytes()),
            scratch.file(&format!("{tag}-{side}.key"), key.serialize_pem().as_bytes()),
        )
    };
    let (source, destination) = (leaf("src"), leaf("dst"));
    Pki { ca: scratch.file(&format!("{tag}-ca.crt"), ca.pem().as_bytes()), source, destination }
}

fn tls_args<'a>(pki: &'a Pki, side: &'a (String, String)) -> Vec<&'a str> {
    vec!["--tls-cert", &side.0, "--tls-key", &side.1, "--tls-ca", &pki.ca]
}

/// A TCP relay that records every byte the source sends, on every connection.
fn recording_relay(target: u16) -> (u16, Arc<Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else { return };
            let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            let record = record.clone();
            std::thread::spawn(move || {
                let mut buffer = vec![0u8; 65536];
                let mut client = client;
                let mut server = server;
                while let Ok(n @ 1..) = client.read(&mut buffer) {
                    record.lock().unwrap().extend_from_slice(&buffer[..n]);
                    if server.write_all(&buffer[..n]).is_err() {
                        break;
                    }
                }
                let _ = server.shutdown(std::net::Shutdown::Write);
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut s2, &mut c2);
                let _ = c2.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    (port, seen)
}

fn tls_destination(scratch: &Scratch, tag: &str, pki: &Pki, side: &(String, String)) -> (Proc, u16) {
    let port = free_port();
    let addr = format!("tcp:127.0.0.1:{port}");
    let mut args = vec!["run", "--no-stdin", "--incoming", &addr];
    args.extend(tls_args(pki, side));
    let dst = Proc::spawn(scratch, tag, &args);
    dst.listening();
    (dst, port)
}

#[test]
fn postcopy_over_mutual_tls_arrives_intact_and_the_wire_carries_no_plaintext() {
    require_kvm();
    let scratch = Scratch::new("tls-postcopy");
    let pki = issue(&scratch, "a");
    let (src, api) = workload(&scratch, &tls_args(&pki, &pki.source), "test=migrate pages=2048 seconds=60");
    let (dst, port) = tls_destination(&scratch, "dst", &pki, &pki.destination);
    let (relay, seen) = recording_relay(port);
    let report = scratch.0.join("report.json").display().to_string();
    let to = format!("tcp:127.0.0.1:{relay}");
    // Uncompressed: the guest's stamped pages cross whole, and over a megabyte of them
    // (compressed, TLS's slower link gets them down to a few hundred KB).
    let argv = ["migrate", "--api-socket", &api, "--to", &to, "--mode", "postcopy", "--compress", "off"];
    popek(&[&argv[..], &["--report-json", &report]].concat(), None).expect_status(0);
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(report["encryption"], "tls1.3", "{report}");
    assert_eq!(report["mode"], "postcopy");
    assert_eq!(src.wait().0, 0);
    let (status, out, err) = dst.wait();
    assert_eq!(status, 1, "{out}\n{err}");
    assert!(out.contains("2048 pages verified: ok"), "{out}");
    // The migration frames start with the magic "PPKM"; the guest's console text was in
    // the state. Neither appears in what crossed the wire, which was not small.
    let seen = seen.lock().unwrap();
    assert!(seen.len() > 1 << 20, "{} bytes crossed the relay", seen.len());
    assert!(!seen.windows(4).any(|w| w == b"PPKM"), "a plaintext frame header crossed the wire");
}

#[test]
fn peers_without_a_certificate_from_the_shared_ca_are_refused_and_the_source_runs_on() {
    require_kvm();
    let scratch = Scratch::new("tls-refused");
    let pki = issue(&scratch, "a");
    let stranger = issue(&scratch, "b");
    let (src, api) = workload(&scratch, &tls_args(&pki, &pki.source), "test=migrate pages=512 seconds=60");
    // A destination whose certificate another CA signed, and one that speaks no TLS.
    let (dst, port) = tls_destination(&scratch, "stranger", &stranger, &stranger.destination);
    let to = format!("tcp:127.0.0.1:{port}");
    popek(&["migrate", "--api-socket", &api, "--to", &to], None).expect_status(18).expect_stderr("TLS");
    let (status, out, _) = dst.wait();
    assert_eq!(status, 18);
    assert!(out.is_empty(), "nothing ran on the refused destination: {out}");
    let port = free_port();
    let to = format!("tcp:127.0.0.1:{port}");
    let plain = Proc::spawn(&scratch, "plain", &["run", "--no-stdin", "--incoming", &to]);
    plain.listening();
    popek(&["migrate", "--api-socket", &api, "--to", &to], None).expect_status(18);
    let (status, out, _) = plain.wait();
    assert_eq!(status, 18);
    assert!(out.is_empty(), "{out}");
    popek(&["status", "--api-socket", &api], None).expect_status(0).expect_stdout("\"running\"");
    // A source without the CA's certificate is refused by the right destination too.
    let (dst, port) = tls_destination(&scratch, "dst", &pki, &pki.destination);
    let sub = Scratch::new("tls-intruder");
    let (intruder, intruder_api) =
        workload(&sub, &tls_args(&stranger, &stranger.source), "test=migrate pages=64 seconds=60");
    let to = format!("tcp:127.0.0.1:{port}");
    popek(&["migrate", "--api-socket", &intruder_api, "--to", &to], None).expect_status(18);
    let (status, out, err) = dst.wait();
    assert_eq!(status, 18, "{err}");
    assert!(err.contains("TLS"), "{err}");
    assert!(out.is_empty(), "{out}");
    drop(intruder);
    // Then a stop-and-copy to a proper destination moves the first VM intact.
    let (dst, port) = tls_destination(&scratch, "dst2", &pki, &pki.destination);
    let to = format!("tcp:127.0.0.1:{port}");
    popek(&["migrate", "--api-socket", &api, "--to", &to, "--verify-memory"], None)
        .expect_status(0)
        .expect_stdout("\"encryption\": \"tls1.3\"");
    assert_eq!(src.wait().0, 0);
    let (status, out, _) = dst.wait();
    assert_eq!(status, 1, "{out}");
    assert!(out.contains("512 pages verified: ok"), "{out}");
}
