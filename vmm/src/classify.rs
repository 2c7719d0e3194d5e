//! `popek classify`: static Popek-Goldberg classification of an image's code. Decodes the
//! executable sections of an ELF (or a flat binary) with iced-x86 and counts instructions
//! per class (see `trap::classes`), listing every sensitive-unprivileged site.

use crate::trap::classes::{properties, Class};
use iced_x86::{Decoder, DecoderOptions, Formatter, Instruction, IntelFormatter};
use object::{Object, ObjectSection, ObjectSegment, SectionFlags, SegmentFlags};
use serde::Serialize;
use std::collections::BTreeMap;

/// Classification errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not an ELF and --flat not given.
    #[error("not an ELF image (use --flat --bits 16|32|64 for a raw binary)")]
    NotElf,
    /// Unreadable ELF.
    #[error("malformed ELF: {0}")]
    Malformed(String),
    /// No executable code found.
    #[error("no executable sections or segments")]
    NoCode,
    /// Bad --bits.
    #[error("--bits must be 16, 32 or 64, not {0}")]
    Bits(u32),
}

/// How to read the image.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// A raw binary rather than an ELF.
    pub flat: bool,
    /// Decoding mode; default: from the ELF class (flat: 64).
    pub bits: Option<u32>,
    /// Address of the first byte of a flat binary.
    pub base: u64,
}

/// One sensitive, unprivileged instruction found in the code.
#[derive(Debug, Serialize)]
pub struct Site {
    pub address: u64,
    pub bytes: String,
    pub instruction: String,
    pub robin_irvine: bool,
    pub note: &'static str,
}

/// The result of a classification.
#[derive(Debug, Serialize)]
pub struct Report {
    pub bits: u32,
    pub regions: Vec<String>,
    pub code_bytes: u64,
    pub instructions: u64,
    pub by_class: BTreeMap<&'static str, u64>,
    pub control_sensitive: u64,
    pub behaviour_sensitive: u64,
    pub robin_irvine: BTreeMap<String, u64>,
    pub invalid: u64,
    /// INT3 bytes: the compilers' padding between functions (and breakpoints), kept out of
    /// the classes so they do not drown the real INT n sites.
    pub int3: u64,
    pub sites: Vec<Site>,
}

struct Region<'a> {
    name: String,
    address: u64,
    bytes: &'a [u8],
}

fn regions<'a>(data: &'a [u8], options: &Options) -> Result<(Vec<Region<'a>>, u32), Error> {
    if options.flat {
        let region = Region { name: "flat".into(), address: options.base, bytes: data };
        return Ok((vec![region], options.bits.unwrap_or(64)));
    }
    if !data.starts_with(&object::elf::ELFMAG) {
        return Err(Error::NotElf);
    }
    let file = object::File::parse(data).map_err(|e| Error::Malformed(e.to_string()))?;
    let bits = options.bits.unwrap_or(if file.is_64() { 64 } else { 32 });
    let mut found: Vec<Region<'a>> = file
        .sections()
        .filter(|s| matches!(s.flags(), SectionFlags::Elf { sh_flags } if sh_flags & u64::from(object::elf::SHF_EXECINSTR) != 0))
        .filter_map(|s| {
            let bytes = s.data().ok()?;
            Some(Region { name: s.name().unwrap_or("?").to_string(), address: s.address(), bytes })
        })
        .filter(|r| !r.bytes.is_empty())
        .collect();
    if found.is_empty() {
        // Stripped of section headers: fall back to executable segments.
        found = file
            .segments()
            .filter(|s| matches!(s.flags(), SegmentFlags::Elf { p_flags } if p_flags & object::elf::PF_X != 0))
            .filter_map(|s| {
                Some(Region {
                    name: format!("segment@{:#x}", s.address()),
                    address: s.address(),
                    bytes: s.data().ok()?,
                })
            })
            .collect();
    }
    if found.is_empty() {
        return Err(Error::NoCode);
    }
    Ok((found, bits))
}

/// Classifies every instruction in the image's code.
pub fn classify(data: &[u8], options: &Options) -> Result<Report, Error> {
    if let Some(bits) = options.bits {
        if ![16, 32, 64].contains(&bits) {
            return Err(Error::Bits(bits));
        }
    }
    let (regions, bits) = regions(data, options)?;
    let mut report = Report {
        bits,
        regions: regions.iter().map(|r| format!("{} {:#x}+{:#x}", r.name, r.address, r.bytes.len())).collect(),
        code_bytes: regions.iter().map(|r| r.bytes.len() as u64).sum(),
        instructions: 0,
        by_class: [Class::Privileged, Class::SensitiveUnprivileged, Class::Innocuous]
            .iter()
            .map(|c| (c.name(), 0))
            .collect(),
        control_sensitive: 0,
        behaviour_sensitive: 0,
        robin_irvine: BTreeMap::new(),
        invalid: 0,
        int3: 0,
        sites: Vec::new(),
    };
    let mut formatter = IntelFormatter::new();
    let mut instr = Instruction::default();
    for region in &regions {
        let mut decoder = Decoder::with_ip(bits, region.bytes, region.address, DecoderOptions::NONE);
        while decoder.can_decode() {
            decoder.decode_out(&mut instr);
            if instr.is_invalid() {
                report.invalid += 1;
                continue;
            }
            if instr.mnemonic() == iced_x86::Mnemonic::Int3 {
                report.int3 += 1;
                continue;
            }
            report.instructions += 1;
            let props = properties(&instr);
            *report.by_class.entry(props.class().name()).or_insert(0) += 1;
            report.control_sensitive += u64::from(props.control_sensitive);
            report.behaviour_sensitive += u64::from(props.behaviour_sensitive);
            if props.class() == Class::SensitiveUnprivileged {
                let mut text = String::new();
                formatter.format(&instr, &mut text);
                if props.robin_irvine {
                    *report.robin_irvine.entry(format!("{:?}", instr.mnemonic()).to_lowercase()).or_insert(0) += 1;
                }
                let start = (instr.ip() - region.address) as usize;
                let bytes = &region.bytes[start..start + instr.len()];
                report.sites.push(Site {
                    address: instr.ip(),
                    bytes: bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" "),
                    instruction: text,
                    robin_irvine: props.robin_irvine,
                    note: props.note,
                });
            }
        }
    }
    Ok(report)
}

impl Report {
    /// The human-readable table and site list.
    pub fn table(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let _ = writeln!(out, "{}-bit code, {} bytes in: {}", self.bits, self.code_bytes, self.regions.join(", "));
        let share = |n: u64| 100.0 * n as f64 / self.instructions.max(1) as f64;
        let _ = writeln!(out, "\n{:<28}{:>12}{:>9}", "class", "instructions", "share");
        for (name, n) in &self.by_class {
            let _ = writeln!(out, "{name:<28}{n:>12}{:>8.3}%", share(*n));
        }
        let _ = writeln!(
            out,
            "{:<28}{:>12}{:>8.3}%",
            "control-sensitive (any)",
            self.control_sensitive,
            share(self.control_sensitive)
        );
        let _ = writeln!(
            out,
            "{:<28}{:>12}{:>8.3}%",
            "behaviour-sensitive (any)",
            self.behaviour_sensitive,
            share(self.behaviour_sensitive)
        );
        let _ = writeln!(out, "{:<28}{:>12}", "total decoded", self.instructions);
        let _ = writeln!(out, "{:<28}{:>12}", "int3 (padding), not counted", self.int3);
        let _ = writeln!(out, "{:<28}{:>12}", "undecodable", self.invalid);
        if !self.robin_irvine.is_empty() {
            let list: Vec<String> = self.robin_irvine.iter().map(|(m, n)| format!("{m} {n}")).collect();
            let _ = writeln!(out, "\nRobin & Irvine's 17 found: {}", list.join(", "));
        }
        let _ = writeln!(out, "\nsensitive-unprivileged sites ({}):", self.sites.len());
        for site in &self.sites {
            let _ =
                writeln!(out, "  {:#012x}  {:<24} {:<32} {}", site.address, site.bytes, site.instruction, site.note);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_binary_counts() {
        // sgdt [rax]; hlt; nop; popfq; mov ds, ax; mov cr3, rax; push rax
        let code = [0x0f, 0x01, 0x00, 0xf4, 0x90, 0x9d, 0x8e, 0xd8, 0x0f, 0x22, 0xd8, 0x50];
        let r = classify(&code, &Options { flat: true, bits: Some(64), base: 0x1000 }).unwrap();
        assert_eq!(r.instructions, 7);
        assert_eq!(r.by_class["privileged"], 2);
        assert_eq!(r.by_class["sensitive-unprivileged"], 3);
        assert_eq!(r.by_class["innocuous"], 2);
        assert_eq!(r.sites[0].address, 0x1000);
        assert_eq!(r.sites[0].bytes, "0f 01 00");
        assert!(r.sites[0].instruction.starts_with("sgdt"));
        assert!(matches!(classify(b"junk", &Options::default()), Err(Error::NotElf)));
        assert!(matches!(classify(&code, &Options { flat: true, bits: Some(8), base: 0 }), Err(Error::Bits(8))));
    }

    #[test]
    fn bundled_guest() {
        let r = classify(crate::bundled::GUEST_ELF, &Options::default()).unwrap();
        assert_eq!(r.bits, 64);
        assert!(r.instructions > 1000);
        // The guest's kernel executes privileged instructions (lgdt, ltr, lidt, rdmsr...).
        assert!(r.by_class["privileged"] > 10);
        assert!(!r.sites.is_empty(), "mov to segment registers at least");
    }
}
