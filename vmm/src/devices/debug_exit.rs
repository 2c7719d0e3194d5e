//! The exit port, compatible with QEMU's `isa-debug-exit`: a write of `v` ends the VM and
//! `popek` exits with `(v << 1) | 1`, so test suites written for QEMU run unchanged.

use super::{BusDevice, VmRequest};

/// The exit port device.
#[derive(Default)]
pub struct DebugExit;

impl BusDevice for DebugExit {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&self, _offset: u64, data: &[u8]) -> Option<VmRequest> {
        // QEMU's device has a 1-byte port; wider writes keep their low byte, as there.
        data.first().map(|&v| VmRequest::Exit(v))
    }
}
