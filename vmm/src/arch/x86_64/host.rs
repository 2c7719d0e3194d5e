//! Which kind of KVM the host has. Behaviour legitimately differs: on PVM (software
//! virtualization with shadow paging) guest ring 0 runs in KVM's instruction emulator and
//! ring 3 runs natively, so single-stepping ring 3 and some sensitive instructions behave
//! differently from VT-x/SVM.

use serde::Serialize;
use std::path::Path;

/// The host's KVM flavour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HostKind {
    /// kvm_pvm: software virtualization.
    Pvm,
    /// kvm_intel: VT-x.
    Vmx,
    /// kvm_amd: SVM.
    Svm,
    Unknown,
}

impl HostKind {
    /// Detects the loaded KVM vendor module.
    pub fn detect() -> HostKind {
        let loaded = |m: &str| Path::new("/sys/module").join(m).exists();
        if loaded("kvm_pvm") {
            HostKind::Pvm
        } else if loaded("kvm_intel") {
            HostKind::Vmx
        } else if loaded("kvm_amd") {
            HostKind::Svm
        } else {
            HostKind::Unknown
        }
    }

    /// Whether KVM_GUESTDBG_SINGLESTEP also steps guest user mode (on PVM the guest
    /// receives the debug trap itself at CPL 3).
    pub fn can_step_user_mode(self) -> bool {
        self != HostKind::Pvm
    }

    pub fn name(self) -> &'static str {
        match self {
            HostKind::Pvm => "pvm",
            HostKind::Vmx => "vmx",
            HostKind::Svm => "svm",
            HostKind::Unknown => "unknown",
        }
    }
}
