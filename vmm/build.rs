//! Builds the bundled guest and the firmware for `x86_64-unknown-none` with a nested cargo,
//! so that `popek` carries both inside its binary and a new user needs no paths. The nested
//! build uses its own target directory (the outer one is locked by the running build) and a
//! clean environment (the outer build's flags and wrappers are for the host).

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "x86_64-unknown-none";
const FIRMWARE_BASE: u64 = 0xffff_0000;
const FIRMWARE_SIZE: usize = 0x1_0000;

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest.parent().expect("vmm/ has a parent").to_path_buf();
    let out = PathBuf::from(env::var("OUT_DIR").expect("set by cargo"));
    for dir in ["guest", "firmware", "abi", ".cargo"] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    ensure_target_installed();

    let target_dir = root.join("target").join("embedded");
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .current_dir(&root)
        .args(["build", "--release", "--target", TARGET])
        .args(["-p", "popek-guest", "-p", "popek-firmware"])
        .arg("--target-dir")
        .arg(&target_dir);
    for (key, _) in env::vars() {
        let inherited_flag = key.starts_with("CARGO_ENCODED_RUSTFLAGS")
            || key == "RUSTFLAGS"
            || key.starts_with("RUSTC_WRAPPER")
            || key.starts_with("RUSTC_WORKSPACE_WRAPPER")
            || key == "CARGO_TARGET_DIR"
            || key == "CARGO_BUILD_TARGET"
            || key.starts_with("CARGO_PROFILE_")
            || key == "CARGO_LLVM_COV"
            || key == "RUSTDOCFLAGS";
        if inherited_flag {
            command.env_remove(&key);
        }
    }
    let status = command.status().expect("run the nested cargo build");
    assert!(status.success(), "building the guest and firmware for {TARGET} failed");

    let built = target_dir.join(TARGET).join("release");
    let guest = built.join("popek-guest");
    fs::copy(&guest, out.join("guest.elf")).expect("copy the guest ELF");
    let rom = flatten_firmware(&built.join("popek-firmware"));
    fs::write(out.join("firmware.bin"), rom).expect("write firmware.bin");
}

/// A fresh machine may lack the bare-metal target; `rustup` adds it (offline builds that
/// already have it skip this).
fn ensure_target_installed() {
    let sysroot = Command::new(env::var("RUSTC").unwrap_or_else(|_| "rustc".into()))
        .args(["--print", "sysroot"])
        .output()
        .expect("run rustc --print sysroot");
    let sysroot = String::from_utf8_lossy(&sysroot.stdout).trim().to_string();
    if Path::new(&sysroot).join("lib/rustlib").join(TARGET).exists() {
        return;
    }
    let status = Command::new("rustup").args(["target", "add", TARGET]).status();
    assert!(
        matches!(status, Ok(s) if s.success()),
        "the {TARGET} Rust target is missing and `rustup target add {TARGET}` failed"
    );
}

/// Lays the firmware ELF's loadable segments out as the 64 KiB ROM image that ends at 4 GiB.
fn flatten_firmware(elf_path: &Path) -> Vec<u8> {
    use object::read::elf::{ElfFile64, ProgramHeader};
    use object::Endianness;
    let data = fs::read(elf_path).expect("read the firmware ELF");
    let elf = ElfFile64::<Endianness>::parse(&*data).expect("parse the firmware ELF");
    let endian = elf.endian();
    let mut rom = vec![0xffu8; FIRMWARE_SIZE];
    for segment in elf.elf_program_headers() {
        if segment.p_type(endian) != object::elf::PT_LOAD {
            continue;
        }
        let paddr = segment.p_paddr(endian);
        let bytes = segment.data(endian, &*data).expect("firmware segment data");
        let offset = paddr.checked_sub(FIRMWARE_BASE).expect("firmware segment below the ROM base") as usize;
        assert!(offset + bytes.len() <= FIRMWARE_SIZE, "firmware segment past 4 GiB");
        rom[offset..offset + bytes.len()].copy_from_slice(bytes);
    }
    rom
}
