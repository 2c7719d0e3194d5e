//! A bus maps address ranges (ports or guest-physical addresses) to devices. Built once
//! before the vCPUs start, then shared read-only. Devices take `&self` and lock what they
//! need inside, so a slow call on one device (a hypercall that sleeps) never blocks
//! another vCPU's access to a different device.

use super::VmRequest;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

/// A device on a bus. `offset` is relative to the base the device was inserted at.
pub trait BusDevice: Send + Sync {
    /// Fills `data` with the value at `offset`.
    fn read(&self, offset: u64, data: &mut [u8]);
    /// Handles a write; may ask the VM for something.
    fn write(&self, offset: u64, data: &[u8]) -> Option<VmRequest>;
}

/// Bus set-up errors (programming errors in the VM's device wiring, reported not panicked).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Two devices claim overlapping ranges.
    #[error("Device range {base:#x}+{len:#x} overlaps another device")]
    Overlap { base: u64, len: u64 },
    /// Empty range.
    #[error("Device range at {0:#x} is empty")]
    Empty(u64),
}

struct Entry {
    len: u64,
    device: Arc<dyn BusDevice>,
}

/// Accesses that hit no device, per address: counted and logged once each. At most
/// [`MAX_UNCLAIMED`] addresses are kept, so a guest probing random addresses cannot grow
/// the VMM; the rest are counted together.
#[derive(Default)]
struct Unclaimed {
    counts: HashMap<u64, u64>,
    overflow: u64,
}

/// Distinct unclaimed addresses a bus remembers.
pub const MAX_UNCLAIMED: usize = 4096;

/// One address space of devices.
pub struct Bus {
    name: &'static str,
    /// What an unclaimed read returns (0xff for ports, like a floating ISA bus; 0 for MMIO).
    unclaimed_value: u8,
    devices: BTreeMap<u64, Entry>,
    unclaimed: Mutex<Unclaimed>,
}

impl Bus {
    /// An empty bus; `name` appears in log lines.
    pub fn new(name: &'static str, unclaimed_value: u8) -> Self {
        Bus { name, unclaimed_value, devices: BTreeMap::new(), unclaimed: Mutex::default() }
    }

    /// Puts `device` at `[base, base + len)`.
    pub fn insert(&mut self, base: u64, len: u64, device: Arc<dyn BusDevice>) -> Result<(), Error> {
        if len == 0 {
            return Err(Error::Empty(base));
        }
        let end = base.checked_add(len).ok_or(Error::Overlap { base, len })?;
        let before = self.devices.range(..end).next_back();
        if let Some((&other, entry)) = before {
            if other + entry.len > base {
                return Err(Error::Overlap { base, len });
            }
        }
        self.devices.insert(base, Entry { len, device });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &Entry)> {
        let (&base, entry) = self.devices.range(..=addr).next_back()?;
        (addr - base < entry.len).then_some((addr - base, entry))
    }

    /// Dispatches a read; unclaimed reads return the bus's floating value.
    pub fn read(&self, addr: u64, data: &mut [u8]) {
        match self.find(addr) {
            Some((offset, entry)) => entry.device.read(offset, data),
            None => {
                self.note_unclaimed(addr, "read");
                data.fill(self.unclaimed_value);
            }
        }
    }

    /// Dispatches a write; unclaimed writes are dropped.
    pub fn write(&self, addr: u64, data: &[u8]) -> Option<VmRequest> {
        match self.find(addr) {
            Some((offset, entry)) => entry.device.write(offset, data),
            None => {
                self.note_unclaimed(addr, "write");
                None
            }
        }
    }

    fn note_unclaimed(&self, addr: u64, what: &str) {
        let mut unclaimed = self.unclaimed.lock().unwrap_or_else(|p| p.into_inner());
        if !unclaimed.counts.contains_key(&addr) && unclaimed.counts.len() >= MAX_UNCLAIMED {
            unclaimed.overflow += 1;
            return;
        }
        let count = unclaimed.counts.entry(addr).or_insert(0);
        *count += 1;
        if *count == 1 {
            log::warn!("{} {what} at {addr:#x} hits no device (ignored; logged once)", self.name);
        }
    }

    /// Unclaimed accesses so far, by address.
    pub fn unclaimed_counts(&self) -> HashMap<u64, u64> {
        self.unclaimed.lock().unwrap_or_else(|p| p.into_inner()).counts.clone()
    }

    /// Unclaimed accesses to addresses beyond the first [`MAX_UNCLAIMED`].
    pub fn unclaimed_overflow(&self) -> u64 {
        self.unclaimed.lock().unwrap_or_else(|p| p.into_inner()).overflow
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&self, offset: u64, data: &mut [u8]) {
            data.fill(self.0 + offset as u8);
        }
        fn write(&self, _: u64, data: &[u8]) -> Option<VmRequest> {
            Some(VmRequest::Exit(data[0]))
        }
    }

    #[test]
    fn dispatch_and_unclaimed() {
        let mut bus = Bus::new("test", 0xff);
        bus.insert(0x10, 4, Arc::new(Echo(1))).unwrap();
        assert!(bus.insert(0x12, 4, Arc::new(Echo(2))).is_err());
        assert!(bus.insert(0x0e, 4, Arc::new(Echo(2))).is_err());
        bus.insert(0x14, 4, Arc::new(Echo(9))).unwrap();
        let mut data = [0u8; 1];
        bus.read(0x13, &mut data);
        assert_eq!(data, [4]);
        bus.read(0x14, &mut data);
        assert_eq!(data, [9]);
        bus.read(0x18, &mut data);
        assert_eq!(data, [0xff]);
        bus.read(0x18, &mut data);
        assert_eq!(bus.write(0x11, &[7]), Some(VmRequest::Exit(7)));
        assert_eq!(bus.write(0x40, &[7]), None);
        let counts = bus.unclaimed_counts();
        assert_eq!(counts.get(&0x18), Some(&2));
        assert_eq!(counts.get(&0x40), Some(&1));
        for addr in 0..(MAX_UNCLAIMED as u64 + 5) {
            bus.read(0x1000 + addr, &mut data);
        }
        assert_eq!(bus.unclaimed_counts().len(), MAX_UNCLAIMED);
        assert_eq!(bus.unclaimed_overflow(), 5 + 2);
    }
}
