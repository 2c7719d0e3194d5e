//! lz4 compression of Memory frames, used where it pays (`--compress`, docs/migration.md).
//!
//! A frame compressed costs the compressor's time, its smaller size over the link, and the
//! destination's decompression and extra copy (a raw frame goes from the socket straight
//! into guest RAM); sent raw, its whole size over the link. With the link's rate `L`, the
//! compressor's `C` (bytes in per second) and its ratio `r` (bytes out per byte in), and
//! the destination's two passes (decompressing into a buffer, copying into RAM) taken to
//! cost as much as compressing each (the source cannot time them), compressing pays when
//! `3/C + r/L < 1/L`, that is when `L < C (1 - r) / 3`. Without the destination's share,
//! loopback on the 2-core test host compressed the 64 MiB dirtier's stop-and-copy, and its
//! downtime grew from 26-30 to 35-37 ms; counting one pass, half its frames still went
//! compressed.
//!
//! How well memory compresses depends on what the guest keeps in it, and the link's rate
//! on where the destination is, so `auto` measures all three as it goes: `C` and `r` from
//! the frames it compresses and, while it sends raw, from a sample of every frame (a 64th
//! of it, 4 to 64 KiB); `L` from the frames it sends raw (the first frame goes raw), and
//! while it compresses, from one frame sent raw now and then (after 16 frames, then 32,
//! 64, up to 256 while the choice holds: a raw frame on a slow link is expensive, and the
//! link rarely gets faster during a migration).
//!
//! A compressed payload is `raw_len u32` then one lz4 block of the raw payload.

use std::time::Duration;

/// The first bytes of a compressed payload: the raw payload's length.
const LEN_PREFIX: usize = 4;
/// While frames go raw, a 64th of each (at least 4 KiB, at most 64 KiB) is compressed to
/// keep `C` and `r` current: a small frame, such as the last pages of an idle guest sent in
/// the pause, costs microseconds, not the 0.1-0.2 ms of a whole sample.
const SAMPLE_SHARE: usize = 64;
const SAMPLE_MIN: usize = 4 << 10;
const SAMPLE_MAX: usize = 64 << 10;
/// Frames smaller than this go raw, neither compressed nor sampled: little to gain on any
/// link, and the compressor's fixed cost per call (a few us) would skew its estimates
/// (the records of an idle guest's last frame, 80 bytes, "compressed" at 10 ns a byte).
const SMALL_FRAME: usize = 8 << 10;
/// While frames go compressed, one goes raw (to time the link) this many frames after the
/// last such try at first...
const FIRST_TRY_GAP: u64 = 16;
/// ... and at most this many while the choice holds.
const LAST_TRY_GAP: u64 = 256;
/// Compression must promise to be this much faster than sending raw, so that noise in the
/// estimates does not flip the choice back and forth.
const MARGIN: f64 = 1.25;
/// Weight of the newest sample in the running estimates.
const WEIGHT: f64 = 0.5;

/// Compression errors (a peer's compressed frame that does not decompress).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Compressed memory frame of {0} bytes is too short for its header")]
    Short(usize),
    #[error("Compressed memory frame claims {0} bytes, over the {max}-byte limit", max = super::protocol::MAX_PAYLOAD)]
    TooLarge(u64),
    #[error("Compressed memory frame does not decompress: {0}")]
    Corrupt(String),
    #[error("Compressed memory frame decompresses to {got} bytes, not the {claimed} it claims")]
    Length { got: usize, claimed: usize },
}

/// `--compress`: when Memory frames go compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// When the estimates say it pays (see the module's documentation).
    #[default]
    Auto,
    /// Every frame that comes out smaller.
    On,
    /// Never.
    Off,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Mode, String> {
        match s {
            "auto" => Ok(Mode::Auto),
            "on" => Ok(Mode::On),
            "off" => Ok(Mode::Off),
            other => Err(format!("unknown compression '{other}' (auto, on, off)")),
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Auto => "auto",
            Mode::On => "on",
            Mode::Off => "off",
        })
    }
}

/// A running estimate of seconds per byte (averaging time, not rate, lets one slow sample
/// count: a first frame that only filled the socket's buffer looks infinitely fast).
#[derive(Debug, Default, Clone, Copy)]
struct Pace(Option<f64>);

impl Pace {
    fn add(&mut self, bytes: usize, took: Duration) {
        if bytes == 0 {
            return;
        }
        let sample = took.as_secs_f64() / bytes as f64;
        self.0 = Some(self.0.map_or(sample, |old| old + WEIGHT * (sample - old)));
    }
}

/// Compresses Memory payloads for one sender and decides, frame by frame, whether to.
#[derive(Debug, Default)]
pub struct Packer {
    mode: Mode,
    /// A payload (or sample) in several slices, gathered for the compressor.
    input: Vec<u8>,
    /// The compressed payload: length prefix and block.
    output: Vec<u8>,
    /// Seconds per byte: the link (raw frames' writes) and the compressor (bytes in).
    link: Pace,
    compressor: Pace,
    /// Bytes out per byte in, running.
    ratio: Option<f64>,
    /// Frames so far, and the frame at which a compressing packer sends one raw.
    frames: u64,
    next_try: u64,
    try_gap: u64,
}

/// How a payload went, for `Packer::sent`.
pub struct Sent {
    pub compressed: bool,
    pub wire_bytes: usize,
    pub took: Duration,
}

impl Packer {
    /// A packer. Buffers for samples are made and touched now (a sample may be taken in a
    /// pause); those for whole frames only when a frame first goes compressed: faulting in
    /// 8 MiB took 2-4 ms here, which a migration that never compresses (a fast link) need
    /// not pay, and one that does gains far more.
    pub fn new(mode: Mode) -> Packer {
        // Not zeros: a zeroed allocation comes from calloc, its pages not yet faulted in.
        let touched = |len: usize| vec![0xa5u8; len];
        let (input, output) = match mode {
            Mode::Auto => {
                (touched(SAMPLE_MAX), touched(LEN_PREFIX + lz4_flex::block::get_maximum_output_size(SAMPLE_MAX)))
            }
            _ => (Vec::new(), Vec::new()),
        };
        Packer { mode, input, output, try_gap: FIRST_TRY_GAP, next_try: FIRST_TRY_GAP, ..Default::default() }
    }

    /// The payload `slices` (of `len` bytes in all) compressed, if this frame should go
    /// compressed and comes out smaller; `None`: send it raw.
    pub fn pack(&mut self, slices: &[&[u8]], len: usize) -> Option<&[u8]> {
        if self.mode == Mode::Off || len < SMALL_FRAME || len > u32::MAX as usize {
            return None;
        }
        if !self.wants_compression() {
            self.compress(slices, (len / SAMPLE_SHARE).clamp(SAMPLE_MIN, SAMPLE_MAX).min(len));
            return None;
        }
        let packed = self.compress(slices, len)?;
        (packed < len).then(|| &self.output[..packed])
    }

    /// Compresses the first `len` bytes of `slices` into `output` (prefix included) and
    /// updates `C` and `r`; returns the compressed length.
    fn compress(&mut self, slices: &[&[u8]], len: usize) -> Option<usize> {
        // Grown (and faulted in) outside the timing: a one-off, not the compressor's pace.
        let bound = LEN_PREFIX + lz4_flex::block::get_maximum_output_size(len);
        if self.output.len() < bound {
            self.output = vec![0xa5; bound];
        }
        if self.input.capacity() < len && slices.len() > 1 {
            self.input = vec![0xa5; len];
        }
        let start = std::time::Instant::now();
        let input: &[u8] = match slices {
            [one, ..] if one.len() >= len => &one[..len],
            _ => {
                self.input.clear();
                for slice in slices {
                    let room = len - self.input.len();
                    self.input.extend_from_slice(&slice[..slice.len().min(room)]);
                }
                &self.input
            }
        };
        self.output[..LEN_PREFIX].copy_from_slice(&(input.len() as u32).to_le_bytes());
        let packed = LEN_PREFIX + lz4_flex::block::compress_into(input, &mut self.output[LEN_PREFIX..bound]).ok()?;
        self.compressor.add(input.len(), start.elapsed());
        let ratio = packed as f64 / input.len().max(1) as f64;
        self.ratio = Some(self.ratio.map_or(ratio, |old| old + WEIGHT * (ratio - old)));
        Some(packed)
    }

    /// Records how the last payload went: a raw one's write times the link.
    pub fn sent(&mut self, sent: Sent) {
        if !sent.compressed {
            self.link.add(sent.wire_bytes, sent.took);
        }
        let ns = |pace: Pace| pace.0.map(|s| s * 1e9);
        log::debug!(
            "frame {}: {} bytes {} in {:?}; link {:?} ns/B, compressor {:?} ns/B, ratio {:?}",
            self.frames,
            sent.wire_bytes,
            if sent.compressed { "compressed" } else { "raw" },
            sent.took,
            ns(self.link),
            ns(self.compressor),
            self.ratio
        );
    }

    /// Whether the compressor, at its measured pace and ratio, beats the link.
    fn pays(&self) -> Option<bool> {
        let (Pace(Some(link)), Pace(Some(compressor)), Some(ratio)) = (self.link, self.compressor, self.ratio) else {
            return None;
        };
        // Per byte: compressed `compressor` here, twice that there, `ratio * link` on the
        // wire; raw `link`.
        Some(MARGIN * (3.0 * compressor + ratio * link) < link)
    }

    /// This frame's choice (`auto`: the estimates' answer, or a raw frame to time the link).
    fn wants_compression(&mut self) -> bool {
        if self.mode == Mode::On {
            return true;
        }
        self.frames += 1;
        // Nothing measured yet: the first frame goes raw (and sampled).
        if self.pays() != Some(true) {
            self.try_gap = FIRST_TRY_GAP;
            self.next_try = self.frames + self.try_gap;
            return false;
        }
        if self.frames >= self.next_try {
            self.try_gap = (self.try_gap * 2).min(LAST_TRY_GAP);
            self.next_try = self.frames + self.try_gap;
            return false;
        }
        true
    }
}

/// Decompresses a compressed Memory payload into `out` (reusing its allocation); returns
/// the raw payload. A forged length cannot make it allocate more than a raw frame may hold.
pub fn unpack<'a>(payload: &[u8], out: &'a mut Vec<u8>) -> Result<&'a [u8], Error> {
    let (len, block) = payload.split_first_chunk::<LEN_PREFIX>().ok_or(Error::Short(payload.len()))?;
    let len = u32::from_le_bytes(*len) as usize;
    if len as u64 > super::protocol::MAX_PAYLOAD {
        return Err(Error::TooLarge(len as u64));
    }
    // Grown, never shrunk: the same pages serve every frame.
    if out.len() < len {
        out.resize(len, 0);
    }
    let got = lz4_flex::block::decompress_into(block, &mut out[..len]).map_err(|e| Error::Corrupt(e.to_string()))?;
    if got != len {
        return Err(Error::Length { got, claimed: len });
    }
    Ok(&out[..len])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sparse(len: usize) -> Vec<u8> {
        let mut data = vec![0u8; len];
        data.chunks_mut(4096).enumerate().for_each(|(i, page)| page[..8].copy_from_slice(&(i as u64).to_le_bytes()));
        data
    }

    fn noise(len: usize) -> Vec<u8> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn payloads_round_trip_whole_or_in_slices() {
        let data = sparse(1 << 20);
        let mut packer = Packer::new(Mode::On);
        let (a, b) = data.split_at(12345);
        let packed = packer.pack(&[a, b], data.len()).expect("sparse pages compress").to_vec();
        assert!(packed.len() < data.len() / 50, "{} bytes", packed.len());
        let mut out = Vec::new();
        assert_eq!(unpack(&packed, &mut out).unwrap(), &data[..]);
        // What does not shrink goes raw.
        assert!(packer.pack(&[&noise(1 << 16)], 1 << 16).is_none());
        assert!(Packer::new(Mode::Off).pack(&[&data], data.len()).is_none());
    }

    #[test]
    fn forged_payloads_are_refused() {
        let data = sparse(1 << 16);
        let packed = Packer::new(Mode::On).pack(&[&data], data.len()).unwrap().to_vec();
        let mut out = Vec::new();
        assert!(matches!(unpack(&packed[..3], &mut out), Err(Error::Short(3))));
        let mut huge = packed.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(unpack(&huge, &mut out), Err(Error::TooLarge(_))));
        let mut longer = packed.clone();
        longer[..4].copy_from_slice(&(data.len() as u32 + 1).to_le_bytes());
        assert!(unpack(&longer, &mut out).is_err(), "a length the block does not fill");
        let mut truncated = packed.clone();
        truncated.truncate(packed.len() / 2);
        assert!(unpack(&truncated, &mut out).is_err());
        let mut garbage = packed.clone();
        garbage[4..].iter_mut().for_each(|b| *b = 0xff);
        assert!(unpack(&garbage, &mut out).is_err());
    }

    /// Plays `frames` frames of `data` through an `auto` packer over a link of
    /// `link_ns_per_byte`; returns which went compressed.
    fn auto_choices(data: &[u8], link_ns_per_byte: f64, frames: usize) -> Vec<bool> {
        let mut packer = Packer::new(Mode::Auto);
        (0..frames)
            .map(|_| {
                let wire_bytes = packer.pack(&[data], data.len()).map_or(data.len(), <[u8]>::len);
                let compressed = wire_bytes < data.len();
                let took = Duration::from_secs_f64(wire_bytes as f64 * link_ns_per_byte * 1e-9);
                packer.sent(Sent { compressed, wire_bytes, took });
                compressed
            })
            .collect()
    }

    #[test]
    fn auto_compresses_what_shrinks_over_a_slow_link_and_not_noise() {
        let sparse = sparse(1 << 20);
        // 1 Gbit/s: 8 ns a byte. All but the first frame and the raw tries go compressed.
        let slow = auto_choices(&sparse, 8.0, 64);
        assert!(!slow[0] && slow[1], "{slow:?}");
        assert!(slow.iter().filter(|&&c| !c).count() <= 3, "{slow:?}");
        // Noise never comes out smaller, whatever the link.
        assert!(auto_choices(&noise(1 << 20), 8.0, 32).iter().all(|&c| !c));
        // A link faster than any compressor (1 TB/s): raw.
        assert!(auto_choices(&sparse, 0.001, 64).iter().all(|&c| !c));
    }
}
