//! The Intel MultiProcessor Specification 1.4 table: how a guest without ACPI learns how
//! many CPUs it has and where their APICs are. Written to the last KiB of base memory.

use popek_abi::layout;

/// Everything the table needs to say.
pub struct MpTable {
    pub cpus: u8,
}

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const ISA_IRQS: u8 = 16;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |s, &b| s.wrapping_add(b)))
}

impl MpTable {
    /// Size in bytes of the table for `cpus` processors.
    pub fn size(cpus: u8) -> usize {
        16 + 44 + 20 * cpus as usize + 8 + 8 + 8 * ISA_IRQS as usize + 8 * 2
    }

    /// The floating pointer followed by the configuration table, for placement at `base`.
    pub fn build(&self, base: u64) -> Vec<u8> {
        let table_addr = base + 16;
        let mut entries = Vec::new();
        let mut count: u16 = 0;
        for id in 0..self.cpus {
            let flags = 1 | if id == 0 { 2 } else { 0 }; // enabled, bootstrap
            entries.extend_from_slice(&[0, id, APIC_VERSION, flags]);
            entries.extend_from_slice(&0x0000_0600u32.to_le_bytes()); // signature: family 6
            entries.extend_from_slice(&0x0000_0201u32.to_le_bytes()); // features: FPU, APIC
            entries.extend_from_slice(&[0; 8]);
            count += 1;
        }
        entries.extend_from_slice(&[1, 0]);
        entries.extend_from_slice(b"ISA   ");
        count += 1;
        let ioapic_id = self.cpus;
        entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
        entries.extend_from_slice(&(layout::IOAPIC_BASE as u32).to_le_bytes());
        count += 1;
        for irq in 0..ISA_IRQS {
            // I/O interrupt: type INT, conforming polarity/trigger, ISA bus 0, IRQ -> INTIN.
            entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
            count += 1;
        }
        // Local interrupts: ExtINT to LINT0 and NMI to LINT1 of every APIC.
        entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
        entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
        count += 2;

        let mut header = Vec::with_capacity(44);
        header.extend_from_slice(b"PCMP");
        header.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
        header.push(4); // specification revision 1.4
        header.push(0); // checksum, below
        header.extend_from_slice(b"POPEK   ");
        header.extend_from_slice(b"POPEK VM    ");
        header.extend_from_slice(&[0; 6]); // no OEM table
        header.extend_from_slice(&count.to_le_bytes());
        header.extend_from_slice(&(layout::LAPIC_BASE as u32).to_le_bytes());
        header.extend_from_slice(&[0; 4]); // no extended table
        let mut table = header;
        table.extend_from_slice(&entries);
        table[7] = checksum(&table);

        let mut floating = Vec::with_capacity(16);
        floating.extend_from_slice(b"_MP_");
        floating.extend_from_slice(&(table_addr as u32).to_le_bytes());
        floating.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]); // 1 paragraph, rev 1.4
        floating[10] = checksum(&floating);

        floating.extend_from_slice(&table);
        floating
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_size() {
        for cpus in [1u8, 2, 32] {
            let bytes = MpTable { cpus }.build(layout::MPTABLE);
            assert_eq!(bytes.len(), MpTable::size(cpus));
            assert_eq!(checksum(&bytes[..16]), 0, "floating pointer sums to zero");
            assert_eq!(checksum(&bytes[16..]), 0, "configuration table sums to zero");
            let processors = bytes[16 + 44..].chunks(20).take(cpus as usize).filter(|e| e[0] == 0).count();
            assert_eq!(processors, cpus as usize);
            assert!(bytes.len() <= (layout::LOW_MEMORY_END - layout::MPTABLE) as usize);
        }
    }
}
