//! The PVH `hvm_start_info` the loader passes in EBX: command line, memory map, modules.

use core::ptr::read_volatile;

const MAGIC: u32 = 0x336e_c578;

#[repr(C)]
#[derive(Clone, Copy)]
struct RawStartInfo {
    magic: u32,
    version: u32,
    flags: u32,
    nr_modules: u32,
    modlist_paddr: u64,
    cmdline_paddr: u64,
    rsdp_paddr: u64,
    memmap_paddr: u64,
    memmap_entries: u32,
    reserved: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct RawMemmapEntry {
    addr: u64,
    size: u64,
    kind: u32,
    reserved: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct RawModule {
    paddr: u64,
    size: u64,
    cmdline_paddr: u64,
    reserved: u64,
}

/// A validated view of start_info.
#[derive(Clone, Copy)]
pub struct StartInfo {
    raw: RawStartInfo,
}

/// Longest command line the guest looks at.
const CMDLINE_MAX: usize = 4096;

impl StartInfo {
    /// Reads start_info at `paddr`; `None` if the magic is wrong (not booted through PVH).
    pub fn from_paddr(paddr: u64) -> Option<Self> {
        if paddr == 0 {
            return None;
        }
        // SAFETY: identity-mapped guest RAM; read by value.
        let raw = unsafe { read_volatile(paddr as *const RawStartInfo) };
        (raw.magic == MAGIC).then_some(StartInfo { raw })
    }

    /// The command line, without its terminating NUL.
    pub fn cmdline(&self) -> &'static [u8] {
        let ptr = self.raw.cmdline_paddr as *const u8;
        if ptr.is_null() {
            return &[];
        }
        let mut len = 0;
        // SAFETY: the loader wrote a NUL-terminated string there; bounded by CMDLINE_MAX.
        while len < CMDLINE_MAX && unsafe { read_volatile(ptr.add(len)) } != 0 {
            len += 1;
        }
        // SAFETY: `len` bytes were just read from identity-mapped memory that nothing frees.
        unsafe { core::slice::from_raw_parts(ptr, len) }
    }

    /// Sum of the RAM (type 1) entries of the memory map, in bytes.
    pub fn ram_bytes(&self) -> u64 {
        (0..self.raw.memmap_entries as usize)
            .map(|i| {
                let entry = self.raw.memmap_paddr as *const RawMemmapEntry;
                // SAFETY: the loader wrote `memmap_entries` entries there.
                unsafe { read_volatile(entry.add(i)) }
            })
            .filter(|e| e.kind == 1)
            .map(|e| e.size)
            .sum()
    }

    /// The `index`th boot module (the initrd is module 0) as a byte slice.
    pub fn module(&self, index: u32) -> Option<&'static [u8]> {
        if index >= self.raw.nr_modules {
            return None;
        }
        let list = self.raw.modlist_paddr as *const RawModule;
        // SAFETY: the loader wrote `nr_modules` entries there.
        let module = unsafe { read_volatile(list.add(index as usize)) };
        // SAFETY: the loader placed the module in guest RAM, identity-mapped below 4 GiB.
        Some(unsafe { core::slice::from_raw_parts(module.paddr as *const u8, module.size as usize) })
    }

    /// Number of boot modules.
    pub fn module_count(&self) -> u32 {
        self.raw.nr_modules
    }
}

/// Finds `key=value` in a command line.
pub fn arg<'a>(cmdline: &'a [u8], key: &str) -> Option<&'a [u8]> {
    cmdline.split(|&b| b == b' ').find_map(|word| {
        let rest = word.strip_prefix(key.as_bytes())?;
        rest.strip_prefix(b"=")
    })
}

/// Parses a decimal or 0x-prefixed hexadecimal number.
pub fn parse_number(text: &[u8]) -> Option<u64> {
    let (digits, radix) = match text.strip_prefix(b"0x") {
        Some(hex) => (hex, 16),
        None => (text, 10),
    };
    let text = core::str::from_utf8(digits).ok()?;
    u64::from_str_radix(text, radix).ok()
}
