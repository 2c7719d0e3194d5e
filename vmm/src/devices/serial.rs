//! COM1: a 16550A UART from `vm-superio`, with output to the console (stdout) and input
//! fed from stdin by a thread of its own. Its interrupt line is an eventfd wired to GSI 4.

use super::console::Console;
use super::{BusDevice, VmRequest};
use std::io::Read;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// The UART's interrupt: an eventfd the VM registers as an irqfd.
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

type Uart = Serial<EventFdTrigger, NoEvents, Console>;

/// The UART as a bus device.
pub struct SerialDevice {
    uart: Mutex<Uart>,
}

impl SerialDevice {
    /// A UART writing to `console` and raising `interrupt`.
    pub fn new(interrupt: EventFd, console: Console) -> Self {
        SerialDevice { uart: Mutex::new(Serial::new(EventFdTrigger(interrupt), console)) }
    }

    fn uart(&self) -> MutexGuard<'_, Uart> {
        // UART state is plain data: a panic elsewhere while holding the lock leaves it usable.
        self.uart.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The UART's registers, for migration.
    pub fn registers(&self) -> crate::migration::state::SerialRegisters {
        let st = self.uart().state();
        crate::migration::state::SerialRegisters {
            baud_divisor_low: st.baud_divisor_low,
            baud_divisor_high: st.baud_divisor_high,
            interrupt_enable: st.interrupt_enable,
            interrupt_identification: st.interrupt_identification,
            line_control: st.line_control,
            line_status: st.line_status,
            modem_control: st.modem_control,
            modem_status: st.modem_status,
            scratch: st.scratch,
            in_buffer: st.in_buffer,
        }
    }

    /// Takes over migrated UART registers (same interrupt line and console).
    pub fn restore_registers(&self, r: &crate::migration::state::SerialRegisters) {
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: r.baud_divisor_low,
            baud_divisor_high: r.baud_divisor_high,
            interrupt_enable: r.interrupt_enable,
            interrupt_identification: r.interrupt_identification,
            line_control: r.line_control,
            line_status: r.line_status,
            modem_control: r.modem_control,
            modem_status: r.modem_status,
            scratch: r.scratch,
            in_buffer: r.in_buffer.clone(),
        };
        let mut uart = self.uart();
        let Ok(trigger) = uart.interrupt_evt().0.try_clone() else {
            log::warn!("cannot restore the UART: its eventfd cannot be duplicated");
            return;
        };
        let console = uart.writer().clone();
        match Serial::from_state(&state, EventFdTrigger(trigger), NoEvents, console) {
            Ok(restored) => *uart = restored,
            Err(e) => log::warn!("cannot restore the UART: {e:?}"),
        }
    }

    /// Queues input bytes for the guest; returns how many fit in the receive FIFO.
    pub fn enqueue_input(&self, bytes: &[u8]) -> usize {
        self.uart().enqueue_raw_bytes(bytes).unwrap_or(0)
    }
}

impl BusDevice for SerialDevice {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let value = u8::try_from(offset).map(|o| self.uart().read(o)).unwrap_or(0xff);
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&self, offset: u64, data: &[u8]) -> Option<VmRequest> {
        if let (Ok(offset), Some(&value)) = (u8::try_from(offset), data.first()) {
            if let Err(e) = self.uart().write(offset, value) {
                // A closed stdout must not stop the guest.
                log::debug!("serial output failed: {e:?}");
            }
        }
        None
    }
}

/// Feeds `input` to the UART until it ends. The receive FIFO is small (64 bytes): when it
/// is full the thread waits for the guest to drain it rather than dropping input.
pub fn spawn_input_thread<R: Read + Send + 'static>(
    serial: Arc<SerialDevice>,
    mut input: R,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("serial-input".into()).spawn(move || {
        crate::seccomp::enter_or_exit(crate::seccomp::ThreadKind::Api);
        let mut buffer = [0u8; 256];
        loop {
            let n = match input.read(&mut buffer) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let mut pending = &buffer[..n];
            while !pending.is_empty() {
                let taken = serial.enqueue_input(pending);
                pending = &pending[taken..];
                if taken == 0 {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_and_input() {
        let out = Shared::default();
        let uart = SerialDevice::new(EventFd::new(0).unwrap(), Console::new(Box::new(out.clone())));
        for b in b"hi" {
            uart.write(0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi");
        assert_eq!(uart.enqueue_input(b"x"), 1);
        let mut lsr = [0u8];
        uart.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut data = [0u8];
        uart.read(0, &mut data);
        assert_eq!(data[0], b'x');
    }
}
