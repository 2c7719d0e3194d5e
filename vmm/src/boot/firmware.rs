//! The hand-off from VMM to firmware: a small block in RAM at a documented address (see
//! `popek_abi::FirmwareHandoff`) with the kernel's entry point and its EBX.

use super::{write, Error, KernelEntry};
use popek_abi::{layout, FirmwareHandoff, FIRMWARE_HANDOFF_MAGIC};

/// Writes the hand-off block the firmware reads before jumping to the kernel.
pub fn write_handoff(ram: &super::GuestRam, kernel: &KernelEntry) -> Result<(), Error> {
    let handoff = FirmwareHandoff { magic: FIRMWARE_HANDOFF_MAGIC, entry: kernel.entry, ebx: kernel.ebx };
    let mut bytes = Vec::with_capacity(16);
    bytes.extend_from_slice(&handoff.magic.to_le_bytes());
    bytes.extend_from_slice(&handoff.entry.to_le_bytes());
    bytes.extend_from_slice(&handoff.ebx.to_le_bytes());
    write(ram, layout::FIRMWARE_HANDOFF, &bytes, "the firmware hand-off block")
}
