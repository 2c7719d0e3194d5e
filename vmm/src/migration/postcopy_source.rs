//! Post-copy, source side: the vCPUs have moved (or are moving); this side keeps the
//! whole of memory and serves it. Page requests from the destination go first (with a few
//! pages after each, which a guest walking memory will want next); between them a
//! background push sends the pages still needed, continuing after the last requested one.
//! Before the destination says Running, any failure leaves the VM here (the caller resumes
//! it); after, a broken link is re-established for a bounded time, and only the loss of
//! the destination itself is final.

use super::auth::Key;
use super::memory::{self, Outgoing, Transfer};
use super::pages::{PageMap, PageSet};
use super::protocol::{self, Complete, Done, Kind, Missing, Resume, Running};
use super::source::chain;
use super::transport::{Address, Stream};
use crate::memory::GuestRam;
use crate::parked::Parked;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Messages from the destination waiting to be handled, at most.
const EVENT_QUEUE: usize = 64;
/// Pages sent after an isolated requested one.
const PREFETCH: u64 = 15;
/// Pages sent after a requested one at most, once faults follow each other through memory
/// (see `Prefetch`): 1 MiB with the requested page.
const PREFETCH_MAX: u64 = 255;
/// Bytes of page data per background frame: small enough that a request waits little
/// behind it. Zero pages cost no data, so an idle guest's memory goes in few frames.
const PUSH_BYTES: usize = 1 << 20;
/// Pages per background frame at most: the destination installs a frame in one go, and a
/// request waits behind it (zero-filling 4096 pages takes about half a millisecond).
const PUSH_SCAN: u64 = 4096;

/// What the reader thread saw.
enum Event {
    Requests(Vec<u64>),
    /// With when it arrived (downtime ends then, not when the sender gets to it).
    Running(Running, Instant),
    Done(Done),
    Lost(String),
}

/// The connections of a post-copy: the main one (state, push, control) and, when it
/// could be opened, the urgent channel for page requests and their answers.
pub struct Links {
    pub main: Link,
    /// The urgent channel and the thread, parked, that will answer it.
    pub urgent: Option<(Box<dyn Stream>, Parked)>,
}

/// How to reach the destination again.
pub struct Reconnect<'a> {
    pub to: &'a Address,
    pub auth_key: Option<&'a Key>,
    pub migration_id: u64,
    pub timeout: Duration,
}

/// A finished post-copy.
pub struct Outcome {
    pub running: Running,
    pub running_at: Instant,
    pub done: Done,
    /// Pages sent because the destination asked (prefetch included).
    pub requested_sent: u64,
    /// Pages sent by the background push.
    pub pushed: u64,
    pub reconnects: u32,
    /// What the urgent channel carried.
    pub urgent: Transfer,
}

/// Why post-copy ended early.
pub enum Failure {
    /// Before Running: the VM never ran there; resume it here.
    VmHere(String),
    /// After Running: the VM is (half) there and the link could not be re-established.
    VmGone(String),
}

/// The main connection during post-copy, with the thread that reads the destination's
/// messages from it.
pub struct Link {
    pub stream: Box<dyn Stream>,
    events: Receiver<Event>,
}

impl Link {
    /// Gives the link up: its reader sees the connection closed and ends.
    pub fn close(self) {
        self.stream.shutdown_both();
    }
}

/// The urgent channel's socket buffers (see `Stream::limit_buffers`): an answer waits
/// behind less.
pub const POSTCOPY_BUFFERS: usize = 1 << 20;

/// The thread that will read the destination's messages (see `open_link_on`).
pub fn reader_thread() -> Result<Parked, String> {
    Parked::spawn("postcopy-reader").map_err(|e| format!("cannot start the post-copy reader: {e}"))
}

/// `open_link_on` a thread started now.
pub fn open_link(stream: Box<dyn Stream>) -> Result<Link, String> {
    open_link_on(stream, reader_thread()?)
}

/// Starts reading the destination's messages from `stream` on `thread` (see
/// `reader_thread`), which timestamps Running as it arrives (the end of the downtime).
/// Opened before the pause: starting a thread and its seccomp filter took 0.2-0.35 ms
/// inside the downtime.
pub fn open_link_on(stream: Box<dyn Stream>, thread: Parked) -> Result<Link, String> {
    // The main connection keeps the kernel's own buffer sizing. Capped at 1 MiB, the push
    // of 1 MiB frames stalled for ~200 ms at a time: the source's write blocked while the
    // destination's receiver sat waiting for data (a TCP window stall, not pinned down
    // further; 1 run in 3 of the 64 MiB dirtier's hybrid migration on the test host, 280
    // instead of 110 ms in total). Requests and their answers go on the urgent channel,
    // which is the one kept small.
    let reader = stream.try_clone_stream().map_err(|e| format!("cannot split the migration connection: {e}"))?;
    // Bounded: a destination that floods requests faster than they are served fills this,
    // then the reader stops reading, then TCP stops the peer; memory stays bounded.
    let (tx, rx) = mpsc::sync_channel(EVENT_QUEUE);
    // Up before the caller pauses the guest (see `Parked::wait_ready`).
    thread.wait_ready();
    thread.start(move || read_events(reader, &tx))?;
    Ok(Link { stream, events: rx })
}

/// Forwards the destination's messages; ends at the first error (or when the link is
/// replaced and its receiver dropped).
fn read_events(mut reader: Box<dyn Stream>, tx: &SyncSender<Event>) {
    loop {
        // Waits for readability first: a read blocked on a Unix socket would also be woken
        // whenever the destination makes room for the push (see `Stream::wait_readable`).
        let frame =
            reader.wait_readable().map_err(protocol::Error::from).and_then(|()| protocol::read_frame(&mut reader));
        let event = match frame {
            Ok((Kind::PageRequest, payload)) => match parse_requests(&payload) {
                Some(gpas) => Event::Requests(gpas),
                None => Event::Lost(format!("malformed page request of {} bytes", payload.len())),
            },
            Ok((Kind::Running, payload)) => match serde_json::from_slice(&payload) {
                Ok(r) => Event::Running(r, Instant::now()),
                Err(e) => Event::Lost(format!("malformed Running message: {e}")),
            },
            Ok((Kind::Done, payload)) => match serde_json::from_slice(&payload) {
                Ok(d) => Event::Done(d),
                Err(e) => Event::Lost(format!("malformed Done message: {e}")),
            },
            Ok((Kind::Refuse, payload)) => {
                let reason = serde_json::from_slice::<protocol::Answer>(&payload).map(|a| a.reason).unwrap_or_default();
                Event::Lost(format!("the destination refused: {reason}"))
            }
            Ok((other, _)) => Event::Lost(format!("unexpected {other:?} message during post-copy")),
            Err(e) => Event::Lost(chain(&e)),
        };
        let last = matches!(event, Event::Lost(_) | Event::Done(_));
        if tx.send(event).is_err() || last {
            return;
        }
    }
}

/// What both senders (the push and the urgent channel) share.
#[derive(Clone)]
struct Pages {
    ram: GuestRam,
    map: PageMap,
    /// Pages the destination still lacks (and nobody sent yet).
    needed: Arc<PageSet>,
    /// Pages sent because the destination asked, and the few after each.
    requested_sent: Arc<AtomicU64>,
}

impl Pages {
    /// Queues page `index`; a page not `resident` here goes as zeros, unread.
    fn send(&self, index: u64, out: &mut Outgoing, resident: bool) -> Result<(), String> {
        self.needed.remove(index);
        out.queue(&self.ram, self.map.gpa(index), resident).map_err(|e| chain(&e))
    }

    /// Sends requested pages, each with the next few still needed; returns the page after
    /// the last one sent (where the push goes on).
    fn serve_requests(
        &self,
        gpas: &[u64],
        prefetch: &mut Prefetch,
        out: &mut Outgoing,
        stream: &mut Box<dyn Stream>,
    ) -> Result<u64, String> {
        let mut after = 0;
        for &gpa in gpas {
            // A page outside RAM is a confused or hostile peer's: nothing to send.
            let Some(index) = self.map.index_of_gpa(gpa) else {
                log::warn!("post-copy: request for {gpa:#x}, outside guest RAM");
                continue;
            };
            self.send(index, out, true)?;
            let mut sent = 1;
            let window = prefetch.after(index);
            if window > PREFETCH && gpas.len() == 1 {
                // The faulting thread waits for this page only: it goes ahead of the
                // prefetch, which on a slow link takes milliseconds.
                out.flush(stream).map_err(|e| chain(&e))?;
            }
            let end = index + 1 + window.min(self.map.run_limit(index).saturating_sub(1));
            for next in index + 1..end {
                if self.needed.contains(next) {
                    self.send(next, out, true)?;
                    sent += 1;
                }
            }
            self.requested_sent.fetch_add(sent, Relaxed);
            after = end;
        }
        out.flush(stream).map_err(|e| chain(&e))?;
        Ok(after)
    }
}

/// How many pages follow a requested one. A guest that walks its memory faster than the
/// push faults every few pages just past the last answer (an all-written 1 GiB guest took
/// 1,600-2,900 faults of 16 pages each, each costing both sides a wake-up, a request and
/// a frame); while faults follow each other like that the window doubles, up to
/// `PREFETCH_MAX`, and a fault anywhere else starts it again at `PREFETCH`, so scattered
/// faults never wait behind a long prefetch.
#[derive(Default)]
struct Prefetch {
    /// The first page the last answer did not cover.
    end: u64,
    window: u64,
}

impl Prefetch {
    /// The pages to send after requested page `index`.
    fn after(&mut self, index: u64) -> u64 {
        let covered = self.end.saturating_sub(self.window + 1);
        let walking = self.window > 0 && (covered..=self.end + PREFETCH).contains(&index);
        self.window = if walking { (self.window * 2 + 1).min(PREFETCH_MAX) } else { PREFETCH };
        self.end = index + 1 + self.window;
        self.window
    }
}

/// Answers the requests that come over the urgent channel, until it breaks or closes;
/// returns what it sent.
fn serve_urgent(pages: Pages, mut stream: Box<dyn Stream>, mut out: Outgoing) -> Transfer {
    out.start_postcopy();
    let mut prefetch = Prefetch::default();
    loop {
        let gpas = match protocol::read_frame(&mut stream) {
            Ok((Kind::PageRequest, payload)) => match parse_requests(&payload) {
                Some(gpas) => gpas,
                None => return out.stats,
            },
            _ => return out.stats,
        };
        if pages.serve_requests(&gpas, &mut prefetch, &mut out, &mut stream).is_err() {
            return out.stats;
        }
    }
}

/// A PageRequest payload: gpa u64 each, at least one, at most `MAX_REQUEST_PAGES`.
pub(crate) fn parse_requests(payload: &[u8]) -> Option<Vec<u64>> {
    let pages = payload.len() / 8;
    (payload.len().is_multiple_of(8) && pages > 0 && pages <= protocol::MAX_REQUEST_PAGES)
        .then(|| payload.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect())
}

/// The post-copy push on the main connection.
struct Server {
    pages: Pages,
    cursor: u64,
    pushed: u64,
}

impl Server {
    /// Sends the next chunk of needed pages; false when none are left.
    fn push_chunk(&mut self, out: &mut Outgoing, stream: &mut Box<dyn Stream>) -> Result<bool, String> {
        let needed = &self.pages.needed;
        let Some(first) = needed.next_from(self.cursor).or_else(|| needed.next_from(0)) else {
            return Ok(false);
        };
        // Residency of this stretch only (mincore): asked up front for all of a large
        // guest, it would cost a millisecond or more just as the VM starts there.
        let span = PUSH_SCAN.min(self.pages.map.run_limit(first));
        let resident = memory::residency(self.pages.map.host(first) as *mut u8, (span * super::pages::PAGE) as usize);
        log::trace!("push from page {first}: {} of {span} resident", resident.iter().filter(|r| **r).count());
        let mut index = first;
        let mut sent = 0;
        while out.queued() < PUSH_BYTES && index < first + span {
            if needed.contains(index) {
                let here = resident.get((index - first) as usize).copied().unwrap_or(true);
                self.pages.send(index, out, here)?;
                sent += 1;
            }
            index += 1;
        }
        self.pushed += sent;
        self.cursor = index;
        out.flush(stream).map_err(|e| chain(&e))?;
        Ok(true)
    }
}

/// Serves post-copy on `stream` (State and the Postcopy switch already sent) until the
/// destination has every page. `needed`: the pages the destination lacks.
pub fn serve(
    ram: &GuestRam,
    links: Links,
    needed: PageSet,
    out: &mut Outgoing,
    reconnect: &Reconnect,
    progress: &mut dyn FnMut(serde_json::Value),
) -> Result<Outcome, Failure> {
    let mut link = links.main;
    let pages = Pages {
        ram: ram.clone(),
        map: PageMap::new(ram),
        needed: Arc::new(needed),
        requested_sent: Arc::new(AtomicU64::new(0)),
    };
    // The urgent channel's own thread; it ends when the channel closes (below, at Done).
    let mut urgent = links.urgent.and_then(|(stream, thread)| {
        stream.limit_buffers(POSTCOPY_BUFFERS);
        let closer = stream.try_clone_stream().ok()?;
        let (p, o) = (pages.clone(), out.sibling());
        let outcome = thread.run(move || serve_urgent(p, stream, o)).ok()?;
        Some((closer, outcome))
    });
    let mut server = Server { pages, cursor: 0, pushed: 0 };
    let mut prefetch = Prefetch::default();
    out.start_postcopy();
    let mut running: Option<(Running, Instant)> = None;
    let mut complete_sent = false;
    let mut reconnects = 0;
    let mut last_progress = Instant::now();
    loop {
        // Until the VM runs there, only requests are served (the restore's own faults must
        // not queue behind a background push); then the push fills the gaps.
        let idle = complete_sent || running.is_none();
        let event = if idle {
            link.events.recv_timeout(Duration::from_millis(if complete_sent { 50 } else { 1 }))
        } else {
            link.events.try_recv().map_err(|e| match e {
                mpsc::TryRecvError::Empty => RecvTimeoutError::Timeout,
                mpsc::TryRecvError::Disconnected => RecvTimeoutError::Disconnected,
            })
        };
        let step: Result<(), String> = match event {
            Ok(Event::Requests(gpas)) => {
                server.pages.serve_requests(&gpas, &mut prefetch, out, &mut link.stream).map(|after| {
                    server.cursor = after;
                })
            }
            Ok(Event::Running(r, at)) => {
                running = Some((r, at));
                progress(
                    serde_json::json!({"postcopy": "running on the destination", "pages_left": server.pages.needed.count()}),
                );
                Ok(())
            }
            Ok(Event::Done(done)) => {
                let Some((running, running_at)) = running else {
                    // The VM resumes here: the urgent sender must be gone first.
                    link.stream.shutdown_both();
                    stop_urgent(urgent.take());
                    return Err(Failure::VmHere("the destination said Done before Running".into()));
                };
                link.stream.shutdown_both();
                let urgent = stop_urgent(urgent.take());
                let (requested_sent, pushed) = (server.pages.requested_sent.load(Relaxed), server.pushed);
                let urgent = urgent.unwrap_or_default();
                return Ok(Outcome { running, running_at, done, requested_sent, pushed, reconnects, urgent });
            }
            Ok(Event::Lost(e)) => Err(e),
            Err(RecvTimeoutError::Disconnected) => Err("the post-copy reader stopped".into()),
            Err(RecvTimeoutError::Timeout) if !idle => match server.push_chunk(out, &mut link.stream) {
                Ok(true) => Ok(()),
                Ok(false) => {
                    complete_sent = true;
                    let complete = Complete {
                        memory_crc32: 0,
                        pages_sent: out.stats.pages,
                        zero_pages: out.stats.zero_pages,
                        ram_crc32: None,
                        // The state went with the switch, checked there.
                        state_crc32: None,
                    };
                    protocol::write_json(&mut link.stream, Kind::Complete, &complete).map_err(|e| chain(&e))
                }
                Err(e) => Err(e),
            },
            Err(RecvTimeoutError::Timeout) => Ok(()),
        };
        if let Err(why) = step {
            link.stream.shutdown_both();
            if running.is_none() {
                // The VM resumes here: the urgent sender, which reads guest RAM in place,
                // must be gone first.
                stop_urgent(urgent.take());
                return Err(Failure::VmHere(why));
            }
            progress(
                serde_json::json!({"postcopy": "link lost", "error": why, "pages_left": server.pages.needed.count()}),
            );
            let (stream, missing) = reestablish(reconnect).map_err(|e| {
                let left = server.pages.needed.count();
                Failure::VmGone(if left == 0 {
                    // Every page went out: if they all arrived, the destination runs the
                    // VM on (it says so); only pages lost in flight would be missing there.
                    format!("post-copy link lost ({why}) after every page was sent, and not re-established: {e}. The VM runs on the destination if all of them arrived (its log says); if the destination is gone, so is the VM (unrecoverable)")
                } else {
                    format!("post-copy link lost ({why}) and not re-established: {e}. The VM's vCPUs are on the destination and {left} pages of its memory only here (unrecoverable)")
                })
            })?;
            server.pages.needed.clear();
            server.pages.needed.insert_ranges(&server.pages.map, &missing.ranges).map_err(Failure::VmGone)?;
            server.cursor = 0;
            complete_sent = false;
            reconnects += 1;
            link = open_link(stream).map_err(Failure::VmGone)?;
            progress(serde_json::json!({"postcopy": "link re-established", "pages_left": server.pages.needed.count()}));
        }
        if last_progress.elapsed() > Duration::from_millis(200) {
            last_progress = Instant::now();
            progress(serde_json::json!({"postcopy": "pushing", "pages_left": server.pages.needed.count(),
                "requested_sent": server.pages.requested_sent.load(Relaxed), "pushed": server.pushed}));
        }
    }
}

/// Closes the urgent channel and waits for its sender; returns what it sent.
fn stop_urgent(urgent: Option<(Box<dyn Stream>, Receiver<Transfer>)>) -> Option<Transfer> {
    urgent.and_then(|(closer, outcome)| {
        closer.shutdown_both();
        outcome.recv().ok()
    })
}

/// Reconnects to the destination, retrying until the timeout; returns the new stream and
/// the pages the destination still lacks.
fn reestablish(reconnect: &Reconnect) -> Result<(Box<dyn Stream>, Missing), String> {
    let deadline = Instant::now() + reconnect.timeout;
    let mut last_error = String::from("no attempt");
    while Instant::now() < deadline {
        match try_resume(reconnect) {
            Ok(ok) => return Ok(ok),
            Err(e) => last_error = e,
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!("gave up after {} s: {last_error}", reconnect.timeout.as_secs()))
}

fn try_resume(reconnect: &Reconnect) -> Result<(Box<dyn Stream>, Missing), String> {
    let mut stream = super::source::dial(reconnect.to, reconnect.auth_key)?;
    protocol::write_json(&mut stream, Kind::Resume, &Resume { migration_id: reconnect.migration_id })
        .map_err(|e| chain(&e))?;
    // Each range is checked against RAM when it is taken in.
    let missing: Missing = protocol::read_json(&mut stream, Kind::Missing).map_err(|e| chain(&e))?;
    Ok((stream, missing))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefetch_grows_while_faults_walk_memory_and_starts_again_elsewhere() {
        let mut prefetch = Prefetch::default();
        assert_eq!(prefetch.after(1000), PREFETCH);
        // Each fault lands where the previous answer ended.
        let mut at = 1000;
        let mut windows = Vec::new();
        for _ in 0..6 {
            at = prefetch.end;
            windows.push(prefetch.after(at));
        }
        assert_eq!(windows, [31, 63, 127, 255, 255, 255]);
        // A fault on a page the last answer carried (still in flight) is a walk too.
        assert_eq!(prefetch.after(at + 3), PREFETCH_MAX);
        // Far away: a scattered fault gets the short window again.
        assert_eq!(prefetch.after(at + 100_000), PREFETCH);
        assert_eq!(prefetch.after(5), PREFETCH);
    }
}
