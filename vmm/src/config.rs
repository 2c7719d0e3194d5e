//! What a VM is made of, checked once, before anything touches KVM.

use popek_abi::layout;
use std::path::PathBuf;

/// Configuration errors: the user asked for something Popek cannot build.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not a size.
    #[error("'{0}' is not a memory size (examples: 256M, 1G, 65536K; a bare number is MiB)")]
    NotASize(String),
    /// Below the minimum.
    #[error("memory size {size} bytes is too small: the minimum is {min} MiB")]
    MemoryTooSmall { size: u64, min: u64 },
    /// Above the maximum.
    #[error("memory size {size} bytes is too large: the maximum is {max} GiB")]
    MemoryTooLarge { size: u64, max: u64 },
    /// Not page-granular.
    #[error("memory size {0} bytes is not a multiple of 4 KiB")]
    MemoryNotPageAligned(u64),
    /// vCPU count out of range.
    #[error("--vcpus must be between 1 and {max}, not {given}")]
    VcpuCount { given: u32, max: u32 },
    /// Command line too long for the boot protocol area.
    #[error("the kernel command line is {len} bytes; at most {max} fit")]
    CmdlineTooLong { len: usize, max: usize },
}

/// Smallest guest RAM: room for the boot data below 1 MiB, a kernel at 1 MiB and its stacks.
pub const MIN_MEMORY_MIB: u64 = 8;
/// Largest guest RAM.
pub const MAX_MEMORY_GIB: u64 = 64;
/// Most vCPUs the MP table (one KiB at the end of base memory) describes.
pub const MAX_VCPUS: u32 = 32;

/// How the first instruction is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BootMode {
    /// The VMM loads the kernel and starts the vCPU at its entry point (PVH or Multiboot).
    #[default]
    Direct,
    /// The vCPU starts at the reset vector in Popek's firmware ROM, which finds the kernel.
    Firmware,
}

/// Which kernel image to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kernel {
    /// The guest embedded in the `popek` binary.
    Bundled,
    /// An image file (PVH ELF64 or Multiboot v1).
    File(PathBuf),
}

/// A validated VM configuration.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub memory_bytes: u64,
    pub vcpus: u32,
    pub kernel: Kernel,
    pub cmdline: String,
    pub initrd: Option<PathBuf>,
    pub boot: BootMode,
    pub kvm_device: PathBuf,
    /// What unknown MSRs do.
    pub msr_policy: crate::trap::msr::UnknownMsrPolicy,
    /// Record each exit as a JSON line in this file, at most this many lines.
    pub trace_exits: Option<(PathBuf, u64)>,
    /// Single-step audit of the boot vCPU, stepping at most this many instructions.
    pub audit: Option<u64>,
    /// The key migration peers must prove they share.
    pub auth_key: Option<crate::migration::auth::Key>,
}

impl VmConfig {
    /// Checks every field against the limits above.
    pub fn validate(&self) -> Result<(), Error> {
        let min = MIN_MEMORY_MIB << 20;
        let max = MAX_MEMORY_GIB << 30;
        if self.memory_bytes < min {
            return Err(Error::MemoryTooSmall { size: self.memory_bytes, min: MIN_MEMORY_MIB });
        }
        if self.memory_bytes > max {
            return Err(Error::MemoryTooLarge { size: self.memory_bytes, max: MAX_MEMORY_GIB });
        }
        if !self.memory_bytes.is_multiple_of(4096) {
            return Err(Error::MemoryNotPageAligned(self.memory_bytes));
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(Error::VcpuCount { given: self.vcpus, max: MAX_VCPUS });
        }
        if self.cmdline.len() >= layout::CMDLINE_MAX {
            return Err(Error::CmdlineTooLong { len: self.cmdline.len(), max: layout::CMDLINE_MAX - 1 });
        }
        Ok(())
    }
}

/// Parses a memory size: a number with an optional K, M, G or T suffix (binary units,
/// an optional trailing "B" or "iB" accepted); a bare number means MiB, as in QEMU's `-m`.
pub fn parse_size(text: &str) -> Result<u64, Error> {
    let bad = || Error::NotASize(text.to_string());
    let trimmed = text.trim();
    let upper = trimmed.to_ascii_uppercase();
    let unit_part = upper.trim_start_matches(|c: char| c.is_ascii_digit());
    let digits = &upper[..upper.len() - unit_part.len()];
    if digits.is_empty() {
        return Err(bad());
    }
    let shift = match unit_part.trim_end_matches("IB").trim_end_matches('B') {
        "" if unit_part.is_empty() => 20,
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(bad()),
    };
    let number: u64 = digits.parse().map_err(|_| bad())?;
    number.checked_mul(1u64 << shift).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256M").unwrap(), 256 << 20);
        assert_eq!(parse_size("256").unwrap(), 256 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("65536k").unwrap(), 64 << 20);
        assert_eq!(parse_size("4096B").unwrap(), 4096);
        for bad in ["", "M", "12Q", "-5M", "1.5G", "99999999999999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad} should be refused");
        }
    }

    fn config(memory_bytes: u64, vcpus: u32) -> VmConfig {
        VmConfig {
            memory_bytes,
            vcpus,
            kernel: Kernel::Bundled,
            cmdline: String::new(),
            initrd: None,
            boot: BootMode::Direct,
            kvm_device: "/dev/kvm".into(),
            msr_policy: Default::default(),
            trace_exits: None,
            audit: None,
            auth_key: None,
        }
    }

    #[test]
    fn limits() {
        assert!(config(256 << 20, 1).validate().is_ok());
        assert!(matches!(config(1 << 20, 1).validate(), Err(Error::MemoryTooSmall { .. })));
        assert!(matches!(config(128 << 30, 1).validate(), Err(Error::MemoryTooLarge { .. })));
        assert!(matches!(config((64 << 20) + 1, 1).validate(), Err(Error::MemoryNotPageAligned(_))));
        assert!(matches!(config(64 << 20, 0).validate(), Err(Error::VcpuCount { .. })));
        assert!(matches!(config(64 << 20, 33).validate(), Err(Error::VcpuCount { .. })));
    }
}
