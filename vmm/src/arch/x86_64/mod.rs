//! x86-64 set-up, one file per architectural concern.
pub mod cpuid;
pub mod host;
pub mod mptable;
pub mod regs;
