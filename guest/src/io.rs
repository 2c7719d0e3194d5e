//! Port I/O and the console. Usable from ring 0 and from ring 3 (programs run with IOPL 3).

use core::arch::asm;
use core::fmt;
use popek_abi::ports;

/// Writes one byte to an I/O port.
#[inline(always)]
pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O has no memory effects visible to Rust.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags)) }
}

/// Writes four bytes to an I/O port.
#[inline(always)]
pub fn outl(port: u16, value: u32) {
    // SAFETY: port I/O has no memory effects visible to Rust.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags)) }
}

/// Reads one byte from an I/O port.
#[inline(always)]
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: port I/O has no memory effects visible to Rust.
    unsafe { asm!("in al, dx", out("al") value, in("dx") port, options(nomem, nostack, preserves_flags)) }
    value
}

const LINE_STATUS: u16 = ports::SERIAL_COM1 + 5;
const LSR_DATA_READY: u8 = 0x01;

/// Puts the UART in 8N1 with interrupts off: the two writes a real 16550 needs to be usable,
/// kept that few because each one is a VM exit.
pub fn serial_init() {
    outb(ports::SERIAL_COM1 + 1, 0x00);
    outb(ports::SERIAL_COM1 + 3, 0x03);
}

/// Writes bytes to the console: through the hypercall device when there is one (one exit
/// per write), else to COM1 (one exit per byte).
pub fn write_bytes(bytes: &[u8]) {
    if crate::hypercall::console_available() {
        crate::hypercall::console_write(bytes);
    } else {
        serial_write(bytes);
    }
}

/// Writes bytes to COM1. No wait for "transmitter empty": emulated UARTs (Popek's, QEMU's)
/// take a byte at every write, and polling would double the exits.
pub fn serial_write(bytes: &[u8]) {
    for &b in bytes {
        outb(ports::SERIAL_COM1, b);
    }
}

/// Blocks until the UART has a byte and returns it.
pub fn read_byte() -> u8 {
    while inb(LINE_STATUS) & LSR_DATA_READY == 0 {
        core::hint::spin_loop();
    }
    inb(ports::SERIAL_COM1)
}

/// Ends the VM through the QEMU-compatible exit port.
pub fn exit(status: u8) -> ! {
    outb(ports::DEBUG_EXIT, status);
    // Not reached under Popek or QEMU with isa-debug-exit; without that device, park.
    loop {
        core::hint::spin_loop();
    }
}

/// `core::fmt` sink for the console.
pub struct Console;

impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        write_bytes(s.as_bytes());
        Ok(())
    }
}

/// `print!` to the serial console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {{
        let _ = core::fmt::Write::write_fmt(&mut $crate::io::Console, format_args!($($arg)*));
    }};
}

/// `println!` to the serial console.
#[macro_export]
macro_rules! println {
    () => { $crate::io::write_bytes(b"\n") };
    ($($arg:tt)*) => {{
        $crate::print!($($arg)*);
        $crate::io::write_bytes(b"\n");
    }};
}
