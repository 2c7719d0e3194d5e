//! Multiboot v1 direct boot, the way QEMU's `-kernel` does it: an ELF32 kernel's segments
//! (or, with the header's address fields, the "a.out kludge" layout) are loaded, and EBX
//! points to a Multiboot information structure with the memory, the command line, the
//! memory map and the initrd as a module.

use super::image::{Image, MultibootHeader, MULTIBOOT_AOUT_KLUDGE};
use super::{place_initrd, write, Error, Initrd, KernelEntry, BOOT_DATA};
use crate::memory::{self, GuestRam};
use popek_abi::layout;

/// EAX at entry: the bootloader magic.
pub const BOOTLOADER_MAGIC: u32 = 0x2bad_b002;

const INFO_MEMORY: u32 = 1 << 0;
const INFO_CMDLINE: u32 = 1 << 2;
const INFO_MODULES: u32 = 1 << 3;
const INFO_MEMORY_MAP: u32 = 1 << 6;
const INFO_LOADER_NAME: u32 = 1 << 9;

// Layout of Popek's Multiboot block (one page at MULTIBOOT_INFO).
const INFO_SIZE: u64 = 88;
const MMAP_OFFSET: u64 = 0x100;
const MODS_OFFSET: u64 = 0x400;
const LOADER_NAME_OFFSET: u64 = 0x480;
const MODULE_NAME_OFFSET: u64 = 0x500;
const MODULE_NAME_MAX: usize = 0xb00 - 1;

/// Loads a Multiboot kernel and writes its information structure; returns the entry.
pub fn load(
    ram: &GuestRam,
    kernel: &[u8],
    path: &str,
    image: &Image,
    header: &MultibootHeader,
    initrd: Option<&Initrd>,
) -> Result<KernelEntry, Error> {
    let bad = |reason: String| Error::BadMultiboot { path: path.into(), reason };
    let (entry, kernel_end) = if header.flags & MULTIBOOT_AOUT_KLUDGE != 0 {
        load_aout_kludge(ram, kernel, header).map_err(bad)?
    } else {
        load_elf_segments(ram, kernel, image)?
    };

    let base = layout::MULTIBOOT_INFO;
    let mut flags = INFO_MEMORY | INFO_CMDLINE | INFO_MEMORY_MAP | INFO_LOADER_NAME;
    let mut mods_count = 0;
    if let Some(initrd) = initrd {
        let addr = place_initrd(ram, initrd, kernel_end)?;
        let mut module = Vec::new();
        module.extend_from_slice(&(addr as u32).to_le_bytes());
        module.extend_from_slice(&((addr + initrd.data.len() as u64) as u32).to_le_bytes());
        module.extend_from_slice(&((base + MODULE_NAME_OFFSET) as u32).to_le_bytes());
        module.extend_from_slice(&0u32.to_le_bytes());
        write(ram, base + MODS_OFFSET, &module, "the Multiboot module list")?;
        let name: Vec<u8> = initrd.name.bytes().take(MODULE_NAME_MAX).chain([0]).collect();
        write(ram, base + MODULE_NAME_OFFSET, &name, "the Multiboot module name")?;
        flags |= INFO_MODULES;
        mods_count = 1;
    }

    let mut mmap = Vec::new();
    for entry in memory::memory_map(ram) {
        mmap.extend_from_slice(&20u32.to_le_bytes()); // size of the rest of the entry
        mmap.extend_from_slice(&entry.addr.to_le_bytes());
        mmap.extend_from_slice(&entry.size.to_le_bytes());
        mmap.extend_from_slice(&(entry.kind as u32).to_le_bytes());
    }
    write(ram, base + MMAP_OFFSET, &mmap, "the Multiboot memory map")?;
    write(ram, base + LOADER_NAME_OFFSET, b"popek\0", "the boot loader name")?;

    let low_end = memory::low_ram_end(ram);
    let mut info = vec![0u8; INFO_SIZE as usize];
    let mut put = |offset: usize, value: u32| info[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
    put(0, flags);
    put(4, (layout::MPTABLE / 1024) as u32); // mem_lower, KiB
    put(8, ((low_end - layout::HIGH_MEMORY) / 1024) as u32); // mem_upper, KiB
    put(16, layout::CMDLINE as u32);
    put(20, mods_count);
    put(24, (base + MODS_OFFSET) as u32);
    put(44, mmap.len() as u32);
    put(48, (base + MMAP_OFFSET) as u32);
    put(64, (base + LOADER_NAME_OFFSET) as u32);
    write(ram, base, &info, "the Multiboot information")?;

    Ok(KernelEntry { entry, eax: BOOTLOADER_MAGIC, ebx: base as u32 })
}

fn load_elf_segments(ram: &GuestRam, kernel: &[u8], image: &Image) -> Result<(u32, u64), Error> {
    let mut kernel_end = 0;
    for segment in &image.segments {
        // `image::parse` checked these bytes are in the file.
        let start = segment.file_offset as usize;
        let bytes = &kernel[start..start + segment.file_size as usize];
        write(ram, segment.paddr, bytes, "a kernel segment")?;
        kernel_end = kernel_end.max(segment.paddr + segment.mem_size);
    }
    let entry = u32::try_from(image.entry).unwrap_or(u32::MAX);
    Ok((entry, kernel_end))
}

/// Loads using the header's address fields, as a Multiboot loader must when flag 16 is set.
fn load_aout_kludge(ram: &GuestRam, kernel: &[u8], h: &MultibootHeader) -> Result<(u32, u64), String> {
    if h.header_addr < h.load_addr {
        return Err("header_addr below load_addr".into());
    }
    let file_start = (h.file_offset as u64)
        .checked_sub(u64::from(h.header_addr - h.load_addr))
        .ok_or("load_addr lies before the start of the file")?;
    let load_end = if h.load_end_addr == 0 {
        u64::from(h.load_addr) + (kernel.len() as u64).saturating_sub(file_start)
    } else {
        u64::from(h.load_end_addr)
    };
    let length = load_end.checked_sub(u64::from(h.load_addr)).ok_or("load_end_addr below load_addr")?;
    let bytes = kernel
        .get(file_start as usize..(file_start + length) as usize)
        .ok_or("load range runs past the end of the file")?;
    let bss_end = u64::from(h.bss_end_addr).max(load_end);
    if !memory::is_ram(ram, u64::from(h.load_addr), bss_end - u64::from(h.load_addr)) {
        return Err(format!("load range {:#x}..{bss_end:#x} lies outside guest RAM", h.load_addr));
    }
    // The rule ELF segments follow (`check_segments`): the kernel would overwrite the
    // command line and MP table written before it, the Multiboot information written
    // after it would overwrite the kernel.
    let overlap = BOOT_DATA.iter().find(|&&(start, end)| u64::from(h.load_addr) < end && bss_end > start);
    if let Some((start, end)) = overlap {
        return Err(format!(
            "load range {:#x}..{bss_end:#x} overlaps Popek's boot data at {start:#x}..{end:#x}",
            h.load_addr
        ));
    }
    write(ram, u64::from(h.load_addr), bytes, "the kernel").map_err(|e| e.to_string())?;
    Ok((h.entry_addr, bss_end))
}
