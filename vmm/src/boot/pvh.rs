//! PVH direct boot: `linux-loader` loads the ELF and finds the XEN_ELFNOTE_PHYS32_ENTRY
//! note; its PVH configurator writes `hvm_start_info`, the memory map and the module list.

use super::{place_initrd, Error, Initrd, KernelEntry};
use crate::memory::{self, GuestRam};
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use popek_abi::layout;
use std::io::Cursor;
use vm_memory::GuestAddress;

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

/// Loads a PVH ELF64 kernel and its boot information; returns the entry.
pub fn load(ram: &GuestRam, kernel: &[u8], path: &str, initrd: Option<&Initrd>) -> Result<KernelEntry, Error> {
    let loaded = Elf::load(ram, None, &mut Cursor::new(kernel), None)
        .map_err(|source| Error::Load { path: path.into(), source })?;
    let PvhBootCapability::PvhEntryPresent(entry) = loaded.pvh_boot_cap else {
        return Err(Error::NoPvhNote(path.into()));
    };
    let entry = u32::try_from(entry.0).map_err(|_| Error::NoPvhNote(path.into()))?;

    let memmap: Vec<hvm_memmap_table_entry> = memory::memory_map(ram)
        .iter()
        .map(|e| hvm_memmap_table_entry { addr: e.addr, size: e.size, type_: e.kind as u32, reserved: 0 })
        .collect();
    let mut start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: layout::CMDLINE,
        memmap_paddr: layout::PVH_MEMMAP,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut modules = Vec::new();
    if let Some(initrd) = initrd {
        let addr = place_initrd(ram, initrd, loaded.kernel_end)?;
        modules.push(hvm_modlist_entry { paddr: addr, size: initrd.data.len() as u64, ..Default::default() });
        start_info.nr_modules = 1;
        start_info.modlist_paddr = layout::PVH_MODLIST;
    }
    let mut params = BootParams::new(&start_info, GuestAddress(layout::PVH_START_INFO));
    params.set_sections(&memmap, GuestAddress(layout::PVH_MEMMAP));
    if !modules.is_empty() {
        params.set_modules(&modules, GuestAddress(layout::PVH_MODLIST));
    }
    PvhBootConfigurator::write_bootparams(&params, ram).map_err(Error::Configure)?;
    Ok(KernelEntry { entry, eax: 0, ebx: layout::PVH_START_INFO as u32 })
}
