//! A frame-aware relay between a migration source and its destination (a Unix socket or
//! TCP address in front of the destination's `--incoming`). It reads every frame header
//! (magic, version, kind, length) in both directions, asks the [`Injector`] what to do
//! with the frame, and cuts, stalls, kills or refuses accordingly. It relays any number
//! of connections: post-copy opens an urgent channel after Accept and reconnects after a
//! broken link.

use crate::inject::{kind, Action, ConnId, Dir, Injector};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Frame header (docs/migration.md, "Wire protocol").
const MAGIC: &[u8; 4] = b"PPKM";
/// Mirrors `popek::migration::protocol::VERSION` (this tool speaks the wire format from outside).
const VERSION: u16 = 6;
const MAX_PAYLOAD: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {0}")]
    Listen(String, #[source] std::io::Error),
}

/// A migration address, as popek spells it (`unix:PATH`, `tcp:HOST:PORT`).
#[derive(Debug, Clone)]
pub enum Addr {
    Unix(PathBuf),
    Tcp(String),
}

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Addr::Unix(p) => write!(f, "unix:{}", p.display()),
            Addr::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// One end of a relayed connection.
enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Conn {
    fn connect(addr: &Addr) -> std::io::Result<Conn> {
        Ok(match addr {
            Addr::Unix(p) => Conn::Unix(UnixStream::connect(p)?),
            Addr::Tcp(a) => Conn::Tcp(TcpStream::connect(a)?),
        })
    }

    fn try_clone(&self) -> std::io::Result<Conn> {
        Ok(match self {
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
        })
    }

    /// Both directions, best effort: also wakes a thread blocked reading another handle.
    fn shutdown(&self) {
        let _ = match self {
            Conn::Unix(s) => s.shutdown(Shutdown::Both),
            Conn::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Unix(s) => s.read(buf),
            Conn::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Unix(s) => s.write(buf),
            Conn::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Unix(s) => s.flush(),
            Conn::Tcp(s) => s.flush(),
        }
    }
}

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    fn accept(&self) -> std::io::Result<Conn> {
        Ok(match self {
            Listener::Unix(l) => Conn::Unix(l.accept()?.0),
            Listener::Tcp(l) => Conn::Tcp(l.accept()?.0),
        })
    }
}

/// Both ends of one relayed connection: writers (one frame at a time: the relay's own
/// Refuse and the forwarded frames must not interleave) and handles to shut them down
/// without waiting for a writer.
struct Link {
    to_src: Arc<Mutex<Conn>>,
    to_dst: Arc<Mutex<Conn>>,
    src: Conn,
    dst: Conn,
}

/// The processes a fault may kill.
#[derive(Debug, Clone, Copy)]
pub struct Pids {
    pub source: u32,
    pub destination: u32,
}

struct Shared {
    injector: Mutex<Injector>,
    links: Mutex<Vec<Link>>,
    stall_until: Mutex<Option<Instant>>,
    pids: Pids,
    started: Instant,
    events: Mutex<Vec<String>>,
    stop: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A pump that panicked leaves consistent data behind (each update is one statement).
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    fn event(&self, what: String) {
        lock(&self.events).push(format!("{:.3} s: {what}", self.started.elapsed().as_secs_f64()));
    }

    fn wait_stall(&self) {
        loop {
            let until = *lock(&self.stall_until);
            match until.map(|u| u.saturating_duration_since(Instant::now())) {
                Some(left) if !left.is_zero() => std::thread::sleep(left),
                _ => return,
            }
        }
    }

    fn cut_all(&self) {
        for link in lock(&self.links).iter() {
            link.src.shutdown();
            link.dst.shutdown();
        }
    }

    fn shut_destination_sides(&self) {
        for link in lock(&self.links).iter() {
            link.dst.shutdown();
        }
    }

    /// Answers the source on connection `on` with Refuse, as the destination would.
    fn refuse(&self, on: ConnId, why: &str) {
        let writer = lock(&self.links).get(on).map(|l| l.to_src.clone());
        if let Some(writer) = writer {
            let payload = serde_json::json!({ "reason": why }).to_string();
            let mut frame = header(kind::REFUSE, payload.len() as u64).to_vec();
            frame.extend_from_slice(payload.as_bytes());
            let _ = lock(&writer).write_all(&frame);
        }
    }
}

fn header(kind: u16, len: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(MAGIC);
    h[4..6].copy_from_slice(&VERSION.to_le_bytes());
    h[6..8].copy_from_slice(&kind.to_le_bytes());
    h[8..].copy_from_slice(&len.to_le_bytes());
    h
}

/// SIGKILL to a process this tool started.
fn sigkill(pid: u32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return };
    // SAFETY: kill(2) has no memory-safety preconditions; the pid is one of our children.
    unsafe { libc::kill(pid, libc::SIGKILL) };
}

/// The relay; it stops listening when dropped (connections already relayed end with
/// their peers).
pub struct Relay {
    pub addr: Addr,
    shared: Arc<Shared>,
}

impl Relay {
    /// Listens on `listen` and relays every connection to `target`.
    pub fn start(listen: Addr, target: Addr, injector: Injector, pids: Pids) -> Result<Relay, Error> {
        let listener = match &listen {
            Addr::Unix(p) => Listener::Unix(UnixListener::bind(p).map_err(|e| Error::Listen(listen.to_string(), e))?),
            Addr::Tcp(a) => Listener::Tcp(TcpListener::bind(a).map_err(|e| Error::Listen(listen.to_string(), e))?),
        };
        let shared = Arc::new(Shared {
            injector: Mutex::new(injector),
            links: Mutex::new(Vec::new()),
            stall_until: Mutex::new(None),
            pids,
            started: Instant::now(),
            events: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        std::thread::spawn(move || accept_loop(&listener, &target, &s));
        Ok(Relay { addr: listen, shared })
    }

    /// Which frame the fault hit (`None`: the phase never came).
    pub fn fired(&self) -> Option<String> {
        lock(&self.shared.injector).fired.clone()
    }

    /// Message kinds seen, per direction.
    pub fn seen(&self) -> Vec<(Dir, u16)> {
        lock(&self.shared.injector).seen.clone()
    }

    pub fn connections(&self) -> usize {
        lock(&self.shared.links).len()
    }

    pub fn events(&self) -> Vec<String> {
        lock(&self.shared.events).clone()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop with a connection of our own.
        let _ = Conn::connect(&self.addr);
        if let Addr::Unix(p) = &self.addr {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn accept_loop(listener: &Listener, target: &Addr, shared: &Arc<Shared>) {
    while let Ok(client) = listener.accept() {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        // The destination keeps its listener for the whole migration; a short retry
        // covers a connection racing its start. A dead destination: the source sees the
        // connection end, as it would without the relay.
        let deadline = Instant::now() + Duration::from_secs(1);
        let server = loop {
            match Conn::connect(target) {
                Ok(s) => break Some(s),
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                Err(_) => break None,
            }
        };
        let Some(server) = server else {
            shared.event("a connection found no destination".into());
            continue;
        };
        if let Err(e) = relay(client, server, shared) {
            shared.event(format!("cannot relay a connection: {e}"));
        }
    }
}

fn relay(client: Conn, server: Conn, shared: &Arc<Shared>) -> std::io::Result<()> {
    let link = Link {
        to_src: Arc::new(Mutex::new(client.try_clone()?)),
        to_dst: Arc::new(Mutex::new(server.try_clone()?)),
        src: client.try_clone()?,
        dst: server.try_clone()?,
    };
    let (to_src, to_dst) = (link.to_src.clone(), link.to_dst.clone());
    let id = {
        let mut links = lock(&shared.links);
        links.push(link);
        links.len() - 1
    };
    shared.event(format!("connection {id} opened"));
    for (dir, from, to) in [(Dir::ToDst, client, to_dst), (Dir::ToSrc, server, to_src)] {
        let s = shared.clone();
        std::thread::spawn(move || pump(id, dir, from, &to, &s));
    }
    Ok(())
}

/// Forwards frames one way until either side ends, applying the injector's actions.
fn pump(id: ConnId, dir: Dir, mut from: Conn, to: &Mutex<Conn>, shared: &Shared) {
    let mut head = [0u8; 16];
    let mut payload = Vec::new();
    while from.read_exact(&mut head).is_ok() {
        let version = u16::from_le_bytes([head[4], head[5]]);
        let kind = u16::from_le_bytes([head[6], head[7]]);
        let len = u64::from_le_bytes(head[8..].try_into().unwrap_or_default());
        if &head[..4] != MAGIC || version != VERSION || len > MAX_PAYLOAD {
            // Not a stream this relay understands (a newer protocol, TLS): pass it on
            // untouched; no fault fires, which the matrix reports as not injected.
            shared.event(format!("connection {id}: not a version-{VERSION} Popek stream; relaying raw bytes"));
            let mut to = lock(to);
            if to.write_all(&head).is_ok() {
                let _ = std::io::copy(&mut from, &mut *to);
            }
            break;
        }
        payload.resize(len as usize, 0);
        if from.read_exact(&mut payload).is_err() {
            break;
        }
        shared.wait_stall();
        let action = lock(&shared.injector).on_frame(id, dir, kind);
        let what = crate::inject::name(kind);
        match action {
            Action::Forward => {}
            Action::Stall(d) => {
                shared.event(format!("connection {id}: {what}: stalling every connection for {d:?}"));
                *lock(&shared.stall_until) = Some(Instant::now() + d);
                shared.wait_stall();
                shared.event("stall over".into());
            }
            Action::Cut => {
                shared.event(format!("connection {id}: {what}: cutting every connection"));
                shared.cut_all();
                continue;
            }
            Action::Kill { source } => {
                let (who, pid) =
                    if source { ("source", shared.pids.source) } else { ("destination", shared.pids.destination) };
                shared.event(format!("connection {id}: {what}: SIGKILL to the {who} (pid {pid})"));
                sigkill(pid);
                continue;
            }
            Action::StartRefusing => {
                shared.event(format!("connection {id}: {what}: the destination refuses; its side closes"));
                shared.shut_destination_sides();
                continue;
            }
            Action::Discard => continue,
            Action::Refuse { on } => {
                shared.event(format!("connection {id}: {what}: Refuse to the source on connection {on}"));
                shared.refuse(on, "fault-matrix: the destination refuses");
                shared.cut_all();
                continue;
            }
        }
        let mut to = lock(to);
        if to.write_all(&head).and_then(|()| to.write_all(&payload)).is_err() {
            break;
        }
    }
    // One side ended: end the other too, as a broken link would; but while the relay
    // answers for a refusing destination, the source's side stays open for the Refuse.
    let refusing = lock(&shared.injector).refusing();
    if !(dir == Dir::ToSrc && refusing) {
        from.shutdown();
        lock(to).shutdown();
    }
}
