//! Control-socket input: request lines parsed as the API socket does.
//! The input's meaning and the checks are documented at `popek::fuzzing::control_request`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // A refusal is a correct answer; only a panic (or a hang) is a finding.
    let _ = popek::fuzzing::control_request(data);
});
