//! Trap-and-emulate made visible: the taxonomy of VM exits with per-vCPU counters and a
//! bounded trace (`exits`), MSRs emulated in the VMM (`msr`), and the Popek-Goldberg
//! classes of x86 instructions (`classes`), used statically by `popek classify` and at run
//! time by the single-step audit (`audit`).

pub mod audit;
pub mod classes;
pub mod exits;
pub mod msr;
