//! A machine-state payload: parsed, then restored into the VMM's own devices (no KVM).
//! The input's meaning and the checks are documented at `popek::fuzzing::machine_state`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // A refusal is a correct answer; only a panic (or a hang) is a finding.
    let _ = popek::fuzzing::machine_state(data);
});
