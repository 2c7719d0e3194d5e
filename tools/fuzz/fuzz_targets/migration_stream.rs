//! A migration stream as a destination receives it: frames, and every payload decoded.
//! The input's meaning and the checks are documented at `popek::fuzzing::migration_stream`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // A refusal is a correct answer; only a panic (or a hang) is a finding.
    let _ = popek::fuzzing::migration_stream(data);
});
