//! The migration wire protocol (docs/migration.md): length-framed, versioned messages.
//!
//! Every frame is a 16-byte header, `magic u32 | version u16 | kind u16 | length u64`
//! (little endian), then `length` bytes of payload, at most [`MAX_PAYLOAD`]. Control
//! messages carry JSON; memory frames carry page records (see `memory`).

use serde::{de::DeserializeOwned, Serialize};
use std::io::{Read, Write};

/// "PPKM".
pub const MAGIC: u32 = u32::from_le_bytes(*b"PPKM");
/// Protocol version; a peer with another version is refused in the handshake. 2: the
/// State payload is postcard, not JSON, and goes before the last pages. 3: stop-and-copy
/// sends Populate before the pause. 4: DELTA page records. 5: MemoryLz4 and PostcopyPagesLz4 frames. 6: the free-page hints in the State
/// as runs, not a bitmap, and KVM's structures without their trailing zeros. (tools/src/bin/fault-matrix/relay.rs
/// mirrors it: bump both.)
pub const VERSION: u16 = 6;
/// Largest payload accepted: a peer cannot make us allocate more for one frame.
pub const MAX_PAYLOAD: u64 = 64 << 20;
/// Most pages one PageRequest may ask for (32 KiB of addresses): the post-copy source
/// queues at most a bounded number of requests, so this bounds what a destination can
/// make it hold (docs/security.md).
pub const MAX_REQUEST_PAGES: usize = 4096;

/// Protocol errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Connection failed")]
    Io(#[from] std::io::Error),
    #[error("Not a Popek migration stream (bad magic {0:#x})")]
    Magic(u32),
    #[error("Peer speaks migration protocol version {0}, this popek speaks {VERSION}")]
    Version(u16),
    #[error("Frame of {0} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    TooLarge(u64),
    #[error("Unknown message kind {0}")]
    UnknownKind(u16),
    #[error("Expected a {expected:?} message, got {got:?}")]
    Unexpected { expected: Kind, got: Kind },
    #[error("Malformed {0:?} message: {1}")]
    Malformed(Kind, String),
    #[error("The peer refused: {0}")]
    Refused(String),
}

/// Message kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    /// Source -> destination: who I am and what the VM needs (JSON `Hello`).
    Hello = 1,
    /// Destination -> source: accepted (JSON `Answer`).
    Accept = 2,
    /// Either way: refused or aborted, with a reason (JSON `Answer`).
    Refuse = 3,
    /// Source -> destination: vCPU, VM and device state (JSON).
    State = 4,
    /// Source -> destination: page records.
    Memory = 5,
    /// Source -> destination: all sent; CRC32 of every memory payload (JSON `Complete`).
    Complete = 6,
    /// Destination -> source: the VM runs here now (JSON `Running`).
    Running = 7,
    /// Either way, before Hello: the authentication handshake (see `auth`).
    Auth = 8,
    /// Source -> destination, before State: switch to post-copy; the pages listed as
    /// discarded were re-dirtied since they were sent (JSON `Postcopy`).
    Postcopy = 9,
    /// Destination -> source: the guest faulted on these pages (gpa u64 each, binary).
    PageRequest = 10,
    /// Source -> destination during post-copy: `crc32 u32` of the records, then page
    /// records (checked before a single page is installed: installed pages cannot be
    /// taken back once the guest ran).
    PostcopyPages = 11,
    /// Destination -> source: every page arrived; the source may go (JSON `Done`).
    Done = 12,
    /// Source -> destination on a new connection after a broken post-copy link
    /// (JSON `Resume`).
    Resume = 13,
    /// Destination -> source, answering Resume: the pages still missing (JSON `Missing`).
    Missing = 14,
    /// Source -> destination, first message of the second connection a post-copy or
    /// hybrid migration opens after Accept: the urgent channel, which carries page
    /// requests and their answers past the background push (JSON `Resume`).
    Urgent = 15,
    /// Source -> destination, hybrid, just before the switch while the guest still runs:
    /// drop these pages now (re-dirtied since sent; they come again in post-copy), so the
    /// switch itself has little left to drop (JSON `Missing`); answered with Accept.
    Discard = 16,
    /// Source -> destination, before the pause: answer Accept once everything sent so far
    /// is applied, so the downtime never waits for the destination to catch up (empty).
    Sync = 17,
    /// Source -> destination, stop-and-copy, before the pause: these pages will come with
    /// data; allocate them now, so the downtime does not pay for it (JSON `Missing`);
    /// answered with Accept once done.
    Populate = 18,
    /// Source -> destination: a Memory payload compressed (`raw_len u32`, then one lz4
    /// block of it; see `compress`).
    MemoryLz4 = 19,
    /// Source -> destination during post-copy, on the main connection: a PostcopyPages
    /// payload (its CRC32 included) compressed as MemoryLz4's is.
    PostcopyPagesLz4 = 20,
}

impl Kind {
    fn from_u16(v: u16) -> Result<Kind, Error> {
        Ok(match v {
            1 => Kind::Hello,
            2 => Kind::Accept,
            3 => Kind::Refuse,
            4 => Kind::State,
            5 => Kind::Memory,
            6 => Kind::Complete,
            7 => Kind::Running,
            8 => Kind::Auth,
            9 => Kind::Postcopy,
            10 => Kind::PageRequest,
            11 => Kind::PostcopyPages,
            12 => Kind::Done,
            13 => Kind::Resume,
            14 => Kind::Missing,
            15 => Kind::Urgent,
            16 => Kind::Discard,
            17 => Kind::Sync,
            18 => Kind::Populate,
            19 => Kind::MemoryLz4,
            20 => Kind::PostcopyPagesLz4,
            other => return Err(Error::UnknownKind(other)),
        })
    }
}

/// Writes one frame.
pub fn write_frame(w: &mut impl Write, kind: Kind, payload: &[u8]) -> Result<(), Error> {
    // Header and payload in one system call where the writer allows: written apart, over
    // TCP with Nagle off, they went as two segments, and the reader woke for the header
    // and again for the payload (State, Complete and Running all cross inside the downtime).
    write_frame_vectored(w, kind, &[payload])
}

fn frame_header(kind: Kind, len: usize) -> [u8; 16] {
    let mut header = [0u8; 16];
    header[..4].copy_from_slice(&MAGIC.to_le_bytes());
    header[4..6].copy_from_slice(&VERSION.to_le_bytes());
    header[6..8].copy_from_slice(&(kind as u16).to_le_bytes());
    header[8..].copy_from_slice(&(len as u64).to_le_bytes());
    header
}

/// Writes one frame whose payload is the concatenation of `parts`, with as few system
/// calls as the writer allows (a plain socket takes them all in one `writev`).
pub fn write_frame_vectored(w: &mut impl Write, kind: Kind, parts: &[&[u8]]) -> Result<(), Error> {
    let header = frame_header(kind, parts.iter().map(|p| p.len()).sum());
    let mut slices: Vec<std::io::IoSlice> = std::iter::once(&header[..])
        .chain(parts.iter().copied())
        .filter(|p| !p.is_empty())
        .map(std::io::IoSlice::new)
        .collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        match w.write_vectored(rest) {
            Ok(0) => return Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into()),
            Ok(n) => std::io::IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Writes a JSON message.
pub fn write_json<T: Serialize>(w: &mut impl Write, kind: Kind, value: &T) -> Result<(), Error> {
    let payload = serde_json::to_vec(value).map_err(|e| Error::Malformed(kind, e.to_string()))?;
    write_frame(w, kind, &payload)?;
    w.flush()?;
    Ok(())
}

/// Reads one frame, checking magic, version and size before allocating.
pub fn read_frame(r: &mut impl Read) -> Result<(Kind, Vec<u8>), Error> {
    let mut payload = Vec::new();
    let kind = read_frame_into(r, &mut payload)?;
    Ok((kind, payload))
}

/// Reads one frame into `payload`, reusing its allocation: a receiver of many large frames
/// then touches the same memory again instead of fresh pages for every frame (a new
/// buffer of megabytes comes from mmap, one page fault per 4 KiB).
pub fn read_frame_into(r: &mut impl Read, payload: &mut Vec<u8>) -> Result<Kind, Error> {
    let (kind, len) = read_header(r)?;
    read_payload(r, len, payload)?;
    Ok(kind)
}

/// Reads the `len`-byte payload of a frame whose header `read_header` returned into
/// `payload` (reusing its allocation, as `read_frame_into`).
pub fn read_payload(r: &mut impl Read, len: u64, payload: &mut Vec<u8>) -> Result<(), Error> {
    payload.resize(len as usize, 0);
    r.read_exact(payload)?;
    Ok(())
}

/// Reads a frame's header, checking magic, version and size; returns its kind and the
/// length of the payload that follows (for a caller that reads the payload piece by piece).
pub fn read_header(r: &mut impl Read) -> Result<(Kind, u64), Error> {
    let mut header = [0u8; 16];
    r.read_exact(&mut header)?;
    let magic = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    if magic != MAGIC {
        return Err(Error::Magic(magic));
    }
    let version = u16::from_le_bytes([header[4], header[5]]);
    if version != VERSION {
        return Err(Error::Version(version));
    }
    let kind = Kind::from_u16(u16::from_le_bytes([header[6], header[7]]))?;
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&header[8..]);
    let len = u64::from_le_bytes(len_bytes);
    if len > MAX_PAYLOAD {
        return Err(Error::TooLarge(len));
    }
    Ok((kind, len))
}

/// Reads a frame of the `expected` kind as JSON; a Refuse frame becomes `Error::Refused`.
pub fn read_json<T: DeserializeOwned>(r: &mut impl Read, expected: Kind) -> Result<T, Error> {
    let (kind, payload) = read_frame(r)?;
    if kind == Kind::Refuse && expected != Kind::Refuse {
        let answer: Answer = serde_json::from_slice(&payload).unwrap_or(Answer { reason: "no reason given".into() });
        return Err(Error::Refused(answer.reason));
    }
    if kind != expected {
        return Err(Error::Unexpected { expected, got: kind });
    }
    serde_json::from_slice(&payload).map_err(|e| Error::Malformed(kind, e.to_string()))
}

/// Accept/Refuse payload.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Answer {
    pub reason: String,
}

/// What the source says before anything else.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Hello {
    pub popek_version: String,
    pub memory_bytes: u64,
    pub vcpus: u32,
    pub firmware: bool,
    pub msr_policy_zero: bool,
    pub tsc_khz: Option<u32>,
    /// CRC32 of the host's KVM_GET_SUPPORTED_CPUID: a destination with other CPU features
    /// refuses (the guest may already use a feature it would lose).
    #[serde(default)]
    pub cpuid_crc32: u32,
    /// Random per migration: a post-copy reconnection must name it (a stray source cannot
    /// take over a half-moved VM).
    #[serde(default)]
    pub migration_id: u64,
    /// The migration may switch to post-copy: the source opens the urgent channel next.
    #[serde(default)]
    pub postcopy: bool,
}

/// The switch to post-copy. Ranges are `(gpa, pages)`.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Postcopy {
    pub discard: Vec<(u64, u64)>,
    /// CRC32 of every Memory payload sent before the switch (pre-copy rounds and the
    /// pages the VMM's devices write at restore), checked before post-copy starts.
    #[serde(default)]
    pub memory_crc32: u32,
    /// CRC32 of the State payload that follows.
    #[serde(default)]
    pub state_crc32: Option<u32>,
}

/// A post-copy reconnection.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Resume {
    pub migration_id: u64,
}

/// The pages a destination still lacks, as `(gpa, pages)` ranges.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Missing {
    pub ranges: Vec<(u64, u64)>,
}

/// The destination's account of a post-copy: sent with Done.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Done {
    /// Faults the guest (or KVM, or the VMM's own threads) took on missing pages.
    pub demand_faults: u64,
    /// Pages asked of the source.
    pub requested_pages: u64,
    /// Pages installed from the source's stream (pushed or requested).
    pub received_pages: u64,
    /// Pages filled with zeros here without asking (known zero from pre-copy).
    pub local_zero_pages: u64,
    /// Request -> page installed, in microseconds.
    pub fault_latency_p50_us: u64,
    pub fault_latency_p99_us: u64,
    pub fault_latency_max_us: u64,
    /// Times the link broke and was re-established.
    pub recoveries: u32,
    /// Post-copy start -> last page installed, in milliseconds.
    pub postcopy_ms: f64,
}

/// End of the stream.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Complete {
    pub memory_crc32: u32,
    pub pages_sent: u64,
    pub zero_pages: u64,
    /// Test mode (`--verify-memory`): CRC32 of all guest RAM with the vCPUs paused; the
    /// destination compares it with its own RAM before running the VM.
    #[serde(default)]
    pub ram_crc32: Option<u32>,
    /// CRC32 of the State payload: a damaged state is refused, never restored.
    #[serde(default)]
    pub state_crc32: Option<u32>,
}

/// The destination's confirmation.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Running {
    /// Destination-side time from the first State byte to vCPUs running, in microseconds.
    pub restore_us: u64,
    /// The destination's wall clock (ns since the Unix epoch) as it lets its vCPUs go
    /// (just before this message goes out). With the source's stamp of its pause, it gives
    /// the downtime the way QEMU measures its own, from two events on one clock; it means
    /// something only where both clocks agree (one host).
    #[serde(default)]
    pub resumed_unix_ns: Option<u64>,
}

/// This host's wall clock in ns since the Unix epoch (see `Running::resumed_unix_ns`).
pub fn unix_ns() -> Option<u64> {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).ok()?;
    u64::try_from(since.as_nanos()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_bad_ones_are_refused() {
        let mut buf = Vec::new();
        write_json(
            &mut buf,
            Kind::Complete,
            &Complete { memory_crc32: 7, pages_sent: 1, zero_pages: 2, ram_crc32: None, state_crc32: None },
        )
        .unwrap();
        let c: Complete = read_json(&mut buf.as_slice(), Kind::Complete).unwrap();
        assert_eq!(c.memory_crc32, 7);
        assert!(matches!(read_json::<Complete>(&mut buf.as_slice(), Kind::State), Err(Error::Unexpected { .. })));
        let mut bad = buf.clone();
        bad[0] ^= 1;
        assert!(matches!(read_frame(&mut bad.as_slice()), Err(Error::Magic(_))));
        let mut bad = buf.clone();
        bad[4] = 9;
        assert!(matches!(read_frame(&mut bad.as_slice()), Err(Error::Version(9))));
        let mut bad = buf.clone();
        bad[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(read_frame(&mut bad.as_slice()), Err(Error::TooLarge(_))));
        let truncated = &buf[..buf.len() - 1];
        assert!(matches!(read_frame(&mut &truncated[..]), Err(Error::Io(_))));
        let mut refuse = Vec::new();
        write_json(&mut refuse, Kind::Refuse, &Answer { reason: "no room".into() }).unwrap();
        assert!(
            matches!(read_json::<Complete>(&mut refuse.as_slice(), Kind::Complete), Err(Error::Refused(r)) if r == "no room")
        );
    }
}
