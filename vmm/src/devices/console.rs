//! The guest console's output, shared by the UART and the hypercall device so that bytes
//! from both arrive in the order the guest sent them. Flushed per write: a reader sees the
//! guest's first byte the moment it is sent (the boot benchmark measures exactly that).

use std::io::Write;
use std::sync::{Arc, Mutex};

/// A cloneable handle on the console output.
#[derive(Clone)]
pub struct Console(Arc<Mutex<Box<dyn Write + Send>>>);

impl Console {
    /// A console writing to `out` (stdout in `popek run`).
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Console(Arc::new(Mutex::new(out)))
    }

    /// Writes all of `bytes` and flushes. A closed output is the user's choice, not the
    /// guest's problem: errors are returned for the caller to count or log, never fatal.
    pub fn write_bytes(&self, bytes: &[u8]) -> std::io::Result<()> {
        let mut out = self.0.lock().unwrap_or_else(|p| p.into_inner());
        out.write_all(bytes)?;
        out.flush()
    }
}

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write_bytes(buf).map(|()| buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
