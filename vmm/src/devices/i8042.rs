//! Just enough of the i8042 keyboard controller for a reset request (command 0xfe on port
//! 0x64), the way PC guests and Linux's `reboot=k` ask for one. No keyboard.

use super::{BusDevice, VmRequest};
use popek_abi::ports;

/// The i8042 device, inserted at port 0x60 with a length of 5 (0x60..=0x64).
#[derive(Default)]
pub struct I8042;

/// Offset of the command/status port from the data port.
const COMMAND_OFFSET: u64 = (ports::I8042_COMMAND - ports::I8042_DATA) as u64;

impl BusDevice for I8042 {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        // Status: output buffer empty, input buffer empty; data: nothing pending.
        data.fill(0);
    }

    fn write(&self, offset: u64, data: &[u8]) -> Option<VmRequest> {
        (offset == COMMAND_OFFSET && data.first() == Some(&ports::I8042_CMD_RESET)).then_some(VmRequest::Reset)
    }
}
