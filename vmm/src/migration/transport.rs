//! Where migration streams go: `tcp:HOST:PORT` or `unix:PATH`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

/// Transport errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("'{0}' is not a migration address (tcp:HOST:PORT or unix:PATH)")]
    Address(String),
    #[error("Cannot connect to {0}")]
    Connect(String, #[source] std::io::Error),
    #[error("Cannot listen on {0}")]
    Listen(String, #[source] std::io::Error),
    #[error("Accepting a connection on {0} failed")]
    Accept(String, #[source] std::io::Error),
}

/// A parsed migration address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Tcp(String),
    Unix(std::path::PathBuf),
}

impl std::str::FromStr for Address {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        if let Some(rest) = s.strip_prefix("tcp:") {
            if rest.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()) {
                return Ok(Address::Tcp(rest.to_string()));
            }
        } else if let Some(path) = s.strip_prefix("unix:") {
            if !path.is_empty() {
                return Ok(Address::Unix(path.into()));
            }
        }
        Err(Error::Address(s.to_string()))
    }
}

impl Address {
    /// Whether only this host can reach the address (Unix socket or loopback).
    pub fn is_local(&self) -> bool {
        match self {
            Address::Unix(_) => true,
            Address::Tcp(a) => {
                let host = a.rsplit_once(':').map_or(a.as_str(), |(h, _)| h).trim_matches(['[', ']']);
                host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
            }
        }
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Tcp(a) => write!(f, "tcp:{a}"),
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A connected byte stream.
pub trait Stream: Read + Write + Send {
    /// Gives up on a peer that says nothing for this long (a dead peer must not hang us).
    fn set_timeout(&self, timeout: Duration) -> std::io::Result<()>;
    /// A second handle on the same connection (post-copy reads and writes from two threads).
    fn try_clone_stream(&self) -> std::io::Result<Box<dyn Stream>>;
    /// Closes both directions (wakes a thread blocked reading the other handle).
    fn shutdown_both(&self);
    /// Caps the kernel's send and receive buffers: in post-copy, a requested page queues
    /// behind whatever the background push has in flight, so less in flight means a
    /// shorter wait for a faulting vCPU.
    fn limit_buffers(&self, bytes: usize);
    /// Waits until there is something to read (or the read timeout passes), without being
    /// woken when the peer makes room for writes. A thread blocked in a read of a Unix
    /// socket is woken each time the peer consumes some of what another thread writes on
    /// the same socket: during an all-written post-copy over `unix:`, the source's reader
    /// of the destination's messages woke for every bit of the push the destination read
    /// (35-40 ms of CPU per GiB). `poll` waits for readability only. A no-op through TLS, which may hold decrypted
    /// bytes the socket no longer shows.
    fn wait_readable(&self) -> std::io::Result<()> {
        Ok(())
    }
    /// SO_RCVLOWAT, best effort (see `LowWater`). A no-op through TLS, which reads records
    /// of its own size.
    fn low_water(&self, _bytes: usize) {}
    /// Polls, without sleeping, until there is something to read or `limit` has passed
    /// (see `spin_readable`); then a read follows as usual.
    fn spin_until_readable(&self, _limit: Duration) {}
}

/// Waits for `fd` to become readable (or closed) by polling, not sleeping, for at most
/// `limit` (see `crate::spin`): Running took 90-130 us to reach a sleeping source on the
/// 2-core test host, with the other core idle.
fn spin_readable(fd: std::os::unix::io::RawFd, limit: Duration) {
    crate::spin::until(limit, || {
        let mut poll = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd for the duration of the call; a zero timeout never sleeps.
        (unsafe { libc::poll(&mut poll, 1, 0) } != 0).then_some(())
    });
}

/// SO_SNDBUF and SO_RCVBUF on a socket, best effort (the kernel may round them).
fn set_buffers(fd: std::os::unix::io::RawFd, bytes: usize) {
    for option in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
        set_socket_option(fd, option, bytes);
    }
}

/// One integer SOL_SOCKET option, best effort.
fn set_socket_option(fd: std::os::unix::io::RawFd, option: libc::c_int, value: usize) {
    let value = value.min(i32::MAX as usize) as libc::c_int;
    // SAFETY: setsockopt reads one c_int from `value`, which lives across the call.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

/// A stream read in bulk with fewer wake-ups: each read of at least `SMALL_READ` bytes
/// first sets SO_RCVLOWAT to half of what it asks for, up to `BULK_MARK`, so the kernel
/// wakes the reader once that much has arrived instead of for every segment. A migration's
/// receiver, the busiest thread of a large transfer, otherwise reads more often and sends
/// an ACK after each read, whose sending also pushes the peer's next segments from this
/// thread (all-written 1 GiB: post-copy 447-490 vs 501-518 ms, stop-and-copy 287 vs 376 ms).
///
/// The kernel wakes a sleeping reader only when the bytes queued and not yet copied reach
/// the mark, whatever the read already copied before it slept. So the mark must stay
/// reachable by what is still to come: a read of `n` bytes may copy up to `mark - 1` of them
/// and then sleep, and the other `n - mark + 1` or more must be able to reach the mark,
/// hence at most half (with the mark at what the read asked for, up to 256 KiB, the last
/// 200 KB of a post-copy sat unread for 10 s). The mark goes with every read, and goes
/// back to 1 (the kernel's default) when the LowWater is dropped, so a socket outside one
/// always has the default.
pub struct LowWater<'a> {
    inner: &'a mut dyn Stream,
    /// The mark last set.
    set: usize,
}

/// The highest mark a LowWater sets.
const BULK_MARK: usize = 256 << 10;

/// Reads shorter than this (headers) keep the kernel's default mark of one byte.
const SMALL_READ: usize = 4096;

impl LowWater<'_> {
    pub fn new(inner: &mut dyn Stream) -> LowWater<'_> {
        LowWater { inner, set: 1 }
    }
}

impl Drop for LowWater<'_> {
    fn drop(&mut self) {
        if self.set != 1 {
            self.inner.low_water(1);
        }
    }
}

impl Write for LowWater<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.inner.write(buf)
    }
    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        self.inner.write_vectored(bufs)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl Read for LowWater<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let want = if buf.len() < SMALL_READ { 1 } else { (buf.len() / 2).min(BULK_MARK) };
        if want != self.set {
            self.inner.low_water(want);
            self.set = want;
        }
        self.inner.read(buf)
    }
}

/// Waits until `fd` is readable (or closed), at most `timeout` (None: forever).
fn poll_readable(fd: std::os::unix::io::RawFd, timeout: Option<Duration>) -> std::io::Result<()> {
    let ms = timeout.map_or(-1, |t| t.as_millis().clamp(1, i32::MAX as u128) as libc::c_int);
    loop {
        let mut poll = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd for the duration of the call.
        match unsafe { libc::poll(&mut poll, 1, ms) } {
            0 => return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "nothing to read before the timeout")),
            n if n > 0 => return Ok(()),
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

/// TCP and Unix streams do the same through the same std methods.
macro_rules! impl_stream {
    ($($t:ty),*) => {$(
        impl Stream for $t {
            fn set_timeout(&self, t: Duration) -> std::io::Result<()> {
                self.set_read_timeout(Some(t))?;
                self.set_write_timeout(Some(t))
            }
            fn try_clone_stream(&self) -> std::io::Result<Box<dyn Stream>> {
                Ok(Box::new(self.try_clone()?))
            }
            fn shutdown_both(&self) {
                let _ = self.shutdown(std::net::Shutdown::Both);
            }
            fn limit_buffers(&self, bytes: usize) {
                set_buffers(std::os::unix::io::AsRawFd::as_raw_fd(self), bytes);
            }
            fn low_water(&self, bytes: usize) {
                set_socket_option(std::os::unix::io::AsRawFd::as_raw_fd(self), libc::SO_RCVLOWAT, bytes);
            }
            fn wait_readable(&self) -> std::io::Result<()> {
                poll_readable(std::os::unix::io::AsRawFd::as_raw_fd(self), self.read_timeout()?)
            }
            fn spin_until_readable(&self, limit: Duration) {
                spin_readable(std::os::unix::io::AsRawFd::as_raw_fd(self), limit)
            }
        }
    )*};
}

impl_stream!(TcpStream, UnixStream);

/// Connects to a listening destination.
pub fn connect(address: &Address) -> Result<Box<dyn Stream>, Error> {
    let err = |e| Error::Connect(address.to_string(), e);
    Ok(match address {
        Address::Tcp(a) => {
            let s = TcpStream::connect(a).map_err(err)?;
            let _ = s.set_nodelay(true);
            let host = a.rsplit_once(':').map_or(a.as_str(), |(h, _)| h).trim_matches(['[', ']']);
            secure_client(s, host).map_err(err)?
        }
        // A Unix socket's peer is this host: its certificate names "localhost".
        Address::Unix(p) => secure_client(UnixStream::connect(p).map_err(err)?, "localhost").map_err(err)?,
    })
}

/// The connection as it is, or its plaintext end through TLS when TLS is on.
fn secure_client<S: super::tls::Socket + Stream>(socket: S, host: &str) -> std::io::Result<Box<dyn Stream>> {
    if super::tls::enabled() {
        return Ok(Box::new(super::tls::client(socket, host)?));
    }
    Ok(Box::new(socket))
}

fn secure_server<S: super::tls::Socket + Stream>(socket: S) -> std::io::Result<Box<dyn Stream>> {
    if super::tls::enabled() {
        return Ok(Box::new(super::tls::server(socket)?));
    }
    Ok(Box::new(socket))
}

/// A destination's listening socket, kept for the whole migration: post-copy takes a
/// second connection (the urgent channel) and, after a broken link, the source's
/// reconnection on it.
pub enum Listener {
    Tcp(TcpListener, String),
    Unix(UnixListener, String),
}

impl Listener {
    /// Listens on `address`; says so on stderr (scripts and tests wait for that line
    /// before starting a migration).
    pub fn bind(address: &Address) -> Result<Listener, Error> {
        let listen_err = |e| Error::Listen(address.to_string(), e);
        let listener = match address {
            Address::Tcp(a) => Listener::Tcp(TcpListener::bind(a).map_err(listen_err)?, address.to_string()),
            Address::Unix(p) => {
                let _ = std::fs::remove_file(p);
                Listener::Unix(UnixListener::bind(p).map_err(listen_err)?, address.to_string())
            }
        };
        eprintln!("popek: waiting for a migration on {address}");
        Ok(listener)
    }

    /// Waits until a connection is pending or `timeout` passed.
    fn wait_readable(&self, timeout: Duration) {
        use std::os::unix::io::AsRawFd;
        let fd = match self {
            Listener::Tcp(l, _) => l.as_raw_fd(),
            Listener::Unix(l, _) => l.as_raw_fd(),
        };
        let mut poll = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut poll, 1, ms) };
    }

    /// Accepts one connection, waiting at most until `deadline` (None: forever).
    pub fn accept(&self, deadline: Option<std::time::Instant>) -> Result<Box<dyn Stream>, Error> {
        let (name, nonblocking) = match self {
            Listener::Tcp(l, name) => (name, l.set_nonblocking(deadline.is_some())),
            Listener::Unix(l, name) => (name, l.set_nonblocking(deadline.is_some())),
        };
        let accept_err = |e| Error::Accept(name.clone(), e);
        nonblocking.map_err(accept_err)?;
        // std has no accept timeout: non-blocking accepts, waiting in poll(2) between them.
        loop {
            let accepted: std::io::Result<Box<dyn Stream>> = match self {
                Listener::Tcp(l, _) => l.accept().and_then(|(s, _)| {
                    s.set_nonblocking(false)?;
                    let _ = s.set_nodelay(true);
                    secure_server(s)
                }),
                Listener::Unix(l, _) => l.accept().and_then(|(s, _)| {
                    s.set_nonblocking(false)?;
                    secure_server(s)
                }),
            };
            match (accepted, deadline) {
                (Ok(s), _) => return Ok(s),
                (Err(e), Some(deadline)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let left = deadline.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        let timed_out = std::io::Error::new(std::io::ErrorKind::TimedOut, "nobody connected in time");
                        return Err(accept_err(timed_out));
                    }
                    self.wait_readable(left);
                }
                (Err(e), _) => return Err(accept_err(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every read comes back once what it asked for arrived, however the writes are cut:
    /// a bulk read that finds part of its bytes queued, copies them and sleeps for the
    /// rest, which are fewer than a mark of what it asked for; then a message shorter
    /// than the bulk mark, written while the reader already sleeps. A read that would not
    /// wake sleeps until the read timeout, which then hands over what arrived: the check
    /// is that no read needed it.
    #[test]
    fn low_water_reads_wake_for_whatever_they_asked() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        // A receive window wider than the mark (as a bulk transfer's grows to): a narrow
        // one wakes the reader anyway once it is nearly used up.
        set_buffers(std::os::unix::io::AsRawFd::as_raw_fd(&listener), 4 << 20);
        let mut writer = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (reader, _) = listener.accept().unwrap();
        let timeout = Duration::from_secs(5);
        reader.set_read_timeout(Some(timeout)).unwrap();
        let started = std::time::Instant::now();
        let mut socket = reader;
        let mut reader = LowWater::new(&mut socket);
        let frame: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        let sender = std::thread::spawn(move || {
            writer.write_all(&frame[..100_000]).unwrap();
            std::thread::sleep(Duration::from_millis(300));
            writer.write_all(&frame[100_000..]).unwrap();
            std::thread::sleep(Duration::from_millis(200));
            writer.write_all(&[7; 107]).unwrap();
            writer
        });
        // The first 100 KB are queued before the read starts.
        std::thread::sleep(Duration::from_millis(100));
        let mut bulk = vec![0u8; 300_000];
        reader.read_exact(&mut bulk).unwrap();
        assert!(bulk.iter().enumerate().all(|(i, &b)| b == i as u8));
        let mut small = [0u8; 16];
        reader.read_exact(&mut small).unwrap();
        assert_eq!(small, [7; 16]);
        let mut rest = [0u8; 91];
        reader.read_exact(&mut rest).unwrap();
        assert_eq!(rest, [7; 91]);
        assert!(started.elapsed() < timeout, "a read waited for the timeout");
        drop(sender.join().unwrap());
    }

    #[test]
    fn addresses() {
        assert_eq!("tcp:127.0.0.1:4444".parse::<Address>().unwrap(), Address::Tcp("127.0.0.1:4444".into()));
        assert_eq!("unix:/tmp/x".parse::<Address>().unwrap(), Address::Unix("/tmp/x".into()));
        assert!("tcp:127.0.0.1:1".parse::<Address>().unwrap().is_local());
        assert!("tcp:[::1]:1".parse::<Address>().unwrap().is_local());
        assert!(!"tcp:0.0.0.0:1".parse::<Address>().unwrap().is_local());
        assert!(!"tcp:10.0.0.2:1".parse::<Address>().unwrap().is_local());
        for bad in ["", "tcp:", "tcp:host", "tcp::1", "udp:1.2.3.4:5", "unix:"] {
            assert!(bad.parse::<Address>().is_err(), "{bad}");
        }
    }
}
