//! Guest-physical layout: RAM below the 32-bit MMIO hole, the rest above 4 GiB, and the
//! firmware ROM at the top of the hole. Owns the host mappings behind them.

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_READONLY};
use kvm_ioctls::VmFd;
use popek_abi::layout;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MmapRegion};

/// Guest RAM as rust-vmm's mmap-backed guest memory, with a dirty bitmap: writes the VMM
/// itself makes (hypercalls, devices) are tracked for migration, which KVM's dirty log
/// cannot see.
pub type GuestRam = vm_memory::GuestMemoryMmap<crate::dirty_bitmap::DirtyBitmap>;

/// Memory errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Host could not map guest RAM.
    #[error("Cannot allocate {size} bytes of guest memory")]
    Allocate {
        size: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    /// Host could not map the ROM.
    #[error("Cannot allocate the firmware ROM")]
    AllocateRom(#[source] vm_memory::mmap::MmapRegionError),
    /// KVM refused a memory slot.
    #[error("KVM refused memory slot {slot} at {gpa:#x}")]
    RegisterSlot {
        slot: u32,
        gpa: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Preparing guest RAM ahead of a migration failed.
    #[error("Cannot {what}")]
    Prepare {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The host KVM cannot map read-only memory.
    #[error("This KVM cannot map read-only memory (KVM_CAP_READONLY_MEM), needed for the firmware ROM")]
    NoReadonlyMemory,
}

/// Address ranges of RAM for a VM of `size` bytes.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    let low = size.min(layout::MMIO_HOLE_START);
    let mut ranges = vec![(GuestAddress(0), low as usize)];
    if size > low {
        ranges.push((GuestAddress(layout::FOUR_GIB), (size - low) as usize));
    }
    ranges
}

/// Maps guest RAM (anonymous, zeroed, populated lazily).
pub fn create_ram(size: u64) -> Result<GuestRam, Error> {
    GuestRam::from_ranges(&ram_ranges(size)).map_err(|source| Error::Allocate { size, source })
}

/// Guest RAM allocated ahead of time for a migration destination (`run --incoming
/// --prealloc`): a memfd whose pages are all allocated before the source connects, mapped
/// twice: once for the guest (through `GuestRam`, shared) and once here, with page tables
/// filled in, for the VMM to write incoming pages. Filling RAM then costs memcpy speed
/// instead of one page allocation and fault per page, and post-copy can install a page by
/// writing it here and mapping it for the guest (userfaultfd minor faults, UFFDIO_CONTINUE).
pub struct Prepared {
    pub ram: GuestRam,
    /// The second mapping: page `n` of RAM (regions in order) at `staging + n * 4096`.
    staging: *mut u8,
    len: usize,
}

// SAFETY: `staging` is a private mapping owned by this value, written only through
// `write` (callers order writes against guest access, as with any guest RAM).
unsafe impl Send for Prepared {}
unsafe impl Sync for Prepared {}

impl Prepared {
    /// Allocates and maps `size` bytes of guest RAM.
    pub fn new(size: u64) -> Result<Prepared, Error> {
        use std::os::unix::io::{AsRawFd, FromRawFd};
        let io = |what: &'static str| {
            let source = std::io::Error::last_os_error();
            move || Error::Prepare { what, source }
        };
        // SAFETY: memfd_create with a valid C string; the fd is owned by `file` below.
        let fd = unsafe { libc::memfd_create(c"popek-ram".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io("memfd_create")());
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        file.set_len(size).map_err(|source| Error::Prepare { what: "size the memfd", source })?;
        // SAFETY: fallocate on our own memfd: allocates every page now (the point).
        if unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, size as libc::off_t) } != 0 {
            return Err(io("allocate guest RAM (fallocate)")());
        }
        // SAFETY: a new shared mapping of our memfd, `size` bytes; MAP_POPULATE fills its
        // page tables now too.
        let staging = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                file.as_raw_fd(),
                0,
            )
        };
        if staging == libc::MAP_FAILED {
            return Err(io("map guest RAM")());
        }
        let mut offset = 0;
        let mut ranges = Vec::new();
        for (gpa, len) in ram_ranges(size) {
            let f = file.try_clone().map_err(|source| Error::Prepare { what: "share the memfd", source })?;
            ranges.push((gpa, len, Some(vm_memory::FileOffset::new(f, offset))));
            offset += len as u64;
        }
        let ram = GuestRam::from_ranges_with_files(&ranges).map_err(|source| Error::Allocate { size, source })?;
        Ok(Prepared { ram, staging: staging.cast(), len: size as usize })
    }

    /// Bytes of guest RAM.
    pub fn size(&self) -> u64 {
        self.len as u64
    }

    /// Writes `data` at byte `offset` of RAM (page order across regions).
    pub fn write(&self, offset: usize, data: &[u8]) -> bool {
        if offset.checked_add(data.len()).is_none_or(|end| end > self.len) {
            return false;
        }
        // SAFETY: checked to lie inside the staging mapping; `data` is our own buffer.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.staging.add(offset), data.len()) };
        true
    }

    /// Reads `len` bytes from `r` straight into RAM at byte `offset` (page order), and
    /// returns them (to be checksummed): one copy less than reading into a buffer first.
    ///
    /// # Safety
    /// Nothing else reads or writes those bytes until the caller is done with them: in
    /// post-copy, pages this caller claimed and nobody has mapped for the guest yet.
    pub unsafe fn read_into<R: std::io::Read + ?Sized>(
        &self,
        offset: usize,
        len: usize,
        r: &mut R,
    ) -> std::io::Result<&[u8]> {
        if offset.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "outside guest RAM"));
        }
        // SAFETY: checked to lie inside the staging mapping; exclusive by the contract.
        let bytes = unsafe { std::slice::from_raw_parts_mut(self.staging.add(offset), len) };
        r.read_exact(bytes)?;
        Ok(bytes)
    }

    /// Zeroes `len` bytes at byte `offset` of RAM.
    pub fn zero(&self, offset: usize, len: usize) -> bool {
        if offset.checked_add(len).is_none_or(|end| end > self.len) {
            return false;
        }
        // SAFETY: checked to lie inside the staging mapping.
        unsafe { std::ptr::write_bytes(self.staging.add(offset), 0, len) };
        true
    }
}

impl Drop for Prepared {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping of `len` bytes.
        unsafe { libc::munmap(self.staging.cast(), self.len) };
    }
}

/// End of RAM below the MMIO hole.
pub fn low_ram_end(ram: &GuestRam) -> u64 {
    ram.iter()
        .filter(|r| r.start_addr().raw_value() < layout::MMIO_HOLE_START)
        .map(|r| r.last_addr().raw_value() + 1)
        .max()
        .unwrap_or(0)
}

/// Whether `[start, start + len)` lies inside one RAM region.
pub fn is_ram(ram: &GuestRam, start: u64, len: u64) -> bool {
    let Some(end) = start.checked_add(len) else {
        return false;
    };
    ram.iter().any(|r| {
        let region_start = r.start_addr().raw_value();
        let region_end = region_start + r.len();
        start >= region_start && end <= region_end
    })
}

/// `len` bytes of guest RAM at `gpa` (inside one region), read in place instead of copied
/// out: the migration source reads its pages this way once every vCPU is paused
/// (stop-and-copy's pass, the last pre-copy pages, post-copy), to send them without a
/// copy. `None`: the range is not RAM.
///
/// # Safety
/// Nothing may write these bytes while the slice lives: every vCPU of the VM is paused
/// (no device of this VMM writes guest RAM on its own).
pub unsafe fn paused_bytes(ram: &GuestRam, gpa: u64, len: usize) -> Option<&[u8]> {
    if !is_ram(ram, gpa, len as u64) {
        return None;
    }
    let host = ram.get_host_address(GuestAddress(gpa)).ok()?;
    // SAFETY: `[host, host + len)` lies inside one mapped RAM region (checked above) that
    // lives as long as `ram`'s borrow; the caller's contract keeps writers away.
    Some(unsafe { std::slice::from_raw_parts(host, len) })
}

/// Reads `len` bytes from `r` straight into guest RAM at `gpa` (inside one region), and
/// returns them (to be checksummed): a migration destination's receiver, one copy less
/// than reading into a buffer first. `InvalidInput`: the range is not RAM.
///
/// # Safety
/// Nothing else reads or writes those bytes meanwhile: no vCPU of the VM runs yet (a
/// destination before its vCPUs start), and the caller holds no other slice of them.
pub unsafe fn read_into_ram<'a, R: std::io::Read + ?Sized>(
    ram: &'a GuestRam,
    gpa: u64,
    len: usize,
    r: &mut R,
) -> std::io::Result<&'a [u8]> {
    let outside = || std::io::Error::new(std::io::ErrorKind::InvalidInput, "outside guest RAM");
    if !is_ram(ram, gpa, len as u64) {
        return Err(outside());
    }
    let host = ram.get_host_address(GuestAddress(gpa)).map_err(|_| outside())?;
    // SAFETY: `[host, host + len)` lies inside one mapped RAM region (checked above) that
    // lives as long as `ram`'s borrow; exclusive by the caller's contract.
    let bytes = unsafe { std::slice::from_raw_parts_mut(host, len) };
    r.read_exact(bytes)?;
    Ok(bytes)
}

/// The E820-style map every boot protocol gets: RAM, minus the MP table's last KiB of base
/// memory and the BIOS area, which are reserved.
pub fn memory_map(ram: &GuestRam) -> Vec<MemoryMapEntry> {
    let mut map = vec![
        MemoryMapEntry { addr: 0, size: layout::MPTABLE, kind: MemoryKind::Ram },
        MemoryMapEntry {
            addr: layout::MPTABLE,
            size: layout::LOW_MEMORY_END - layout::MPTABLE,
            kind: MemoryKind::Reserved,
        },
    ];
    for region in ram.iter() {
        let start = region.start_addr().raw_value().max(layout::HIGH_MEMORY);
        let end = region.start_addr().raw_value() + region.len();
        if end > start {
            map.push(MemoryMapEntry { addr: start, size: end - start, kind: MemoryKind::Ram });
        }
    }
    map
}

/// Kind of a memory map entry, with E820 numbering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryKind {
    Ram = 1,
    Reserved = 2,
}

/// One entry of the memory map handed to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryMapEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: MemoryKind,
}

/// Hands every RAM region to KVM as a memory slot, numbered from 0.
pub fn register_ram(vm: &VmFd, ram: &GuestRam) -> Result<u32, Error> {
    let mut slot = 0;
    for region in ram.iter() {
        let gpa = region.start_addr().raw_value();
        let host = region.as_ptr() as u64;
        register_slot(vm, slot, gpa, region.len(), host, 0)?;
        slot += 1;
    }
    Ok(slot)
}

/// Turns KVM's dirty-page logging on or off for every RAM slot (numbered as
/// `register_ram` numbered them).
pub fn set_dirty_logging(vm: &VmFd, ram: &GuestRam, on: bool) -> Result<(), Error> {
    let flags = if on { kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
    for (slot, region) in ram.iter().enumerate() {
        let gpa = region.start_addr().raw_value();
        register_slot(vm, slot as u32, gpa, region.len(), region.as_ptr() as u64, flags)?;
    }
    Ok(())
}

/// Pages written since the last call, per RAM region (bit i = page i of the region): the
/// guest's writes from KVM's dirty log, OR the VMM's own writes from vm-memory's bitmap.
/// Both are reset by reading.
pub fn take_dirty(vm: &VmFd, ram: &GuestRam) -> Result<Vec<Vec<u64>>, Error> {
    let mut all = Vec::new();
    for (slot, region) in ram.iter().enumerate() {
        let mut bits = vm.get_dirty_log(slot as u32, region.len() as usize).map_err(|source| Error::RegisterSlot {
            slot: slot as u32,
            gpa: region.start_addr().raw_value(),
            source,
        })?;
        // The mapping's own bitmap (the trait method returns a sliced view).
        for (index, extra) in vm_memory::MmapRegion::bitmap(&**region).take() {
            if let Some(word) = bits.get_mut(index) {
                *word |= extra;
            }
        }
        all.push(bits);
    }
    Ok(all)
}

/// The firmware ROM: host memory KVM maps read-only, so guest writes exit to the VMM
/// (which drops them) instead of changing it.
pub struct Rom {
    region: MmapRegion,
}

impl Rom {
    /// Maps `image` (exactly [`layout::FIRMWARE_SIZE`] bytes) read-only at the top of 4 GiB.
    pub fn map(vm: &VmFd, kvm: &kvm_ioctls::Kvm, slot: u32, image: &[u8]) -> Result<Rom, Error> {
        if !kvm.check_extension(kvm_ioctls::Cap::ReadonlyMem) {
            return Err(Error::NoReadonlyMemory);
        }
        let region = MmapRegion::new(layout::FIRMWARE_SIZE as usize).map_err(Error::AllocateRom)?;
        let len = image.len().min(region.size());
        // SAFETY: `region` is a fresh private mapping of `region.size()` bytes that only this
        // function has seen; `len` is bounded by that size.
        unsafe { std::ptr::copy_nonoverlapping(image.as_ptr(), region.as_ptr(), len) };
        let host = region.as_ptr() as u64;
        register_slot(vm, slot, layout::FIRMWARE_BASE, layout::FIRMWARE_SIZE, host, KVM_MEM_READONLY)?;
        Ok(Rom { region })
    }

    /// The ROM's current bytes (for checks that it stayed intact).
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping lives as long as `self`; KVM maps it read-only for the guest.
        unsafe { std::slice::from_raw_parts(self.region.as_ptr(), self.region.size()) }
    }
}

fn register_slot(vm: &VmFd, slot: u32, gpa: u64, size: u64, host: u64, flags: u32) -> Result<(), Error> {
    let region =
        kvm_userspace_memory_region { slot, flags, guest_phys_addr: gpa, memory_size: size, userspace_addr: host };
    // SAFETY: `host` points to a mapping of `size` bytes owned by the VM object, which keeps it
    // alive (and unmoved) for as long as the VM fd exists.
    unsafe { vm.set_user_memory_region(region) }.map_err(|source| Error::RegisterSlot { slot, gpa, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_split_around_the_hole() {
        assert_eq!(ram_ranges(256 << 20), vec![(GuestAddress(0), 256 << 20)]);
        let big = ram_ranges(4 << 30);
        assert_eq!(big[0], (GuestAddress(0), layout::MMIO_HOLE_START as usize));
        assert_eq!(big[1], (GuestAddress(layout::FOUR_GIB), (1 << 30) as usize));
    }

    #[test]
    fn map_covers_ram() {
        let ram = create_ram(64 << 20).unwrap();
        let map = memory_map(&ram);
        let total: u64 = map.iter().filter(|e| e.kind == MemoryKind::Ram).map(|e| e.size).sum();
        assert_eq!(total, (64 << 20) - (layout::HIGH_MEMORY - layout::MPTABLE));
        assert!(is_ram(&ram, 0x100000, 0x1000));
        assert!(!is_ram(&ram, (64 << 20) - 8, 16));
        assert!(!is_ram(&ram, u64::MAX - 1, 16));
    }
}
