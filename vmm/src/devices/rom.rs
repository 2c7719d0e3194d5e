//! The write side of the firmware ROM. KVM serves reads from the read-only memory slot;
//! writes exit to the VMM and land here, where they are counted and dropped, so the ROM
//! keeps its contents whatever the guest does.

use super::{BusDevice, VmRequest};

/// Sink for writes to the ROM range.
#[derive(Default)]
pub struct RomWrites {
    dropped: u64,
}

impl BusDevice for RomWrites {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Only reached if KVM ever forwards a ROM read; the slot normally serves them.
        data.fill(0xff);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmRequest> {
        self.dropped += 1;
        if self.dropped == 1 {
            log::info!(
                "guest wrote {} byte(s) to the firmware ROM at offset {offset:#x}; dropped",
                data.len()
            );
        }
        None
    }
}
