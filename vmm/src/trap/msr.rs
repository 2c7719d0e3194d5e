//! MSRs trapped to and emulated by the VMM (KVM_CAP_X86_USER_SPACE_MSR + an MSR filter).
//!
//! Popek's MSR block at `0x50500000..0x50500010` always exits to user space: index 0 reads
//! the identity "POPEK\0\0\0", index 1 the ABI version (both read-only: writes get #GP),
//! indexes 2..16 are scratch registers the guest can read and write. Accesses to MSRs KVM
//! itself does not know (or refuses) also exit, and the `--msr-policy` decides: inject #GP
//! (the default, what hardware does) or read as zero and ignore writes.

use std::sync::Mutex;

/// First MSR of Popek's block.
pub const BLOCK_BASE: u32 = 0x5050_0000;
/// MSRs in the block.
pub const BLOCK_LEN: u32 = 16;
/// Value of the identity MSR.
pub const IDENTITY: u64 = u64::from_le_bytes(*b"POPEK\0\0\0");

/// What to do with MSRs that neither KVM nor Popek implement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnknownMsrPolicy {
    /// Inject #GP, as hardware does for an unimplemented MSR.
    #[default]
    Gp,
    /// Reads return 0, writes are ignored.
    Zero,
}

/// The VMM's MSR emulation.
pub struct MsrEmulation {
    policy: UnknownMsrPolicy,
    scratch: Mutex<[u64; BLOCK_LEN as usize]>,
}

/// An emulated access the guest must see fail: KVM injects #GP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("MSR access refused (#GP)")]
pub struct InjectGp;

/// Result of an emulated access.
pub type MsrResult<T> = Result<T, InjectGp>;

impl MsrEmulation {
    pub fn new(policy: UnknownMsrPolicy) -> Self {
        MsrEmulation { policy, scratch: Mutex::new([0; BLOCK_LEN as usize]) }
    }

    fn block_index(index: u32) -> Option<usize> {
        index.checked_sub(BLOCK_BASE).filter(|&i| i < BLOCK_LEN).map(|i| i as usize)
    }

    /// The scratch registers, for migration.
    pub fn scratch(&self) -> Vec<u64> {
        self.scratch.lock().unwrap_or_else(|p| p.into_inner()).to_vec()
    }

    /// Takes over migrated scratch registers.
    pub fn set_scratch(&self, values: &[u64]) {
        let mut scratch = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        for (slot, v) in scratch.iter_mut().zip(values) {
            *slot = *v;
        }
    }

    /// Emulates RDMSR.
    pub fn read(&self, index: u32) -> MsrResult<u64> {
        match Self::block_index(index) {
            Some(0) => Ok(IDENTITY),
            Some(1) => Ok(popek_abi::ABI_VERSION.into()),
            Some(i) => Ok(self.scratch.lock().unwrap_or_else(|p| p.into_inner())[i]),
            None => match self.policy {
                UnknownMsrPolicy::Gp => Err(InjectGp),
                UnknownMsrPolicy::Zero => Ok(0),
            },
        }
    }

    /// Emulates WRMSR.
    pub fn write(&self, index: u32, value: u64) -> MsrResult<()> {
        match Self::block_index(index) {
            Some(0 | 1) => Err(InjectGp),
            Some(i) => {
                self.scratch.lock().unwrap_or_else(|p| p.into_inner())[i] = value;
                Ok(())
            }
            None => match self.policy {
                UnknownMsrPolicy::Gp => Err(InjectGp),
                UnknownMsrPolicy::Zero => Ok(()),
            },
        }
    }
}

/// Asks KVM to send Popek's block, and MSRs it does not handle, to user space.
pub fn enable(vm: &kvm_ioctls::VmFd) -> Result<(), kvm_ioctls::Error> {
    use kvm_bindings::{
        kvm_enable_cap, KVM_CAP_X86_USER_SPACE_MSR, KVM_MSR_EXIT_REASON_FILTER, KVM_MSR_EXIT_REASON_INVAL,
        KVM_MSR_EXIT_REASON_UNKNOWN,
    };
    use kvm_ioctls::{MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags};
    let mut cap = kvm_enable_cap { cap: KVM_CAP_X86_USER_SPACE_MSR, ..Default::default() };
    cap.args[0] = u64::from(KVM_MSR_EXIT_REASON_FILTER | KVM_MSR_EXIT_REASON_UNKNOWN | KVM_MSR_EXIT_REASON_INVAL);
    vm.enable_cap(&cap)?;
    // A zero bit denies the access in KVM, which (with the FILTER exit reason) sends it to us.
    let bitmap = [0u8; (BLOCK_LEN as usize).div_ceil(8)];
    let range = MsrFilterRange {
        flags: MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE,
        base: BLOCK_BASE,
        msr_count: BLOCK_LEN,
        bitmap: &bitmap,
    };
    vm.set_msr_filter(MsrFilterDefaultAction::ALLOW, &[range])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_and_policy() {
        let gp = MsrEmulation::new(UnknownMsrPolicy::Gp);
        assert_eq!(gp.read(BLOCK_BASE), Ok(IDENTITY));
        assert_eq!(gp.write(BLOCK_BASE, 1), Err(InjectGp));
        assert_eq!(gp.write(BLOCK_BASE + 5, 42), Ok(()));
        assert_eq!(gp.read(BLOCK_BASE + 5), Ok(42));
        assert_eq!(gp.read(BLOCK_BASE + BLOCK_LEN), Err(InjectGp));
        assert_eq!(gp.read(0x1234_5678), Err(InjectGp));
        let zero = MsrEmulation::new(UnknownMsrPolicy::Zero);
        assert_eq!(zero.read(0x1234_5678), Ok(0));
        assert_eq!(zero.write(0x1234_5678, 7), Ok(()));
        assert_eq!(zero.write(BLOCK_BASE + 1, 7), Err(InjectGp), "read-only stays read-only");
    }
}
