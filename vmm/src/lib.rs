//! Popek: a tiny KVM hypervisor for seeing and measuring virtualization.
//!
//! The data flow of a boot: [`config::VmConfig`] -> [`vm::Vm::new`] (KVM VM, memory,
//! irqchip, devices) -> [`boot::load`] (image into memory, entry state) -> vCPUs configured
//! -> [`vm::Vm::run`]. See docs/architecture.md.

pub mod api;
pub mod arch;
pub mod boot;
pub mod bundled;
pub mod classify;
pub mod config;
pub mod devices;
pub mod dirty_bitmap;
pub mod fuzzing;
pub mod memory;
pub mod migration;
pub mod parked;
pub mod seccomp;
pub mod spin;
pub mod trap;
pub mod vcpu;
pub mod vm;

/// An error and its causes on one line, "outer: inner: innermost", the way users read them.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
