//! The write side of the firmware ROM. KVM serves reads from the read-only memory slot;
//! writes exit to the VMM and land here, where they are counted and dropped, so the ROM
//! keeps its contents whatever the guest does.

use super::{BusDevice, VmRequest};
use std::sync::atomic::{AtomicU64, Ordering};

/// Sink for writes to the ROM range.
#[derive(Default)]
pub struct RomWrites {
    dropped: AtomicU64,
}

impl RomWrites {
    /// Writes dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl BusDevice for RomWrites {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        // Only reached if KVM ever forwards a ROM read; the slot normally serves them.
        data.fill(0xff);
    }

    fn write(&self, offset: u64, data: &[u8]) -> Option<VmRequest> {
        if self.dropped.fetch_add(1, Ordering::Relaxed) == 0 {
            log::info!("guest wrote {} byte(s) to the firmware ROM at offset {offset:#x}; dropped", data.len());
        }
        None
    }
}

/// A device that does nothing: the floor cost of a port-I/O exit, for benchmarks.
#[derive(Default)]
pub struct NullDevice;

impl BusDevice for NullDevice {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&self, _offset: u64, _data: &[u8]) -> Option<VmRequest> {
        None
    }
}
