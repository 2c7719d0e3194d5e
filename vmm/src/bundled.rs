//! Images built from this workspace and embedded in the binary by `build.rs`, so that
//! `popek run` needs no paths.

/// The bundled test guest (guest/), a PVH ELF.
pub static GUEST_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/guest.elf"));

/// The firmware ROM (firmware/), 64 KiB, mapped to end at 4 GiB.
pub static FIRMWARE_ROM: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/firmware.bin"));
