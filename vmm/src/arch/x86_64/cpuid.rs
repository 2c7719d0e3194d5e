//! The guest's CPUID: what KVM supports, with per-vCPU APIC IDs and Popek's hypervisor
//! signature at 0x40000000 (which the bundled guest uses to detect Popek).

use kvm_bindings::kvm_cpuid_entry2;
use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use popek_abi::{hypercall, ports, CPUID_FEATURES_LEAF, CPUID_SIGNATURE, CPUID_SIGNATURE_LEAF};

/// CPUID errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// KVM_GET_SUPPORTED_CPUID failed.
    #[error("Cannot read KVM's supported CPUID")]
    Supported(#[source] kvm_ioctls::Error),
}

/// Reads KVM's supported CPUID once; each vCPU gets a patched copy from [`for_vcpu`].
pub fn supported(kvm: &kvm_ioctls::Kvm) -> Result<CpuId, Error> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(Error::Supported)
}

const HYPERVISOR_PRESENT: u32 = 1 << 31;

/// The CPUID for vCPU `id` of `count`.
pub fn for_vcpu(base: &CpuId, id: u32, count: u32) -> CpuId {
    let mut cpuid = base.clone();
    let signature = |i: usize| {
        u32::from_le_bytes([
            CPUID_SIGNATURE[i * 4],
            CPUID_SIGNATURE[i * 4 + 1],
            CPUID_SIGNATURE[i * 4 + 2],
            CPUID_SIGNATURE[i * 4 + 3],
        ])
    };
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                // EBX[31:24] initial APIC ID, EBX[23:16] logical processors per package.
                entry.ebx = (entry.ebx & 0x0000_ffff) | (id << 24) | ((count.min(255)) << 16);
                entry.ecx |= HYPERVISOR_PRESENT;
                if count > 1 {
                    entry.edx |= 1 << 28; // HTT: the logical count above is valid
                }
            }
            0xb | 0x1f => entry.edx = id, // x2APIC ID
            CPUID_SIGNATURE_LEAF => {
                entry.eax = CPUID_FEATURES_LEAF;
                entry.ebx = signature(0);
                entry.ecx = signature(1);
                entry.edx = signature(2);
            }
            _ => {}
        }
    }
    // Popek's features leaf replaces KVM's paravirt features leaf (0x40000001): the guest
    // sees Popek, not KVM, at 0x40000000.
    let features = kvm_cpuid_entry2 {
        function: CPUID_FEATURES_LEAF,
        eax: crate::devices::hypercall::FEATURES as u32,
        ebx: u32::from(ports::HYPERCALL),
        ecx: hypercall::VERSION_1 as u32,
        edx: u32::from(ports::DOORBELL),
        ..Default::default()
    };
    match cpuid.as_mut_slice().iter_mut().find(|e| e.function == CPUID_FEATURES_LEAF) {
        Some(entry) => *entry = features,
        None => {
            if cpuid.push(features).is_err() {
                log::warn!("no room for Popek's CPUID features leaf");
            }
        }
    }
    if !cpuid.as_slice().iter().any(|e| e.function == CPUID_SIGNATURE_LEAF) {
        let signature_entry = kvm_cpuid_entry2 {
            function: CPUID_SIGNATURE_LEAF,
            eax: CPUID_FEATURES_LEAF,
            ebx: signature(0),
            ecx: signature(1),
            edx: signature(2),
            ..Default::default()
        };
        if cpuid.push(signature_entry).is_err() {
            log::warn!("no room for Popek's CPUID signature leaf");
        }
    }
    cpuid
}
