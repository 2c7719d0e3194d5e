//! The complete state of a VM, minus its memory: every vCPU (registers, special
//! registers, XSAVE and XCRs, debug registers, MSRs from KVM's index list, local APIC, vCPU
//! events, MP state), the VM (PIC, IOAPIC, PIT, KVM clock), and the devices. Saved and
//! restored in the order KVM needs (Firecracker's notes): MP state first and vCPU events
//! last when saving; CPUID, registers before events, special registers before the LAPIC,
//! the LAPIC before MSRs (TSC deadline) when restoring.

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_pit_state2, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// State errors: which piece failed and the KVM error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot {what}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {id}: KVM restored {restored} of {total} MSRs (first refused: {index:#x})")]
    Msrs { id: u32, restored: usize, total: usize, index: u32 },
    #[error("Malformed machine state")]
    Decode(#[source] postcard::Error),
    #[error("Cannot encode the machine state")]
    Encode(#[source] postcard::Error),
    #[error("Malformed machine state: {0} bytes after its end")]
    Trailing(usize),
    #[error("Machine state checksum mismatch: received {received:#x}, the payload says {sent:#x}")]
    Checksum { received: u32, sent: u32 },
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}

/// One vCPU.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u32,
    #[serde(with = "trimmed")]
    pub mp_state: kvm_mp_state,
    #[serde(with = "trimmed")]
    pub regs: kvm_regs,
    #[serde(with = "trimmed")]
    pub sregs: kvm_sregs,
    #[serde(with = "trimmed")]
    pub xsave: kvm_xsave,
    #[serde(with = "trimmed")]
    pub xcrs: kvm_xcrs,
    #[serde(with = "trimmed")]
    pub debugregs: kvm_debugregs,
    #[serde(with = "trimmed")]
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<(u32, u64)>,
    #[serde(with = "trimmed")]
    pub events: kvm_vcpu_events,
}

/// KVM's structures on the wire: their bytes without the trailing zeros, which the
/// destination puts back (more bytes than the structure holds are refused). Most of the
/// state is zeros at the end: the XSAVE area past the components a guest uses (4 KiB of
/// which the test guest's first 576 bytes hold anything), the 512-byte union of each
/// irqchip (a PIC's state is 16 bytes), the XCR array. The test guest's State went from
/// 8.1 to 2.5 KB (no change in its downtime could be told from the noise, over loopback or
/// the emulated 1 Gbit/s link; a slower link gains more).
mod trimmed {
    use serde::de::Error as _;
    use serde::{Deserializer, Serializer};
    use zerocopy::{FromBytes, Immutable, IntoBytes};

    pub fn serialize<T: IntoBytes + Immutable, S: Serializer>(value: &T, serializer: S) -> Result<S::Ok, S::Error> {
        let bytes = value.as_bytes();
        let len = bytes.iter().rposition(|&b| b != 0).map_or(0, |last| last + 1);
        serializer.serialize_bytes(&bytes[..len])
    }

    pub fn deserialize<'de, T: FromBytes + IntoBytes, D: Deserializer<'de>>(deserializer: D) -> Result<T, D::Error> {
        let bytes: &[u8] = serde::Deserialize::deserialize(deserializer)?;
        let mut value = T::new_zeroed();
        let whole = value.as_mut_bytes();
        let Some(head) = whole.get_mut(..bytes.len()) else {
            return Err(D::Error::invalid_length(bytes.len(), &"at most the structure's size"));
        };
        head.copy_from_slice(bytes);
        Ok(value)
    }
}

/// The MSRs KVM says it can save, read in batches; an index KVM refuses to read is
/// skipped (KVM_GET_MSRS stops at the first failure and returns how many it read).
fn save_msrs(list: &[u32], vcpu: &VcpuFd) -> Result<Vec<(u32, u64)>, Error> {
    let mut indexes: &[u32] = list;
    let mut saved = Vec::with_capacity(indexes.len());
    while !indexes.is_empty() {
        let entries: Vec<kvm_msr_entry> =
            indexes.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|_| Error::Kvm { what: "build an MSR list", source: kvm_ioctls::Error::new(libc::EINVAL) })?;
        let read = vcpu.get_msrs(&mut msrs).map_err(kvm("read MSRs"))?;
        saved.extend(msrs.as_slice()[..read].iter().map(|e| (e.index, e.data)));
        indexes = &indexes[(read + 1).min(indexes.len())..];
    }
    Ok(saved)
}

/// Registers, special registers and events as a KVM_RUN with `immediate_exit` leaves them
/// in `kvm_run` (KVM_CAP_SYNC_REGS): one ioctl instead of three (9 us each on the PVM test
/// host). That KVM_RUN also completes an in-flight port or MMIO access and enters nothing;
/// it comes after the MP state was read, as the ioctls did (reading the MP state may take
/// pending INIT/SIPI events, which change the registers).
fn synced_registers(vcpu: &mut VcpuFd) -> Result<kvm_bindings::kvm_sync_regs, Error> {
    use kvm_bindings::{KVM_SYNC_X86_EVENTS, KVM_SYNC_X86_REGS, KVM_SYNC_X86_SREGS};
    let before = vcpu.get_kvm_run().kvm_valid_regs;
    vcpu.get_kvm_run().kvm_valid_regs =
        before | u64::from(KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS | KVM_SYNC_X86_EVENTS);
    vcpu.set_kvm_immediate_exit(1);
    let ran = vcpu.run().map(|_| ()).map_err(|e| e.errno());
    vcpu.set_kvm_immediate_exit(0);
    // Back to what it was (the audit keeps its own): every exit would pay the copy.
    vcpu.get_kvm_run().kvm_valid_regs = before;
    match ran {
        // EINTR: it entered nothing. An exit (a string I/O whose completion asks for its
        // next step) leaves the state where the ioctls would have read it; KVM stores the
        // registers on that way out too.
        Err(libc::EINTR) | Ok(()) => Ok(vcpu.sync_regs()),
        Err(errno) => Err(Error::Kvm { what: "hand back the registers", source: kvm_ioctls::Error::new(errno) }),
    }
}

/// KVM's list of MSRs a VMM should save and restore.
pub fn msr_indexes(k: &Kvm) -> Result<Vec<u32>, Error> {
    Ok(k.get_msr_index_list().map_err(kvm("read KVM's MSR index list"))?.as_slice().to_vec())
}

impl VcpuState {
    /// Saves vCPU `id`, which must not be running. `synced`: the host has
    /// KVM_CAP_SYNC_REGS for registers, special registers and events, and a KVM_RUN that
    /// enters nothing (`immediate_exit`) may hand them back in `kvm_run` (see
    /// `synced_registers`); else three ioctls read them.
    pub fn save(msr_indexes: &[u32], vcpu: &mut VcpuFd, id: u32, synced: bool) -> Result<VcpuState, Error> {
        let mp_state = vcpu.get_mp_state().map_err(kvm("read the MP state"))?;
        let synced = if synced { Some(synced_registers(vcpu)?) } else { None };
        let (regs, sregs) = match &synced {
            Some(s) => (s.regs, s.sregs),
            None => (
                vcpu.get_regs().map_err(kvm("read registers"))?,
                vcpu.get_sregs().map_err(kvm("read special registers"))?,
            ),
        };
        let xsave = vcpu.get_xsave().map_err(kvm("read XSAVE state"))?;
        let xcrs = vcpu.get_xcrs().map_err(kvm("read XCRs"))?;
        let debugregs = vcpu.get_debug_regs().map_err(kvm("read debug registers"))?;
        let lapic = vcpu.get_lapic().map_err(kvm("read the local APIC"))?;
        let msrs = save_msrs(msr_indexes, vcpu)?;
        let events = match synced {
            Some(s) => s.events,
            None => vcpu.get_vcpu_events().map_err(kvm("read vCPU events"))?,
        };
        Ok(VcpuState { id, mp_state, regs, sregs, xsave, xcrs, debugregs, lapic, msrs, events })
    }

    /// Restores into a vCPU created with the same CPUID. `fresh`: what that vCPU held when
    /// it was made, if it was read then and nothing was set since; the parts the saved
    /// state holds unchanged are not set again.
    pub fn restore(&self, vcpu: &VcpuFd, fresh: Option<&FreshParts>) -> Result<(), Error> {
        let unchanged = fresh.map(|f| f.unchanged_in(self)).unwrap_or_default();
        log::debug!("restore: vCPU {} holds these parts as made: {unchanged:?}", self.id);
        if !unchanged.mp_state {
            vcpu.set_mp_state(self.mp_state).map_err(kvm("restore the MP state"))?;
        }
        vcpu.set_regs(&self.regs).map_err(kvm("restore registers"))?;
        vcpu.set_sregs(&self.sregs).map_err(kvm("restore special registers"))?;
        if !unchanged.xsave {
            // SAFETY: restores a kvm_xsave saved by `save` with the same size.
            unsafe { vcpu.set_xsave(&self.xsave) }.map_err(kvm("restore XSAVE state"))?;
        }
        if !unchanged.xcrs {
            vcpu.set_xcrs(&self.xcrs).map_err(kvm("restore XCRs"))?;
        }
        if !unchanged.debugregs {
            vcpu.set_debug_regs(&self.debugregs).map_err(kvm("restore debug registers"))?;
        }
        vcpu.set_lapic(&self.lapic).map_err(kvm("restore the local APIC"))?;
        let entries: Vec<kvm_msr_entry> =
            self.msrs.iter().map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() }).collect();
        for chunk in entries.chunks(64) {
            let msrs = Msrs::from_entries(chunk)
                .map_err(|_| Error::Kvm { what: "build an MSR list", source: kvm_ioctls::Error::new(libc::EINVAL) })?;
            let set = vcpu.set_msrs(&msrs).map_err(kvm("restore MSRs"))?;
            if set != chunk.len() {
                return Err(Error::Msrs { id: self.id, restored: set, total: chunk.len(), index: chunk[set].index });
            }
        }
        vcpu.set_vcpu_events(&self.events).map_err(kvm("restore vCPU events"))?;
        Ok(())
    }
}

/// The parts of a vCPU's state that a guest seldom changes, as a freshly made vCPU holds
/// them. The destination reads them once, long before the pause (one ioctl each), and a
/// restore skips setting a part the saved state holds unchanged: setting a value a vCPU
/// already holds changes nothing, and each set is an ioctl inside the downtime (9-13 us on
/// the PVM test host). Registers, special registers, the LAPIC, MSRs and events are always
/// set.
#[derive(Debug)]
pub struct FreshParts {
    mp_state: kvm_mp_state,
    xsave: Box<kvm_xsave>,
    xcrs: kvm_xcrs,
    debugregs: kvm_debugregs,
}

/// Which parts a restore may skip (see [`FreshParts`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Unchanged {
    pub mp_state: bool,
    pub xsave: bool,
    pub xcrs: bool,
    pub debugregs: bool,
}

impl FreshParts {
    /// Reads them from a vCPU nothing has run on or been restored into yet.
    pub fn read(vcpu: &VcpuFd) -> Result<FreshParts, Error> {
        Ok(FreshParts {
            mp_state: vcpu.get_mp_state().map_err(kvm("read the MP state"))?,
            xsave: Box::new(vcpu.get_xsave().map_err(kvm("read XSAVE state"))?),
            xcrs: vcpu.get_xcrs().map_err(kvm("read XCRs"))?,
            debugregs: vcpu.get_debug_regs().map_err(kvm("read debug registers"))?,
        })
    }

    /// The parts `saved` holds as this fresh vCPU does.
    pub fn unchanged_in(&self, saved: &VcpuState) -> Unchanged {
        Unchanged {
            mp_state: self.mp_state == saved.mp_state,
            xsave: self.xsave.region == saved.xsave.region,
            xcrs: self.xcrs == saved.xcrs,
            debugregs: self.debugregs == saved.debugregs,
        }
    }
}

/// The VM-level in-kernel devices and clock.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    #[serde(with = "trimmed")]
    pub pic_master: kvm_irqchip,
    #[serde(with = "trimmed")]
    pub pic_slave: kvm_irqchip,
    #[serde(with = "trimmed")]
    pub ioapic: kvm_irqchip,
    #[serde(with = "trimmed")]
    pub pit: kvm_pit_state2,
    #[serde(with = "trimmed")]
    pub clock: kvm_clock_data,
}

fn irqchip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, Error> {
    let mut chip = kvm_irqchip { chip_id, ..Default::default() };
    vm.get_irqchip(&mut chip).map_err(kvm("read the irqchip"))?;
    Ok(chip)
}

impl VmState {
    pub fn save(vm: &VmFd) -> Result<VmState, Error> {
        Ok(VmState {
            pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
            pit: vm.get_pit2().map_err(kvm("read the PIT"))?,
            clock: vm.get_clock().map_err(kvm("read the KVM clock"))?,
        })
    }

    pub fn restore(&self, vm: &VmFd) -> Result<(), Error> {
        for chip in [&self.pic_master, &self.pic_slave, &self.ioapic] {
            vm.set_irqchip(chip).map_err(kvm("restore the irqchip"))?;
        }
        vm.set_pit2(&self.pit).map_err(kvm("restore the PIT"))?;
        // Only the clock value travels; flags describing the source host's TSC do not apply.
        let clock = kvm_clock_data { clock: self.clock.clock, ..Default::default() };
        vm.set_clock(&clock).map_err(kvm("restore the KVM clock"))?;
        Ok(())
    }
}

/// Popek's own devices.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DeviceState {
    pub serial: SerialRegisters,
    pub msr_scratch: Vec<u64>,
    pub generation: u64,
    pub generation_gpa: Option<u64>,
    pub doorbell_rings: u64,
    /// The guest's free-page hints as runs `(first frame, frames)`.
    pub free_pages: Vec<(u64, u64)>,
}

/// The UART's registers (vm-superio's `SerialState`, which has no serde).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SerialRegisters {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

/// Everything but memory.
#[derive(Debug, Serialize, Deserialize)]
pub struct MachineState {
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub devices: DeviceState,
}

impl MachineState {
    /// The State payload: the CRC32 of the body (u32, little-endian), then the body in
    /// postcard (serde in declaration order, integers as varints, KVM's structures as
    /// length-prefixed raw bytes without their trailing zeros). The destination restores a State as soon as it comes,
    /// before the source's Complete, so the payload carries its own checksum. JSON
    /// spelled the XSAVE area and the LAPIC page as arrays of numbers, 25 KB that took
    /// the destination ~0.15 ms to parse inside the downtime; this is half the size and
    /// parses in a fifth of the time.
    pub fn encode(&self) -> Result<Vec<u8>, Error> {
        let body = postcard::to_allocvec(self).map_err(Error::Encode)?;
        let mut payload = Vec::with_capacity(4 + body.len());
        payload.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        payload.extend_from_slice(&body);
        Ok(payload)
    }

    /// Parses a State payload: its checksum first, then the body.
    pub fn decode(payload: &[u8]) -> Result<MachineState, Error> {
        let Some((sent, body)) = payload.split_first_chunk::<4>() else {
            return Err(Error::Decode(postcard::Error::DeserializeUnexpectedEnd));
        };
        let (sent, received) = (u32::from_le_bytes(*sent), crc32fast::hash(body));
        if sent != received {
            return Err(Error::Checksum { received, sent });
        }
        Self::from_body(body)
    }

    /// Parses a State body, all of it (trailing bytes are an error: a truncated or padded
    /// body is not the state the source sent).
    pub fn from_body(body: &[u8]) -> Result<MachineState, Error> {
        let (machine, rest) = postcard::take_from_bytes(body).map_err(Error::Decode)?;
        if !rest.is_empty() {
            return Err(Error::Trailing(rest.len()));
        }
        Ok(machine)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One KVM structure the way the State carries it.
    #[derive(Debug, Serialize, Deserialize)]
    struct Carried {
        #[serde(with = "trimmed")]
        regs: kvm_debugregs,
    }

    #[test]
    fn kvm_structures_travel_without_their_trailing_zeros() {
        let mut regs = kvm_debugregs { dr6: 0xffff_0ff0, ..Default::default() };
        let short = postcard::to_allocvec(&Carried { regs }).expect("encode");
        // db[4], then dr6's four low bytes that are not zero: a length byte and 36 bytes.
        assert_eq!(short.len(), 1 + 32 + 4);
        let back: Carried = postcard::from_bytes(&short).expect("decode");
        assert_eq!(back.regs, regs);
        regs.reserved[8] = 1 << 56; // the last byte
        let whole = postcard::to_allocvec(&Carried { regs }).expect("encode");
        assert_eq!(whole.len(), 2 + std::mem::size_of::<kvm_debugregs>());
        assert_eq!(postcard::from_bytes::<Carried>(&whole).expect("decode").regs, regs);
        // One byte more than the structure holds is refused, not cut.
        let forged = postcard::to_allocvec(&vec![1u8; std::mem::size_of::<kvm_debugregs>() + 1]).expect("encode");
        assert!(postcard::from_bytes::<Carried>(&forged).is_err());
    }
}
