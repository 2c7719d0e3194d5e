//! Hypercall request blocks and port writes, decoded and served against guest RAM.
//! The input's meaning and the checks are documented at `popek::fuzzing::hypercall`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // A refusal is a correct answer; only a panic (or a hang) is a finding.
    let _ = popek::fuzzing::hypercall(data);
});
