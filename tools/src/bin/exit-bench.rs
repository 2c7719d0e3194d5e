//! Exit-cost benchmark: the cost of one port-I/O exit handled by Popek (guest program
//! `exitloop`, ring 0, through the recorder, the bus and the null device) next to a bare
//! KVM_RUN loop doing the same (a real-mode `out` loop, nothing done per exit) in the same
//! run. Prints a Markdown table and one JSON line.

use clap::Parser;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit};
use popek_tools::{default_popek, Stats};
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

#[derive(Parser)]
#[command(about = "Port-I/O exit cost: Popek vs a bare KVM_RUN loop")]
struct Args {
    /// Exits per measurement.
    #[arg(long, default_value_t = 100_000)]
    exits: u64,
    /// Measurements per side (the median is reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    #[arg(long)]
    popek: Option<PathBuf>,
    #[arg(long)]
    json: Option<PathBuf>,
}

/// A minimal VM running real-mode code with the same loop body as the guest's `exitloop`
/// (xor, out, dec, jnz: four instructions, which matters where ring 0 is emulated):
/// `mov dx, 0x5f8; l: xor ax, ax; out dx, al; dec cx; jnz l; jmp l`.
fn bare_loop(exits: u64) -> Result<f64, String> {
    let kvm = Kvm::new().map_err(|e| format!("open /dev/kvm: {e}"))?;
    let vm = kvm.create_vm().map_err(|e| format!("create VM: {e}"))?;
    const SIZE: usize = 0x10000;
    // SAFETY: a fresh anonymous private mapping, owned for the life of this function.
    let mem = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if mem == libc::MAP_FAILED {
        return Err("mmap failed".into());
    }
    let code = [0xba, 0xf8, 0x05, 0x31, 0xc0, 0xee, 0x49, 0x75, 0xfa, 0xeb, 0xf8];
    // SAFETY: `mem` is SIZE bytes; the code fits at offset 0x1000.
    unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), (mem as *mut u8).add(0x1000), code.len()) };
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: SIZE as u64,
        userspace_addr: mem as u64,
        flags: 0,
    };
    // SAFETY: the mapping outlives the VM (both end with this function, VM first).
    unsafe { vm.set_user_memory_region(region) }.map_err(|e| format!("memory slot: {e}"))?;
    let mut vcpu = vm.create_vcpu(0).map_err(|e| format!("vCPU: {e}"))?;
    let mut sregs = vcpu.get_sregs().map_err(|e| e.to_string())?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).map_err(|e| e.to_string())?;
    let regs = kvm_bindings::kvm_regs { rip: 0x1000, rflags: 2, ..Default::default() };
    vcpu.set_regs(&regs).map_err(|e| e.to_string())?;
    // Warm up (first exits fault pages in), then time.
    for _ in 0..100 {
        vcpu.run().map_err(|e| e.to_string())?;
    }
    let start = Instant::now();
    let mut counted = 0;
    while counted < exits {
        if let VcpuExit::IoOut(0x5f8, _) = vcpu.run().map_err(|e| e.to_string())? {
            counted += 1;
        }
    }
    let ns = start.elapsed().as_nanos() as f64 / exits as f64;
    drop(vcpu);
    drop(vm);
    // SAFETY: unmapping our own mapping after the VM is gone.
    unsafe { libc::munmap(mem, SIZE) };
    Ok(ns)
}

fn popek_loop(popek: &PathBuf, exits: u64) -> Result<f64, String> {
    let out = Command::new(popek)
        .args(["run", "--no-stdin", "--cmdline", &format!("test=exitloop iterations={exits}")])
        .output()
        .map_err(|e| format!("run {}: {e}", popek.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .find_map(|l| l.split("ns_per_exit=").nth(1))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| format!("no exitloop result:\n{stdout}"))
}

fn main() {
    let args = Args::parse();
    let popek = args.popek.clone().unwrap_or_else(default_popek);
    let (mut bare, mut ours) = (Vec::new(), Vec::new());
    for _ in 0..args.runs {
        match (bare_loop(args.exits), popek_loop(&popek, args.exits)) {
            (Ok(b), Ok(p)) => {
                bare.push(b);
                ours.push(p);
            }
            (Err(e), _) | (_, Err(e)) => {
                eprintln!("exit-bench: {e}");
                std::process::exit(1);
            }
        }
    }
    let (b, p) = (Stats::of(&bare).expect("runs > 0"), Stats::of(&ours).expect("runs > 0"));
    println!("| port-I/O exit, guest ring 0 | median ns/exit | min | max |\n|---|---|---|---|");
    println!("| bare KVM_RUN loop | {:.0} | {:.0} | {:.0} |", b.median, b.min, b.max);
    println!("| Popek (recorder + bus + null device) | {:.0} | {:.0} | {:.0} |", p.median, p.min, p.max);
    println!("\nPopek / bare: {:.2}x", p.median / b.median);
    let json = serde_json::json!({ "exits": args.exits, "bare_ns": b, "popek_ns": p, "ratio": p.median / b.median })
        .to_string();
    println!("\nBENCH_JSON {json}");
    if let Some(path) = args.json {
        if let Err(e) = std::fs::write(&path, &json) {
            eprintln!("exit-bench: cannot write {}: {e}", path.display());
        }
    }
}
