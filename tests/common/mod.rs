//! Shared helpers for the integration tests: run the real `popek` binary against real KVM,
//! and build small kernel images (ELF32 Multiboot, ELF64) on the fly.
#![allow(dead_code)]

pub mod procs;
pub mod wire;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Path of the binary under test.
pub fn popek_bin() -> &'static str {
    env!("CARGO_BIN_EXE_popek")
}

/// These tests need KVM and fail without it: a run that skipped them would say nothing.
pub fn require_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: Popek's tests drive real KVM and fail without it (by design)"
    );
}

/// Result of one `popek` run.
pub struct Run {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from_output(output: Output) -> Run {
        use std::os::unix::process::ExitStatusExt;
        let status = output.status.code().unwrap_or_else(|| 128 + output.status.signal().unwrap_or(0));
        Run {
            status,
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// Asserts the exit status, showing both streams if it differs.
    pub fn expect_status(&self, status: i32) -> &Self {
        assert_eq!(self.status, status, "unexpected exit status\nstdout:\n{}\nstderr:\n{}", self.stdout, self.stderr);
        self
    }

    pub fn expect_stdout(&self, text: &str) -> &Self {
        assert!(
            self.stdout.contains(text),
            "stdout lacks {text:?}\nstdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        self
    }

    pub fn expect_stderr(&self, text: &str) -> &Self {
        assert!(
            self.stderr.contains(text),
            "stderr lacks {text:?}\nstdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        self
    }
}

/// Runs `popek ARGS` with `stdin` as input; kills it after 60 s (a hang is a failure).
pub fn popek(args: &[&str], stdin: Option<&[u8]>) -> Run {
    run_command(Command::new(popek_bin()).args(args), stdin)
}

/// Runs any command with the same time limit and capture as [`popek`].
pub fn run_command(command: &mut Command, stdin: Option<&[u8]>) -> Run {
    let mut child = command
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start popek");
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin pipe");
        pipe.write_all(input).expect("write guest input");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().expect("poll popek").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let run = Run::from_output(child.wait_with_output().expect("collect output"));
            panic!("popek did not finish in 60 s\nstdout:\n{}\nstderr:\n{}", run.stdout, run.stderr);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Run::from_output(child.wait_with_output().expect("collect output"))
}

/// A scratch directory removed at drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("popek-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        Scratch(dir)
    }

    pub fn file(&self, name: &str, bytes: &[u8]) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, bytes).expect("write scratch file");
        path.display().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An ELF32 (EM_386) image with one PT_LOAD segment of `bytes` at `paddr`.
pub fn elf32(paddr: u32, entry: u32, bytes: &[u8]) -> Vec<u8> {
    const SEGMENT_OFFSET: u32 = 0x100;
    let mut elf = vec![0u8; SEGMENT_OFFSET as usize];
    elf[..16].copy_from_slice(&[0x7f, b'E', b'L', b'F', 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    let put16 = |elf: &mut Vec<u8>, at: usize, v: u16| elf[at..at + 2].copy_from_slice(&v.to_le_bytes());
    put16(&mut elf, 16, 2); // ET_EXEC
    put16(&mut elf, 18, 3); // EM_386
    let put32 = |elf: &mut Vec<u8>, at: usize, v: u32| elf[at..at + 4].copy_from_slice(&v.to_le_bytes());
    put32(&mut elf, 20, 1);
    put32(&mut elf, 24, entry);
    put32(&mut elf, 28, 52); // e_phoff
    put16(&mut elf, 40, 52); // e_ehsize
    put16(&mut elf, 42, 32); // e_phentsize
    put16(&mut elf, 44, 1); // e_phnum
    let ph = 52;
    put32(&mut elf, ph, 1); // PT_LOAD
    put32(&mut elf, ph + 4, SEGMENT_OFFSET);
    put32(&mut elf, ph + 8, paddr);
    put32(&mut elf, ph + 12, paddr);
    put32(&mut elf, ph + 16, bytes.len() as u32);
    put32(&mut elf, ph + 20, bytes.len() as u32);
    put32(&mut elf, ph + 24, 7);
    put32(&mut elf, ph + 28, 4);
    elf.extend_from_slice(bytes);
    elf
}

/// An ELF64 (EM_X86_64) image with one PT_LOAD segment and no PVH note.
pub fn elf64(paddr: u64, bytes: &[u8]) -> Vec<u8> {
    const SEGMENT_OFFSET: u64 = 0x100;
    let mut elf = vec![0u8; SEGMENT_OFFSET as usize];
    elf[..16].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    let put = |elf: &mut Vec<u8>, at: usize, v: &[u8]| elf[at..at + v.len()].copy_from_slice(v);
    put(&mut elf, 16, &2u16.to_le_bytes());
    put(&mut elf, 18, &62u16.to_le_bytes());
    put(&mut elf, 20, &1u32.to_le_bytes());
    put(&mut elf, 24, &paddr.to_le_bytes());
    put(&mut elf, 32, &64u64.to_le_bytes()); // e_phoff
    put(&mut elf, 52, &64u16.to_le_bytes());
    put(&mut elf, 54, &56u16.to_le_bytes());
    put(&mut elf, 56, &1u16.to_le_bytes());
    let ph = 64;
    put(&mut elf, ph, &1u32.to_le_bytes());
    put(&mut elf, ph + 4, &7u32.to_le_bytes());
    put(&mut elf, ph + 8, &SEGMENT_OFFSET.to_le_bytes());
    put(&mut elf, ph + 16, &paddr.to_le_bytes());
    put(&mut elf, ph + 24, &paddr.to_le_bytes());
    put(&mut elf, ph + 32, &(bytes.len() as u64).to_le_bytes());
    put(&mut elf, ph + 40, &(bytes.len() as u64).to_le_bytes());
    elf.extend_from_slice(bytes);
    elf
}

/// A tiny Multiboot v1 kernel, assembled here with iced-x86: it checks EAX holds the
/// bootloader magic, prints "multiboot: " + its command line + " module=" + the first
/// module's bytes, and exits through port 0xf4 with 0x21 (0x55 if the magic was wrong).
pub fn multiboot_kernel(load: u32) -> Vec<u8> {
    use iced_x86::code_asm::*;
    const MAGIC: u32 = 0x1bad_b002;
    const FLAGS: u32 = 0x3; // page-align modules, want memory info
    const DATA: u32 = 0x400; // offset of the strings in the segment
    let prefix = b"multiboot: \0";
    let module_tag = b" module=\0";
    let prefix_addr = load + DATA;
    let tag_addr = prefix_addr + prefix.len() as u32;

    let mut a = CodeAssembler::new(32).expect("32-bit assembler");
    let mut bad = a.create_label();
    let mut print = a.create_label();
    let mut print_loop = a.create_label();
    let mut print_done = a.create_label();
    let mut no_module = a.create_label();
    let mut module_loop = a.create_label();
    (|| -> Result<(), IcedError> {
        a.mov(esp, load + 0x2000)?; // Multiboot leaves ESP undefined
        a.cmp(eax, 0x2bad_b002u32)?;
        a.jne(bad)?;
        a.mov(dx, 0x3f8u32)?;
        a.mov(esi, prefix_addr)?;
        a.call(print)?;
        a.mov(esi, dword_ptr(ebx + 16))?; // cmdline
        a.call(print)?;
        a.test(dword_ptr(ebx), 8u32)?; // flags: modules valid
        a.jz(no_module)?;
        a.cmp(dword_ptr(ebx + 20), 0u32)?;
        a.je(no_module)?;
        a.mov(esi, tag_addr)?;
        a.call(print)?;
        a.mov(edi, dword_ptr(ebx + 24))?; // mods_addr
        a.mov(esi, dword_ptr(edi))?; // mod_start
        a.mov(ecx, dword_ptr(edi + 4))?; // mod_end
        a.set_label(&mut module_loop)?;
        a.cmp(esi, ecx)?;
        a.jae(no_module)?;
        a.mov(al, byte_ptr(esi))?;
        a.out(dx, al)?;
        a.inc(esi)?;
        a.jmp(module_loop)?;
        a.set_label(&mut no_module)?;
        a.mov(al, 0x0au32)?;
        a.out(dx, al)?;
        a.mov(dx, 0xf4u32)?;
        a.mov(al, 0x21u32)?;
        a.out(dx, al)?;
        a.hlt()?;
        a.set_label(&mut bad)?;
        a.mov(dx, 0xf4u32)?;
        a.mov(al, 0x55u32)?;
        a.out(dx, al)?;
        a.hlt()?;
        // print: NUL-terminated string at ESI to port DX.
        a.set_label(&mut print)?;
        a.nop()?;
        a.set_label(&mut print_loop)?;
        a.mov(al, byte_ptr(esi))?;
        a.test(al, al)?;
        a.jz(print_done)?;
        a.out(dx, al)?;
        a.inc(esi)?;
        a.jmp(print_loop)?;
        a.set_label(&mut print_done)?;
        a.ret()?;
        Ok(())
    })()
    .expect("assemble the Multiboot test kernel");

    let header_len = 12u32;
    let code = a.assemble(u64::from(load + header_len)).expect("assemble");
    let mut segment = Vec::new();
    segment.extend_from_slice(&MAGIC.to_le_bytes());
    segment.extend_from_slice(&FLAGS.to_le_bytes());
    segment.extend_from_slice(&0u32.wrapping_sub(MAGIC.wrapping_add(FLAGS)).to_le_bytes());
    segment.extend_from_slice(&code);
    assert!(segment.len() <= DATA as usize, "test kernel code overlaps its data");
    segment.resize(DATA as usize, 0);
    segment.extend_from_slice(prefix);
    segment.extend_from_slice(module_tag);
    elf32(load, load + header_len, &segment)
}
