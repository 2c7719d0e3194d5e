//! Hand-made migration frames (docs/migration.md): for fake peers that follow the protocol
//! as far as a test needs and then misbehave.

use std::io::{Read, Write};

/// A frame: magic "PPKM", `version`, `kind`, payload length, payload.
pub fn frame(kind: u16, payload: &[u8], version: u16) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(16 + payload.len());
    bytes.extend_from_slice(b"PPKM");
    bytes.extend_from_slice(&version.to_le_bytes());
    bytes.extend_from_slice(&kind.to_le_bytes());
    bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

/// Writes a frame, ignoring a peer that went away (the tests check what the peer did).
pub fn write_frame(stream: &mut impl Write, kind: u16, payload: &[u8], version: u16) {
    let _ = stream.write_all(&frame(kind, payload, version));
}

/// Reads one frame: its kind and payload; None at the end of the stream.
pub fn read_frame(stream: &mut impl Read) -> Option<(u16, Vec<u8>)> {
    let mut header = [0u8; 16];
    stream.read_exact(&mut header).ok()?;
    let kind = u16::from_le_bytes([header[6], header[7]]);
    let len = u64::from_le_bytes(header[8..16].try_into().ok()?) as usize;
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).ok()?;
    Some((kind, payload))
}
