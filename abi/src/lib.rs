//! The contract between the Popek VMM and the software it runs (the bundled guest and the
//! firmware). Both sides depend on this crate, so every port number, address and magic value
//! has exactly one definition. `no_std`, no dependencies: it builds for the host and for
//! `x86_64-unknown-none` alike.
#![no_std]

/// The ABI version; bumped on any incompatible change to anything in this crate.
pub const ABI_VERSION: u32 = 1;

/// I/O ports the VMM emulates.
pub mod ports {
    /// COM1, a 16550A UART (QEMU and PC compatible).
    pub const SERIAL_COM1: u16 = 0x3f8;
    /// Number of registers of a 16550 UART.
    pub const SERIAL_LEN: u16 = 8;
    /// QEMU `isa-debug-exit` compatible exit port: writing `v` ends the VM, and `popek`
    /// exits with status `(v << 1) | 1`.
    pub const DEBUG_EXIT: u16 = 0xf4;
    /// i8042 data port.
    pub const I8042_DATA: u16 = 0x60;
    /// i8042 command/status port; writing [`I8042_CMD_RESET`] requests a reset.
    pub const I8042_COMMAND: u16 = 0x64;
    /// i8042 command: pulse the CPU reset line.
    pub const I8042_CMD_RESET: u8 = 0xfe;
    /// Hypercall port: a 32-bit `out` of a request block's physical address makes one call.
    pub const HYPERCALL: u16 = 0x5f0;
    /// Doorbell port: any write is counted by the VMM without stopping the vCPU (ioeventfd).
    pub const DOORBELL: u16 = 0x5f4;
    /// A port whose device does nothing: the floor cost of a port-I/O exit, for benchmarks.
    pub const NULL: u16 = 0x5f8;
}

/// Guest-physical memory layout used by Popek's loaders. The guest does not depend on most
/// of these (it gets addresses from PVH start_info), but the firmware does.
pub mod layout {
    /// Where the VMM writes the [`FirmwareHandoff`](super::FirmwareHandoff) block.
    pub const FIRMWARE_HANDOFF: u64 = 0x5000;
    /// Where the VMM writes the PVH `hvm_start_info`.
    pub const PVH_START_INFO: u64 = 0x6000;
    /// Where the VMM writes the PVH memory map (right after start_info).
    pub const PVH_MEMMAP: u64 = 0x6100;
    /// Where the VMM writes the PVH module list.
    pub const PVH_MODLIST: u64 = 0x6f00;
    /// Where the VMM writes the Multiboot information structure and its tables.
    pub const MULTIBOOT_INFO: u64 = 0x7000;
    /// MP floating pointer and configuration table: the last KiB of base memory, the first
    /// place the MP specification tells an OS to look.
    pub const MPTABLE: u64 = 0x9fc00;
    /// End of conventional ("low") memory.
    pub const LOW_MEMORY_END: u64 = 0xa0000;
    /// The kernel command line.
    pub const CMDLINE: u64 = 0x20000;
    /// Largest command line accepted, terminating NUL included.
    pub const CMDLINE_MAX: usize = 4096;
    /// Start of "high" memory: kernels are loaded at or above this.
    pub const HIGH_MEMORY: u64 = 0x10_0000;
    /// Start of the 32-bit MMIO hole (LAPIC, IOAPIC, firmware ROM); RAM beyond this
    /// continues at 4 GiB.
    pub const MMIO_HOLE_START: u64 = 0xc000_0000;
    /// First address above 4 GiB.
    pub const FOUR_GIB: u64 = 0x1_0000_0000;
    /// Size of the firmware ROM, which ends at 4 GiB.
    pub const FIRMWARE_SIZE: u64 = 0x1_0000;
    /// Base of the firmware ROM.
    pub const FIRMWARE_BASE: u64 = FOUR_GIB - FIRMWARE_SIZE;
    /// Default local APIC base.
    pub const LAPIC_BASE: u64 = 0xfee0_0000;
    /// Default IOAPIC base.
    pub const IOAPIC_BASE: u64 = 0xfec0_0000;
}

/// Magic value of a valid [`FirmwareHandoff`] ("PopekFW1" little endian).
pub const FIRMWARE_HANDOFF_MAGIC: u64 = u64::from_le_bytes(*b"PopekFW1");

/// What the VMM leaves at [`layout::FIRMWARE_HANDOFF`] for the firmware: where to jump and
/// with what in EBX. The firmware checks `magic` and refuses to jump otherwise.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FirmwareHandoff {
    /// [`FIRMWARE_HANDOFF_MAGIC`].
    pub magic: u64,
    /// 32-bit physical entry point of the kernel (PVH `XEN_ELFNOTE_PHYS32_ENTRY`).
    pub entry: u32,
    /// Value for EBX at entry: the physical address of the PVH `hvm_start_info`.
    pub ebx: u32,
}

/// Byte offsets within [`FirmwareHandoff`], for the firmware's assembly.
pub mod handoff_offsets {
    /// Offset of `magic`.
    pub const MAGIC: u64 = 0;
    /// Offset of `entry`.
    pub const ENTRY: u64 = 8;
    /// Offset of `ebx`.
    pub const EBX: u64 = 12;
}

/// The paravirtual hypercall interface (see docs/hypercall.md).
pub mod hypercall {
    /// Version of the hypercall ABI, returned by [`VERSION`].
    pub const VERSION_1: u64 = 1;

    /// A call: the guest fills one of these (8-byte aligned, below 4 GiB), sets `ret` to
    /// anything, and writes its physical address with a 32-bit `out` to
    /// [`super::ports::HYPERCALL`]. When the `out` completes, `ret` holds the result: a
    /// value >= 0, or a negative errno (-[`ENOSYS`], -[`EFAULT`], -[`EINVAL`]).
    #[repr(C, align(8))]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Request {
        pub nr: u64,
        pub args: [u64; 4],
        pub ret: i64,
    }

    /// Size of [`Request`] in bytes.
    pub const REQUEST_SIZE: usize = 48;
    /// Byte offset of `ret` in [`Request`].
    pub const RET_OFFSET: usize = 40;

    // Call numbers.
    /// -> ABI version.
    pub const VERSION: u64 = 0;
    /// -> feature bits (`FEATURE_*`).
    pub const FEATURES: u64 = 1;
    /// -> 0. The null call, for latency.
    pub const PING: u64 = 2;
    /// (gpa, len) -> len. Writes guest bytes to the console; len <= [`CONSOLE_WRITE_MAX`].
    pub const CONSOLE_WRITE: u64 = 3;
    /// (status) -> does not return: ends the VM like the exit port.
    pub const EXIT: u64 = 4;
    /// (clock) -> nanoseconds of [`CLOCK_MONOTONIC`] or [`CLOCK_REALTIME`] on the host.
    pub const CLOCK: u64 = 5;
    /// (ns) -> 0 after the vCPU slept ns (<= [`SLEEP_MAX_NS`]) in the VMM, or the ns left
    /// when the VMM needed the vCPU back first (a pause for migration).
    pub const SLEEP: u64 = 6;
    /// -> 0 after the vCPU thread yielded the host CPU.
    pub const YIELD: u64 = 7;
    /// (gpa, len) -> len. Fills guest memory with host random bytes; len <= [`RANDOM_MAX`].
    pub const RANDOM: u64 = 8;
    /// (gpa, npages) -> pages newly marked free. Page-aligned; migration may skip them.
    pub const FREE_PAGE_HINT: u64 = 9;
    /// (gpa, npages) -> pages newly marked in use again (the reverse of a hint).
    pub const FREE_PAGE_UNHINT: u64 = 10;
    /// -> the VM generation: 0 at boot, +1 each time the VM is restored after migration.
    pub const GENERATION: u64 = 11;
    /// (gpa) -> 0. The VMM keeps the generation (a u64, 8-byte aligned) at gpa up to date,
    /// so the guest learns of a migration with a plain load, no exit.
    pub const REGISTER_GENERATION: u64 = 12;
    /// -> doorbell writes the VMM has seen (they are counted asynchronously).
    pub const DOORBELL_COUNT: u64 = 13;
    /// -> exits to the VMM so far, all vCPUs, this call's own included: a guest learns
    /// whether an instruction reached the VMM from the difference around it, minus one.
    pub const EXIT_COUNT: u64 = 14;
    /// Highest call number.
    pub const LAST: u64 = EXIT_COUNT;

    // Feature bits returned by FEATURES.
    pub const FEATURE_CONSOLE: u64 = 1 << 0;
    pub const FEATURE_CLOCK: u64 = 1 << 1;
    pub const FEATURE_SLEEP: u64 = 1 << 2;
    pub const FEATURE_RANDOM: u64 = 1 << 3;
    pub const FEATURE_FREE_PAGE_HINTS: u64 = 1 << 4;
    pub const FEATURE_GENERATION: u64 = 1 << 5;
    pub const FEATURE_DOORBELL: u64 = 1 << 6;

    /// CLOCK argument: host CLOCK_MONOTONIC.
    pub const CLOCK_MONOTONIC: u64 = 0;
    /// CLOCK argument: host CLOCK_REALTIME (ns since the Unix epoch).
    pub const CLOCK_REALTIME: u64 = 1;

    /// Limits.
    pub const CONSOLE_WRITE_MAX: u64 = 64 * 1024;
    pub const RANDOM_MAX: u64 = 64 * 1024;
    pub const SLEEP_MAX_NS: u64 = 10_000_000_000;
    pub const PAGE_SIZE: u64 = 4096;

    // Error numbers (Linux values); calls return their negation.
    pub const EFAULT: i64 = 14;
    pub const EINVAL: i64 = 22;
    pub const ENOSYS: i64 = 38;
}

/// CPUID leaf of Popek's features: EAX = hypercall feature bits, EBX = hypercall port,
/// ECX = hypercall ABI version, EDX = doorbell port.
pub const CPUID_FEATURES_LEAF: u32 = 0x4000_0001;

/// CPUID leaf where Popek's hypervisor signature lives.
pub const CPUID_SIGNATURE_LEAF: u32 = 0x4000_0000;
/// The signature in EBX, ECX, EDX of [`CPUID_SIGNATURE_LEAF`].
pub const CPUID_SIGNATURE: [u8; 12] = *b"PopekPopekVM";

/// Status values the bundled guest writes to [`ports::DEBUG_EXIT`]; `popek` exits with
/// `(v << 1) | 1`, so these become exit codes 1 (0 -> success), 3, 5, ...
pub mod exit_status {
    /// The test program passed.
    pub const SUCCESS: u8 = 0;
    /// The test program failed.
    pub const FAILURE: u8 = 1;
    /// The guest did not understand its command line.
    pub const BAD_COMMAND_LINE: u8 = 2;
    /// The guest took an unexpected exception.
    pub const EXCEPTION: u8 = 3;
    /// The firmware found no valid hand-off block (exit code 9).
    pub const FIRMWARE_NO_HANDOFF: u8 = 4;
}
