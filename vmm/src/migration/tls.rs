//! TLS for migration connections (`--tls-cert`, `--tls-key`, `--tls-ca` on both sides).
//!
//! Mutual TLS 1.3 with rustls: the source is the client, the destination the server, and
//! each proves it holds a certificate signed by the shared CA before a single migration
//! byte moves (the `--auth-key` handshake still runs inside, so both checks must pass).
//!
//! Why a pump thread and a socket pair instead of handing rustls' stream to the migration
//! code: post-copy reads and writes one connection from two threads and wakes a blocked
//! reader by shutting the socket down (`transport::Stream`). A rustls connection is one
//! state machine that must not be split, so one thread owns it and relays plaintext to a
//! Unix socket pair whose other end behaves exactly like the plain connections do.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

/// How long a peer may take over the TLS handshake before it is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Plaintext read at a time from either side.
const CHUNK: usize = 256 * 1024;
/// Decrypted bytes held for a slow reader before the pump stops reading the network
/// (bounded memory whatever the peer sends).
const HIGH_WATER: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {what} {path}")]
    Read { what: &'static str, path: PathBuf, source: rustls::pki_types::pem::Error },
    #[error("{0} holds no certificate")]
    NoCertificate(PathBuf),
    #[error("the CA certificate in {path} is unusable")]
    Ca { path: PathBuf, source: rustls::Error },
    #[error("cannot set up TLS")]
    Config(#[source] rustls::Error),
    #[error("cannot set up the client certificate check")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
}

/// The three files both sides are given.
pub struct Files<'a> {
    pub cert: &'a Path,
    pub key: &'a Path,
    pub ca: &'a Path,
}

/// Client and server configurations built from one certificate, key and CA.
pub struct Settings {
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
}

static SETTINGS: OnceLock<Settings> = OnceLock::new();

/// Turns TLS on for every migration connection this process makes or accepts. A process
/// either migrates with TLS or without: it is set once, at start-up, from the command line.
pub fn enable(settings: Settings) {
    let _ = SETTINGS.set(settings);
}

/// Whether migration connections are encrypted (the report says which).
pub fn enabled() -> bool {
    SETTINGS.get().is_some()
}

impl Settings {
    pub fn load(files: &Files) -> Result<Settings, Error> {
        let certs = read_certs("certificate", files.cert)?;
        let key = PrivateKeyDer::from_pem_file(files.key).map_err(|source| Error::Read {
            what: "private key",
            path: files.key.into(),
            source,
        })?;
        let mut roots = rustls::RootCertStore::empty();
        for ca in read_certs("CA certificate", files.ca)? {
            roots.add(ca).map_err(|source| Error::Ca { path: files.ca.into(), source })?;
        }
        let roots = Arc::new(roots);
        let mut provider = rustls::crypto::ring::default_provider();
        // AES-128-GCM first: as safe for a migration's lifetime and a third cheaper per
        // byte than AES-256 (10 rounds, not 14), which shows at memory-copy speeds.
        provider.cipher_suites.sort_by_key(|suite| suite.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        let provider = Arc::new(provider);
        let versions: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(Error::Verifier)?;
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .map_err(Error::Config)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs.clone(), key.clone_key())
            .map_err(Error::Config)?;
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .map_err(Error::Config)?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .map_err(Error::Config)?;
        Ok(Settings { client: Arc::new(client), server: Arc::new(server) })
    }
}

fn read_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let read = |source| Error::Read { what, path: path.into(), source };
    let certs = CertificateDer::pem_file_iter(path).map_err(read)?.collect::<Result<Vec<_>, _>>().map_err(read)?;
    if certs.is_empty() {
        return Err(Error::NoCertificate(path.into()));
    }
    Ok(certs)
}

/// A connected socket the pump can own: TCP or Unix.
pub trait Socket: Read + Write + AsRawFd + Send + 'static {
    fn set_nonblocking(&self, on: bool) -> std::io::Result<()>;
    fn set_timeouts(&self, timeout: Option<Duration>) -> std::io::Result<()>;
    fn shutdown_write(&self);
}

macro_rules! impl_socket {
    ($($t:ty),*) => {$(
        impl Socket for $t {
            fn set_nonblocking(&self, on: bool) -> std::io::Result<()> {
                <$t>::set_nonblocking(self, on)
            }
            fn set_timeouts(&self, timeout: Option<Duration>) -> std::io::Result<()> {
                self.set_read_timeout(timeout)?;
                self.set_write_timeout(timeout)
            }
            fn shutdown_write(&self) {
                let _ = self.shutdown(std::net::Shutdown::Write);
            }
        }
    )*};
}

impl_socket!(std::net::TcpStream, UnixStream);

/// Runs the client handshake on `socket` (naming the destination `host`) and returns
/// the plaintext end of the pump. Only with TLS enabled.
pub fn client<S: Socket>(socket: S, host: &str) -> std::io::Result<UnixStream> {
    let settings = SETTINGS.get().ok_or_else(|| std::io::Error::other("TLS is not enabled"))?;
    let name = ServerName::try_from(host.to_string())
        .map_err(|_| std::io::Error::new(ErrorKind::InvalidInput, format!("'{host}' is not a TLS server name")))?;
    let conn = rustls::ClientConnection::new(settings.client.clone(), name).map_err(std::io::Error::other)?;
    start(conn.into(), socket)
}

/// Runs the server handshake on an accepted `socket` and returns the plaintext end of
/// the pump. Only with TLS enabled.
pub fn server<S: Socket>(socket: S) -> std::io::Result<UnixStream> {
    let settings = SETTINGS.get().ok_or_else(|| std::io::Error::other("TLS is not enabled"))?;
    let conn = rustls::ServerConnection::new(settings.server.clone()).map_err(std::io::Error::other)?;
    start(conn.into(), socket)
}

/// Completes the handshake (bounded in time), then hands the connection to a pump thread.
fn start<S: Socket>(mut conn: rustls::Connection, mut net: S) -> std::io::Result<UnixStream> {
    net.set_timeouts(Some(HANDSHAKE_TIMEOUT))?;
    while conn.is_handshaking() {
        conn.complete_io(&mut net).map_err(|e| std::io::Error::new(e.kind(), format!("TLS handshake: {e}")))?;
    }
    net.set_timeouts(None)?;
    let (app, pump_end) = UnixStream::pair()?;
    let watch = Arc::new(Watch { end: pump_end.try_clone()?, idle: AtomicBool::new(false) });
    lock_pumps().push(Arc::downgrade(&watch));
    std::thread::Builder::new().name("tls".into()).spawn(move || {
        crate::seccomp::enter_or_exit(crate::seccomp::ThreadKind::Migration);
        if let Err(e) = pump(conn, &mut net, &pump_end, &watch.idle) {
            log::warn!("migration TLS connection: {e}");
        }
        // Either side ending ends both: the migration code sees EOF, the peer sees EOF.
        let _ = pump_end.shutdown(std::net::Shutdown::Both);
        net.shutdown_write();
    })?;
    Ok(app)
}

/// What `flush` needs to see of a pump: the plaintext end (for bytes the migration code
/// wrote that the pump has not read yet) and whether the pump has sent all it read.
struct Watch {
    end: UnixStream,
    idle: AtomicBool,
}

static PUMPS: Mutex<Vec<Weak<Watch>>> = Mutex::new(Vec::new());

fn lock_pumps() -> std::sync::MutexGuard<'static, Vec<Weak<Watch>>> {
    PUMPS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Waits (at most `timeout`) until every pump has handed the network everything the
/// migration code wrote. Call it before the process exits: a write to a plain socket is
/// in the kernel when it returns, but through TLS it still sits with the pump thread,
/// and a destination's last Done or Refuse must not die with the process.
pub fn flush(timeout: Duration) {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let pumps: Vec<Arc<Watch>> = lock_pumps().iter().filter_map(Weak::upgrade).collect();
        // Unread bytes first, then idleness: a pump clears `idle` before it reads, so
        // "nothing unread, then idle" means it read and sent everything.
        if pumps.iter().all(|p| unread(&p.end) == 0 && p.idle.load(SeqCst)) {
            return;
        }
        if std::time::Instant::now() >= deadline {
            log::warn!("migration TLS: {} connection(s) still sending at exit", pumps.len());
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Bytes queued on a socket for reading (FIONREAD); 0 when it cannot tell.
fn unread(socket: &UnixStream) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int to `n`, which lives across the call.
    let r = unsafe { libc::ioctl(socket.as_raw_fd(), libc::FIONREAD, &mut n) };
    if r < 0 {
        0
    } else {
        n.max(0) as usize
    }
}

/// Bytes waiting to be written somewhere, consumed from the front.
#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    at: usize,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.at == self.bytes.len()
    }
    fn len(&self) -> usize {
        self.bytes.len() - self.at
    }
    fn data(&self) -> &[u8] {
        &self.bytes[self.at..]
    }
    fn consume(&mut self, n: usize) {
        self.at += n;
        if self.is_empty() {
            self.bytes.clear();
            self.at = 0;
        }
    }
}

/// What the pump still waits for.
#[derive(Default)]
struct Ends {
    /// The migration code closed its end (no more plaintext to encrypt).
    app_done: bool,
    /// close_notify queued for the peer.
    close_sent: bool,
    /// The peer closed (no more ciphertext to decrypt).
    net_done: bool,
}

/// Moves bytes both ways until both directions have ended or either side failed.
fn pump(
    mut conn: rustls::Connection,
    net: &mut impl Socket,
    app: &UnixStream,
    idle: &AtomicBool,
) -> std::io::Result<()> {
    net.set_nonblocking(true)?;
    app.set_nonblocking(true)?;
    // rustls' own 64 KiB cap on queued records would make a large write take nothing
    // at all now and then; the pump bounds the queue itself (it reads more plaintext only
    // once every record went out).
    conn.set_buffer_limit(None);
    let mut app = app;
    let (mut buffer, mut ciphertext) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    let (mut to_app, mut to_net) = (Pending::default(), Pending::default());
    let mut ends = Ends::default();
    loop {
        // Plaintext rustls already decrypted (the handshake may have read the peer's
        // first records too, and those never make the socket readable again).
        if to_app.len() < HIGH_WATER && !ends.net_done {
            drain(&mut conn, &mut to_app, &mut ends, &mut buffer)?;
        }
        // Plaintext from the migration code into TLS records, as far as rustls takes it.
        while !to_net.is_empty() {
            let n = conn.writer().write(to_net.data())?;
            if n == 0 {
                break;
            }
            to_net.consume(n);
        }
        if ends.app_done && to_net.is_empty() && !ends.close_sent {
            conn.send_close_notify();
            ends.close_sent = true;
        }
        while conn.wants_write() {
            match conn.write_tls(net) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        if ends.close_sent && !conn.wants_write() {
            net.shutdown_write();
        }
        while !to_app.is_empty() {
            match app.write(to_app.data()) {
                Ok(n) => to_app.consume(n),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                // The migration code closed its end for good: nobody reads any more.
                Err(e) => {
                    log::debug!("pump: the migration end is gone: {e}");
                    return Ok(());
                }
            }
        }
        if ends.net_done && to_app.is_empty() {
            let _ = app.shutdown(std::net::Shutdown::Write);
            if ends.close_sent && !conn.wants_write() {
                return Ok(());
            }
        }
        let read_net = !ends.net_done && to_app.len() < HIGH_WATER;
        // More plaintext only once the last was encrypted and sent: a peer that stops
        // reading stops us reading, instead of growing rustls' buffers.
        let read_app = !ends.app_done && to_net.is_empty() && !conn.wants_write();
        log::trace!(
            "pump: to_app {} to_net {} wants_write {} read_net {read_net} read_app {read_app} ends {}/{}/{}",
            to_app.len(),
            to_net.len(),
            conn.wants_write(),
            ends.app_done,
            ends.close_sent,
            ends.net_done
        );
        idle.store(to_net.is_empty() && !conn.wants_write(), SeqCst);
        let ready =
            wait((net.as_raw_fd(), read_net, conn.wants_write()), (app.as_raw_fd(), read_app, !to_app.is_empty()));
        idle.store(false, SeqCst);
        let [net_ready, app_ready] = ready?;
        if read_net && net_ready {
            receive(&mut conn, net, &mut to_app, &mut ends, (&mut ciphertext, &mut buffer))?;
        }
        if read_app && app_ready {
            match app.read(&mut buffer) {
                Ok(0) => {
                    log::debug!("pump: the migration end closed");
                    ends.app_done = true;
                }
                Ok(n) => to_net.bytes.extend_from_slice(&buffer[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
                Err(e) => {
                    log::debug!("pump: reading the migration end: {e}");
                    ends.app_done = true;
                }
            }
        }
    }
}

/// Reads ciphertext from the peer, decrypts it and queues the plaintext for the app.
fn receive(
    conn: &mut rustls::Connection,
    net: &mut impl Socket,
    to_app: &mut Pending,
    ends: &mut Ends,
    (ciphertext, plaintext): (&mut [u8], &mut [u8]),
) -> std::io::Result<()> {
    // One read(2) for up to CHUNK bytes, then rustls takes them from memory: its own
    // read_tls would make a system call per few KiB, which costs more than the AES here.
    let n = match net.read(ciphertext) {
        Ok(0) => {
            log::debug!("pump {}: the peer closed the connection", net.as_raw_fd());
            ends.net_done = true;
            return drain(conn, to_app, ends, plaintext);
        }
        Ok(n) => n,
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut fed = 0;
    while fed < n {
        fed += conn.read_tls(&mut &ciphertext[fed..n])?;
        if let Err(e) = conn.process_new_packets() {
            // Tell the peer why (an alert), best effort, then give up on the connection.
            let _ = conn.write_tls(net);
            return Err(std::io::Error::new(ErrorKind::InvalidData, e));
        }
        drain(conn, to_app, ends, plaintext)?;
    }
    Ok(())
}

/// Moves decrypted plaintext out of rustls into the queue for the app.
fn drain(
    conn: &mut rustls::Connection,
    to_app: &mut Pending,
    ends: &mut Ends,
    buffer: &mut [u8],
) -> std::io::Result<()> {
    loop {
        match conn.reader().read(buffer) {
            Ok(0) => {
                log::debug!("pump: the peer said close_notify");
                ends.net_done = true;
                return Ok(());
            }
            Ok(n) => to_app.bytes.extend_from_slice(&buffer[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
            // The peer vanished without close_notify: a cut, which the app sees as EOF.
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => {
                log::debug!("pump: the peer went without close_notify");
                ends.net_done = true;
                return Ok(());
            }
            Err(e) => return Err(e),
        }
    }
}

/// poll(2) on the two descriptors, each with (fd, want to read, want to write); returns
/// whether each is ready for what was asked (errors and hang-ups count as ready, so the
/// next read or write reports them).
fn wait(net: (RawFd, bool, bool), app: (RawFd, bool, bool)) -> std::io::Result<[bool; 2]> {
    let events = |(_, read, write): (RawFd, bool, bool)| {
        (if read { libc::POLLIN } else { 0 }) | (if write { libc::POLLOUT } else { 0 })
    };
    let mut fds = [
        libc::pollfd { fd: net.0, events: events(net), revents: 0 },
        libc::pollfd { fd: app.0, events: events(app), revents: 0 },
    ];
    loop {
        // SAFETY: two valid pollfds for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n >= 0 {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(fds.map(|f| f.revents != 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// Client and server settings from one throwaway CA and certificate.
    fn settings() -> Settings {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert =
            CertificateParams::new(vec!["localhost".to_string()]).unwrap().signed_by(&key, &ca, &ca_key).unwrap();
        let dir = std::env::temp_dir().join(format!("popek-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, text: String| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let (cert, key, ca) =
            (write("c.pem", cert.pem()), write("k.pem", key.serialize_pem()), write("ca.pem", ca.pem()));
        let settings = Settings::load(&Files { cert: &cert, key: &key, ca: &ca }).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        settings
    }

    #[test]
    fn a_peer_that_sends_to_a_reader_that_never_reads_is_held_at_the_high_water_mark() {
        let settings = settings();
        let (server_net, mut client_net) = UnixStream::pair().unwrap();
        let server = rustls::ServerConnection::new(settings.server.clone()).unwrap();
        let pump = std::thread::spawn(move || start(server.into(), server_net));
        let name = ServerName::try_from("localhost").unwrap();
        let mut client = rustls::ClientConnection::new(settings.client.clone(), name).unwrap();
        while client.is_handshaking() {
            client.complete_io(&mut client_net).unwrap();
        }
        // The migration end of the pump: held, never read.
        let _app = pump.join().unwrap().unwrap();
        client_net.set_nonblocking(true).unwrap();
        client.set_buffer_limit(None);
        let chunk = vec![0x5a; 64 << 10];
        let (mut delivered, mut last_progress) = (0usize, Instant::now());
        // Until the pump stops taking more (or far past any bound, if it never does).
        while last_progress.elapsed() < Duration::from_millis(300) && delivered < 64 << 20 {
            if !client.wants_write() {
                client.writer().write_all(&chunk).unwrap();
            }
            match client.write_tls(&mut client_net) {
                Ok(n) => {
                    delivered += n;
                    last_progress = Instant::now();
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(1)),
                Err(e) => panic!("{e}"),
            }
        }
        // What got through: the pump's queue (at most HIGH_WATER plus one read), rustls'
        // undecrypted records, and the two sockets' buffers (a few hundred KiB each here).
        assert!(delivered > HIGH_WATER / 2, "the pump took only {delivered} bytes");
        assert!(delivered < HIGH_WATER + 8 * CHUNK + (4 << 20), "the pump took {delivered} bytes");
    }
}
