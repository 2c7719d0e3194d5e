//! Getting a kernel into guest memory and deciding where the first instruction is.
//!
//! Direct boot loads a PVH ELF64 (via `linux-loader`) or a Multiboot v1 kernel and starts
//! the boot vCPU at its 32-bit entry. Firmware boot loads the kernel the same way, leaves a
//! hand-off block for the firmware, maps the ROM and starts the vCPU at the reset vector.

pub mod firmware;
pub mod image;
pub mod multiboot;
pub mod pvh;

use crate::arch::x86_64::mptable::MpTable;
use crate::config::{BootMode, Kernel, VmConfig};
use crate::memory::{self, GuestRam};
use popek_abi::layout;
use std::path::{Path, PathBuf};
use vm_memory::{Bytes, GuestAddress};

/// Boot errors: each names the file and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kernel file could not be read.
    #[error("Cannot read kernel image {path}")]
    ReadKernel {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The initrd file could not be read.
    #[error("Cannot read initrd {path}")]
    ReadInitrd {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Not a bootable image.
    #[error("Kernel image {path}")]
    Image {
        path: String,
        #[source]
        source: image::Error,
    },
    /// A segment does not fit in guest RAM.
    #[error("Kernel image {path}: segment at {start:#x}..{end:#x} lies outside guest RAM ({ram} MiB; a larger --memory may help)")]
    SegmentOutsideRam { path: String, start: u64, end: u64, ram: u64 },
    /// A segment overlaps the area Popek writes boot data to.
    #[error("Kernel image {path}: segment at {start:#x}..{end:#x} overlaps Popek's boot data at {area_start:#x}..{area_end:#x}")]
    SegmentOverlapsBootData { path: String, start: u64, end: u64, area_start: u64, area_end: u64 },
    /// ELF64 without the PVH note.
    #[error("Kernel image {0}: 64-bit ELF without a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)")]
    NoPvhNote(String),
    /// linux-loader refused the image.
    #[error("Kernel image {path}: cannot load")]
    Load {
        path: String,
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The boot protocol structures could not be written.
    #[error("Cannot write the PVH boot information")]
    Configure(#[source] linux_loader::configurator::Error),
    /// Writing to guest memory failed (an address outside RAM).
    #[error("Cannot write {what} to guest memory")]
    Write {
        what: &'static str,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The initrd does not fit between the kernel and the top of low RAM.
    #[error("initrd of {size} bytes does not fit in guest RAM below {limit:#x} above the kernel (end {kernel_end:#x}); a larger --memory may help")]
    InitrdTooLarge { size: u64, kernel_end: u64, limit: u64 },
    /// Multiboot kernel with an unusable header.
    #[error("Kernel image {path}: bad Multiboot header: {reason}")]
    BadMultiboot { path: String, reason: String },
    /// Firmware boot only knows the PVH hand-off.
    #[error("--boot firmware needs a PVH kernel; {0} is a Multiboot kernel (use direct boot)")]
    FirmwareNeedsPvh(String),
}

/// A kernel's 32-bit entry: flat protected mode, paging off, at `entry` with EAX and EBX
/// set (PVH: EBX = start_info; Multiboot: EAX = magic, EBX = info).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelEntry {
    pub entry: u32,
    pub eax: u32,
    pub ebx: u32,
}

/// Where the boot vCPU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// Straight at the kernel's entry (direct boot).
    ProtectedMode(KernelEntry),
    /// The architectural reset state: CS base 0xffff0000, IP 0xfff0, real mode.
    ResetVector,
}

/// What the VM needs to start: the entry, and the ROM to map for firmware boot.
#[derive(Debug, Clone)]
pub struct BootPlan {
    pub entry: Entry,
    pub rom: Option<&'static [u8]>,
    /// "pvh" or "multiboot": what the kernel was booted as.
    pub protocol: &'static str,
}

/// The initrd (a PVH module or Multiboot module).
pub struct Initrd {
    pub data: Vec<u8>,
    pub name: String,
}

/// A kernel image already in memory and how to boot it: everything [`load`] reads from
/// the configuration and from files.
pub struct Boot<'a> {
    pub kernel: &'a [u8],
    /// Names the image in errors.
    pub name: &'a str,
    pub initrd: Option<&'a Initrd>,
    pub cmdline: &'a str,
    pub vcpus: u32,
    pub mode: BootMode,
}

/// Loads the configured kernel (and initrd) into `ram` and returns how to start it.
pub fn load(config: &VmConfig, ram: &GuestRam) -> Result<BootPlan, Error> {
    let (kernel, name) = read_kernel(&config.kernel)?;
    // The image is checked before the initrd is read: a bad kernel is the error to report.
    let parsed = checked_image(&kernel, &name, ram)?;
    let initrd = config.initrd.as_deref().map(read_initrd).transpose()?;
    let boot = Boot {
        kernel: &kernel,
        name: &name,
        initrd: initrd.as_ref(),
        cmdline: &config.cmdline,
        vcpus: config.vcpus,
        mode: config.boot,
    };
    load_checked(ram, &boot, &parsed)
}

/// Loads an image from memory into `ram`: [`load`] without the files (the fuzzing surface,
/// `crate::fuzzing`, feeds hostile images through here).
pub fn load_image(ram: &GuestRam, boot: &Boot) -> Result<BootPlan, Error> {
    let parsed = checked_image(boot.kernel, boot.name, ram)?;
    load_checked(ram, boot, &parsed)
}

/// Parses the image and checks its segments against RAM and Popek's boot data.
fn checked_image(kernel: &[u8], name: &str, ram: &GuestRam) -> Result<image::Image, Error> {
    let parsed = image::parse(kernel).map_err(|source| Error::Image { path: name.into(), source })?;
    check_segments(name, &parsed, ram)?;
    Ok(parsed)
}

fn load_checked(ram: &GuestRam, boot: &Boot, parsed: &image::Image) -> Result<BootPlan, Error> {
    let (kernel, name) = (boot.kernel, boot.name.to_string());
    write(ram, layout::CMDLINE, &cmdline_bytes(boot.cmdline), "the command line")?;
    let mptable = MpTable { cpus: boot.vcpus as u8 }.build(layout::MPTABLE);
    write(ram, layout::MPTABLE, &mptable, "the MP table")?;

    let (kernel_entry, protocol) = match parsed.class {
        image::Class::Elf64 => (pvh::load(ram, kernel, &name, boot.initrd)?, "pvh"),
        image::Class::Elf32 => {
            let header = image::find_multiboot_header(kernel)
                .ok_or_else(|| Error::Image { path: name.clone(), source: image::Error::NoMultibootHeader })?;
            (multiboot::load(ram, kernel, &name, parsed, &header, boot.initrd)?, "multiboot")
        }
    };
    match boot.mode {
        BootMode::Direct => Ok(BootPlan { entry: Entry::ProtectedMode(kernel_entry), rom: None, protocol }),
        BootMode::Firmware => {
            if protocol != "pvh" {
                return Err(Error::FirmwareNeedsPvh(name));
            }
            firmware::write_handoff(ram, &kernel_entry)?;
            Ok(BootPlan { entry: Entry::ResetVector, rom: Some(crate::bundled::FIRMWARE_ROM), protocol })
        }
    }
}

fn read_kernel(kernel: &Kernel) -> Result<(Vec<u8>, String), Error> {
    match kernel {
        Kernel::Bundled => Ok((crate::bundled::GUEST_ELF.to_vec(), "<bundled guest>".into())),
        Kernel::File(path) => std::fs::read(path)
            .map(|data| (data, path.display().to_string()))
            .map_err(|source| Error::ReadKernel { path: path.clone(), source }),
    }
}

fn read_initrd(path: &Path) -> Result<Initrd, Error> {
    let data = std::fs::read(path).map_err(|source| Error::ReadInitrd { path: path.to_path_buf(), source })?;
    Ok(Initrd { data, name: path.display().to_string() })
}

fn cmdline_bytes(cmdline: &str) -> Vec<u8> {
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    bytes
}

/// Areas below 1 MiB that Popek writes after loading the kernel; a segment there would be
/// overwritten, so it is refused up front.
const BOOT_DATA: [(u64, u64); 3] = [
    (layout::FIRMWARE_HANDOFF, layout::MULTIBOOT_INFO + 0x1000),
    (layout::CMDLINE, layout::CMDLINE + layout::CMDLINE_MAX as u64),
    (layout::MPTABLE, layout::LOW_MEMORY_END),
];

fn check_segments(path: &str, image: &image::Image, ram: &GuestRam) -> Result<(), Error> {
    for segment in image.segments.iter().filter(|s| s.mem_size > 0) {
        let start = segment.paddr;
        let end = start.saturating_add(segment.mem_size);
        if !memory::is_ram(ram, start, segment.mem_size) {
            return Err(Error::SegmentOutsideRam { path: path.into(), start, end, ram: total_mib(ram) });
        }
        if let Some(&(area_start, area_end)) = BOOT_DATA.iter().find(|(a, b)| start < *b && end > *a) {
            return Err(Error::SegmentOverlapsBootData { path: path.into(), start, end, area_start, area_end });
        }
    }
    Ok(())
}

fn total_mib(ram: &GuestRam) -> u64 {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    ram.iter().map(|r| r.len()).sum::<u64>() >> 20
}

/// Writes `bytes` at `addr`, naming `what` in the error.
pub(crate) fn write(ram: &GuestRam, addr: u64, bytes: &[u8], what: &'static str) -> Result<(), Error> {
    ram.write_slice(bytes, GuestAddress(addr)).map_err(|source| Error::Write { what, source })
}

/// Places the initrd page-aligned at the top of RAM below the MMIO hole, above the kernel.
pub(crate) fn place_initrd(ram: &GuestRam, initrd: &Initrd, kernel_end: u64) -> Result<u64, Error> {
    let size = initrd.data.len() as u64;
    let limit = memory::low_ram_end(ram);
    let too_large = || Error::InitrdTooLarge { size, kernel_end, limit };
    let addr = limit.checked_sub(size).ok_or_else(too_large)? & !0xfff;
    if addr < kernel_end.max(layout::HIGH_MEMORY) {
        return Err(too_large());
    }
    write(ram, addr, &initrd.data, "the initrd")?;
    Ok(addr)
}
