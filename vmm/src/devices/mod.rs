//! Device models on the port-I/O and MMIO buses. Devices know nothing of KVM: they see
//! reads and writes at an offset, and may ask the VM for something (end, reset) by
//! returning a [`VmRequest`].

pub mod bus;
pub mod console;
pub mod debug_exit;
pub mod doorbell;
pub mod hypercall;
pub mod i8042;
pub mod rom;
pub mod serial;

pub use bus::{Bus, BusDevice};

/// What a device can ask of the VM as a result of a guest access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmRequest {
    /// The guest wrote `status` to the exit port.
    Exit(u8),
    /// The guest asked for a reset (i8042 pulse).
    Reset,
}
