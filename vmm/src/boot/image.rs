//! Reading kernel images: which format, where the loadable segments go, and whether the
//! file is whole. Uses the `object` crate's bounds-checked ELF reader, so a truncated or
//! hostile image is an error, never a panic.

use object::read::elf::{ElfFile32, ElfFile64, FileHeader, ProgramHeader};
use object::{elf, Endianness, FileKind};

/// Image errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No ELF magic.
    #[error("not an ELF image (Popek boots PVH ELF64 and Multiboot ELF32 kernels)")]
    NotElf,
    /// Header or segment past the end of the file, or inconsistent sizes.
    #[error("truncated or malformed ELF: {0}")]
    Malformed(String),
    /// Not an x86 image.
    #[error("ELF for machine {0}, not x86 (EM_386 or EM_X86_64)")]
    WrongMachine(u16),
    /// Neither a PVH note nor a Multiboot header.
    #[error("32-bit ELF without a Multiboot header in its first 8 KiB")]
    NoMultibootHeader,
}

/// ELF class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Elf32,
    Elf64,
}

/// One loadable segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub paddr: u64,
    pub file_offset: u64,
    pub file_size: u64,
    pub mem_size: u64,
}

/// What the loaders need to know about an ELF image.
#[derive(Debug, Clone)]
pub struct Image {
    pub class: Class,
    pub entry: u64,
    pub segments: Vec<Segment>,
}

fn malformed(e: object::Error) -> Error {
    Error::Malformed(e.to_string())
}

/// Parses and checks an ELF image: header, program headers, and every loadable segment's
/// bytes present in the file.
pub fn parse(data: &[u8]) -> Result<Image, Error> {
    if !data.starts_with(&elf::ELFMAG) {
        return Err(Error::NotElf);
    }
    match FileKind::parse(data).map_err(malformed)? {
        FileKind::Elf32 => {
            let file = ElfFile32::<Endianness>::parse(data).map_err(malformed)?;
            collect(Class::Elf32, file.elf_header(), file.endian(), data, elf::EM_386)
        }
        FileKind::Elf64 => {
            let file = ElfFile64::<Endianness>::parse(data).map_err(malformed)?;
            collect(Class::Elf64, file.elf_header(), file.endian(), data, elf::EM_X86_64)
        }
        _ => Err(Error::Malformed("unknown ELF class".into())),
    }
}

fn collect<H: FileHeader<Endian = Endianness>>(
    class: Class,
    header: &H,
    endian: Endianness,
    data: &[u8],
    machine: u16,
) -> Result<Image, Error> {
    if header.e_machine(endian) != machine {
        return Err(Error::WrongMachine(header.e_machine(endian)));
    }
    let mut segments = Vec::new();
    for phdr in header.program_headers(endian, data).map_err(malformed)? {
        if phdr.p_type(endian) != elf::PT_LOAD {
            continue;
        }
        // Checks that the segment's file bytes are inside the file.
        phdr.data(endian, data).map_err(|()| {
            Error::Malformed(format!(
                "segment at {:#x} needs file bytes {:#x}+{:#x}, past the end of the {}-byte file",
                phdr.p_paddr(endian).into(),
                phdr.p_offset(endian).into(),
                phdr.p_filesz(endian).into(),
                data.len()
            ))
        })?;
        let segment = Segment {
            paddr: phdr.p_paddr(endian).into(),
            file_offset: phdr.p_offset(endian).into(),
            file_size: phdr.p_filesz(endian).into(),
            mem_size: phdr.p_memsz(endian).into(),
        };
        if segment.file_size > segment.mem_size {
            return Err(Error::Malformed(format!("segment at {:#x} has file size > memory size", segment.paddr)));
        }
        segments.push(segment);
    }
    if segments.is_empty() {
        return Err(Error::Malformed("no loadable segments".into()));
    }
    Ok(Image { class, entry: header.e_entry(endian).into(), segments })
}

/// The Multiboot v1 header fields Popek uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MultibootHeader {
    /// Offset of the header in the file.
    pub file_offset: usize,
    pub flags: u32,
    pub header_addr: u32,
    pub load_addr: u32,
    pub load_end_addr: u32,
    pub bss_end_addr: u32,
    pub entry_addr: u32,
}

/// Multiboot v1 header magic.
pub const MULTIBOOT_MAGIC: u32 = 0x1bad_b002;
/// Flag: the header's address fields are valid (the "a.out kludge").
pub const MULTIBOOT_AOUT_KLUDGE: u32 = 1 << 16;
const MULTIBOOT_SEARCH: usize = 8192;

fn read_u32(data: &[u8], at: usize) -> Option<u32> {
    let bytes = data.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

/// Finds a valid Multiboot v1 header (magic + flags + checksum = 0) in the first 8 KiB.
pub fn find_multiboot_header(data: &[u8]) -> Option<MultibootHeader> {
    let limit = data.len().min(MULTIBOOT_SEARCH);
    (0..limit.saturating_sub(11)).step_by(4).find_map(|at| {
        if read_u32(data, at)? != MULTIBOOT_MAGIC {
            return None;
        }
        let flags = read_u32(data, at + 4)?;
        let checksum = read_u32(data, at + 8)?;
        if MULTIBOOT_MAGIC.wrapping_add(flags).wrapping_add(checksum) != 0 {
            return None;
        }
        let field = |i: usize| read_u32(data, at + 12 + 4 * i).unwrap_or(0);
        Some(MultibootHeader {
            file_offset: at,
            flags,
            header_addr: field(0),
            load_addr: field(1),
            load_end_addr: field(2),
            bss_end_addr: field(3),
            entry_addr: field(4),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_garbage() {
        assert!(matches!(parse(b"hello world"), Err(Error::NotElf)));
        assert!(matches!(parse(b"\x7fELF"), Err(Error::Malformed(_))));
        let bundled = crate::bundled::GUEST_ELF;
        let image = parse(bundled).unwrap();
        assert_eq!(image.class, Class::Elf64);
        for cut in [16, 64, 200, bundled.len() / 2] {
            assert!(parse(&bundled[..cut]).is_err(), "cut at {cut} must be refused");
        }
    }

    #[test]
    fn multiboot_header() {
        let mut data = vec![0u8; 64];
        let flags = 3u32;
        data[8..12].copy_from_slice(&MULTIBOOT_MAGIC.to_le_bytes());
        data[12..16].copy_from_slice(&flags.to_le_bytes());
        data[16..20].copy_from_slice(&0u32.wrapping_sub(MULTIBOOT_MAGIC + flags).to_le_bytes());
        let header = find_multiboot_header(&data).unwrap();
        assert_eq!(header.file_offset, 8);
        data[16] ^= 1;
        assert!(find_multiboot_header(&data).is_none(), "bad checksum");
    }
}
