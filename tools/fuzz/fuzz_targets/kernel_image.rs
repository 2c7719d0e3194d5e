//! A kernel image (PVH ELF64, Multiboot ELF32) loaded into guest RAM, direct and firmware boot.
//! The input's meaning and the checks are documented at `popek::fuzzing::kernel_image`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // A refusal is a correct answer; only a panic (or a hang) is a finding.
    let _ = popek::fuzzing::kernel_image(data);
});
