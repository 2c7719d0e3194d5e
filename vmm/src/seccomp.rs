//! Seccomp filters: each kind of thread runs under its own allow-list of system calls.
//!
//! Why: the guest and the migration peer are untrusted (docs/security.md). If a bug ever
//! let either take over a thread, the filter bounds what that thread can ask of the host:
//! a vCPU thread can drive KVM and write the console but cannot open a file, create a
//! socket or run a program; no thread can `execve`, `ptrace`, load modules or mount.
//!
//! Filters stack: a thread starts under its parent's filter and narrows it. `install`
//! puts the VMM filter on the main thread before any other thread exists, so every later
//! thread is at most as free as the main thread; each thread then calls [`enter`] with its
//! own kind. A forbidden call traps (SIGSYS); the handler names the thread kind and the
//! call on stderr and ends the process with [`VIOLATION_STATUS`], so a filter that is too
//! tight shows up as a clear message in a test, never as a silent misbehaviour.

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::OnceLock;

/// `popek run`'s exit status when a thread made a forbidden system call.
pub const VIOLATION_STATUS: i32 = 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot build the {kind} seccomp filter: {detail}")]
    Build { kind: &'static str, detail: String },
    #[error("cannot install the {kind} seccomp filter: {detail} (--seccomp off runs without filters)")]
    Install { kind: &'static str, detail: String },
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(String),
}

/// What a forbidden system call does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The call traps and the process ends with a message (the default).
    Enforce,
    /// The call goes through and the kernel logs it (audit log / dmesg): for finding what
    /// a filter misses without stopping the VM.
    Log,
    /// No filters at all.
    Off,
}

/// The thread kinds, each with its own allow-list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ThreadKind {
    /// The main thread: builds the VM, serves control requests, runs migrations (opens
    /// files and sockets, creates VMs, userfaultfd).
    Vmm = 1,
    /// A vCPU: KVM_RUN and the device models it calls into.
    Vcpu = 2,
    /// The control socket, the event loop and the console input: accept, read, write.
    Api = 3,
    /// Migration workers (post-copy receivers, fault and urgent threads, the throttle):
    /// sockets already open, userfaultfd ioctls, no new files.
    Migration = 4,
}

impl ThreadKind {
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vmm => "vmm",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Api => "api",
            ThreadKind::Migration => "migration",
        }
    }

    fn from_u8(v: u8) -> Option<ThreadKind> {
        KINDS.into_iter().find(|k| *k as u8 == v)
    }

    pub fn parse(text: &str) -> Option<ThreadKind> {
        KINDS.into_iter().find(|k| k.name() == text)
    }
}

struct Settings {
    /// Test hook (`popek run --seccomp-probe KIND`): the first thread of this kind makes a
    /// system call its list forbids right after entering its filter.
    probe: Option<ThreadKind>,
    /// Each kind's filters, compiled once at start-up: a destination starts its vCPU
    /// threads inside the downtime, and compiling there would cost more than installing.
    programs: Vec<(ThreadKind, Vec<BpfProgram>)>,
}

static SETTINGS: OnceLock<Settings> = OnceLock::new();

const KINDS: [ThreadKind; 4] = [ThreadKind::Vmm, ThreadKind::Vcpu, ThreadKind::Api, ThreadKind::Migration];

/// The filters `kind` installs, in order (the narrow kinds' file refusal first).
fn compile(kind: ThreadKind, mode: Mode) -> Result<Vec<BpfProgram>, Error> {
    let mut programs = Vec::new();
    if kind != ThreadKind::Vmm {
        programs.push(files_refused(kind, mode)?);
    }
    programs.push(program(kind, mode)?);
    Ok(programs)
}

thread_local! {
    /// This thread's kind, for the SIGSYS handler's message (0: not entered).
    static KIND: Cell<u8> = const { Cell::new(0) };
}

/// Installs the SIGSYS handler and the VMM filter on the calling (main) thread. Call it
/// once, before any other thread starts.
pub fn install(mode: Mode, probe: Option<ThreadKind>) -> Result<(), Error> {
    let mut programs = Vec::new();
    if mode != Mode::Off {
        for kind in KINDS {
            programs.push((kind, compile(kind, mode)?));
        }
    }
    let _ = SETTINGS.set(Settings { probe, programs });
    if mode != Mode::Off {
        vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, on_sigsys)
            .map_err(|e| Error::Handler(e.to_string()))?;
    }
    enter(ThreadKind::Vmm)
}

/// Narrows the calling thread to `kind`'s allow-list (nothing with `--seccomp off`).
pub fn enter(kind: ThreadKind) -> Result<(), Error> {
    let Some(settings) = SETTINGS.get() else {
        return Ok(()); // the library used without `install` (unit tests, tools)
    };
    KIND.with(|k| k.set(kind as u8));
    let programs = settings.programs.iter().find(|(k, _)| *k == kind).map(|(_, p)| p.as_slice()).unwrap_or(&[]);
    for program in programs {
        seccompiler::apply_filter(program).map_err(|e| Error::Install { kind: kind.name(), detail: e.to_string() })?;
    }
    if settings.probe == Some(kind) {
        probe(kind);
    }
    Ok(())
}

/// `enter`, for a thread that has no way to report an error: a thread that cannot be
/// confined must not run, so the process ends with the reason.
pub fn enter_or_exit(kind: ThreadKind) {
    if let Err(e) = enter(kind) {
        eprintln!("popek: error: {e}");
        std::process::exit(VIOLATION_STATUS);
    }
}

/// Makes one call `kind` may not make, harmless if it went through: a filter that lets
/// it pass says so and the thread goes on.
fn probe(kind: ThreadKind) {
    let (name, result) = match kind {
        // A vCPU has no business with sockets (the VMM thread opens them for migration).
        ThreadKind::Vcpu => ("socket", forbidden_socket()),
        // The control socket's threads never open files (the VMM thread does): refused
        // (EACCES), and no sockets of their own either: stopped.
        ThreadKind::Api => {
            eprintln!("popek: seccomp probe: api thread: openat gave: {}", forbidden_open());
            ("socket", forbidden_socket())
        }
        // No thread may run a program: execve(NULL) fails with EFAULT if it gets through.
        ThreadKind::Vmm | ThreadKind::Migration => ("execve", forbidden_execve()),
    };
    eprintln!("popek: seccomp probe: {} thread: {name} was allowed ({result})", kind.name());
}

fn forbidden_socket() -> std::io::Error {
    // SAFETY: socket(2) takes no pointers; a descriptor it returns is closed at once.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd >= 0 {
        // SAFETY: fd was just returned by socket(2) and is owned here.
        unsafe { libc::close(fd) };
    }
    std::io::Error::last_os_error()
}

fn forbidden_open() -> std::io::Error {
    std::fs::File::open("/dev/null").err().unwrap_or_else(|| std::io::Error::other("opened"))
}

fn forbidden_execve() -> std::io::Error {
    // SAFETY: a NULL path makes execve fail with EFAULT before it replaces anything.
    unsafe { libc::syscall(libc::SYS_execve, 0usize, 0usize, 0usize) };
    std::io::Error::last_os_error()
}

/// The SIGSYS handler: says which thread kind made which call, then ends the process.
/// Only async-signal-safe work: a stack buffer, write(2), _exit(2).
extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SIGSYS; on x86_64 its _sigsys member
    // (void *call_addr; int syscall; unsigned arch) starts at offset 16, so the call
    // number is the i32 at offset 24.
    let number = unsafe { info.cast::<u8>().add(24).cast::<i32>().read_unaligned() };
    let kind = KIND.with(|k| ThreadKind::from_u8(k.get())).map_or("starting (vmm filter)", ThreadKind::name);
    // The thread's own name ("vcpu0", "tls", "postcopy-urgent"...): prctl is allowed to all.
    let mut name = [0u8; 17];
    // SAFETY: PR_GET_NAME writes at most 16 bytes and a NUL into the 17-byte buffer.
    unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) };
    let name_len = name.iter().position(|&b| b == 0).unwrap_or(16);
    let mut message = [0u8; 200];
    let mut len = 0;
    for part in [
        b"popek: seccomp: the ".as_slice(),
        kind.as_bytes(),
        b" thread (",
        &name[..name_len],
        b") made the forbidden system call ",
    ] {
        len += copy(&mut message[len..], part);
    }
    len += decimal(&mut message[len..], number);
    if i64::from(number) == libc::SYS_openat {
        // Which file: the path is openat's second argument (rsi at the trap).
        // SAFETY: for SIGSYS the kernel passes the interrupted thread's ucontext; the
        // path pointer was valid for the call the thread was making, and at most 100
        // bytes are read, stopping at its NUL.
        unsafe {
            let regs = &(*context.cast::<libc::ucontext_t>()).uc_mcontext.gregs;
            let path = regs[libc::REG_RSI as usize] as *const u8;
            if !path.is_null() {
                len += copy(&mut message[len..], b" on \"");
                let mut i = 0;
                while i < 100 && *path.add(i) != 0 && len < message.len() - 40 {
                    message[len] = *path.add(i);
                    (len, i) = (len + 1, i + 1);
                }
                len += copy(&mut message[len..], b"\"");
            }
        }
    }
    len += copy(&mut message[len..], b" (see `ausyscall`); stopping\n");
    // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffer lives on this stack.
    unsafe {
        libc::write(2, message.as_ptr().cast(), len);
        libc::_exit(VIOLATION_STATUS);
    }
}

fn copy(into: &mut [u8], bytes: &[u8]) -> usize {
    let n = bytes.len().min(into.len());
    into[..n].copy_from_slice(&bytes[..n]);
    n
}

fn decimal(into: &mut [u8], value: i32) -> usize {
    let mut digits = [0u8; 12];
    let mut n = value.unsigned_abs();
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    copy(into, &digits[i..])
}

/// The narrow kinds may not open files, but glibc itself opens a few from any thread
/// (malloc reads /proc/sys/vm/overcommit_memory the first time a thread's heap shrinks)
/// and copes when that fails. So opening a file is refused with EACCES rather than
/// trapped: this filter answers `openat` and `open` with EACCES, and the kind's list
/// (installed on top) allows them, since the strictest answer of all filters wins.
fn files_refused(kind: ThreadKind, mode: Mode) -> Result<BpfProgram, Error> {
    let rules: BTreeMap<i64, Vec<SeccompRule>> = [(libc::SYS_openat, vec![]), (libc::SYS_open, vec![])].into();
    let refuse = match mode {
        Mode::Log => SeccompAction::Log,
        _ => SeccompAction::Errno(libc::EACCES as u32),
    };
    bpf(kind, rules, SeccompAction::Allow, refuse)
}

fn program(kind: ThreadKind, mode: Mode) -> Result<BpfProgram, Error> {
    let build = |detail: String| Error::Build { kind: kind.name(), detail };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for call in allowed(kind) {
        rules.insert(call, vec![]);
    }
    if kind != ThreadKind::Vmm {
        // Refused with EACCES by `files_refused`, not trapped.
        rules.insert(libc::SYS_openat, vec![]);
        rules.insert(libc::SYS_open, vec![]);
    }
    rules.insert(libc::SYS_ioctl, ioctl_rules(kind).map_err(build)?);
    let mismatch = match mode {
        Mode::Log => SeccompAction::Log,
        _ => SeccompAction::Trap,
    };
    bpf(kind, rules, mismatch, SeccompAction::Allow)
}

/// Compiles `rules` for this machine: `matched` for the calls they list, `other` for
/// the rest.
fn bpf(
    kind: ThreadKind,
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    other: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, Error> {
    let build = |detail: String| Error::Build { kind: kind.name(), detail };
    let arch = std::env::consts::ARCH.try_into().map_err(|e| build(format!("{e:?}")))?;
    let filter = SeccompFilter::new(rules, other, matched, arch).map_err(|e| build(e.to_string()))?;
    filter.try_into().map_err(|e: seccompiler::BackendError| build(e.to_string()))
}

/// ioctl is allowed by request type: KVM's for every kind (the type byte 0xAE), plus what
/// each kind needs besides. A thread cannot, say, push input into a terminal (TIOCSTI).
fn ioctl_rules(kind: ThreadKind) -> Result<Vec<SeccompRule>, String> {
    const KVM_TYPE: u64 = 0xAE;
    const UFFD_TYPE: u64 = 0xAA;
    let by_type = |t: u64| -> Result<SeccompRule, String> {
        let condition =
            SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::MaskedEq(0xff00), t << 8).map_err(text)?;
        SeccompRule::new(vec![condition]).map_err(text)
    };
    let exactly = |request: u64| -> Result<SeccompRule, String> {
        let condition = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, request).map_err(text)?;
        SeccompRule::new(vec![condition]).map_err(text)
    };
    let mut rules = vec![by_type(KVM_TYPE)?];
    // Whether stdout/stderr is a terminal (logging, progress), and non-blocking sockets.
    for request in [libc::TCGETS, libc::TIOCGWINSZ, libc::FIONBIO, libc::FIONREAD] {
        rules.push(exactly(request)?);
    }
    if matches!(kind, ThreadKind::Vmm | ThreadKind::Migration) {
        rules.push(by_type(UFFD_TYPE)?);
        rules.push(exactly(libc::FIOCLEX)?);
    }
    Ok(rules)
}

fn text(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// What every thread does: memory, locks, time, signals, its own end, reading and writing
/// descriptors it was given.
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_lseek,
    libc::SYS_fcntl,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_tgkill,
    libc::SYS_getrandom,
    libc::SYS_restart_syscall,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_prctl,
    // Each thread installs its own filter on top of the one it inherited.
    libc::SYS_seccomp,
];

/// Sockets a thread was handed: send, receive, accept on a listener, shut down.
const SOCKET_IO: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_accept,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
];

/// Starting threads (the control socket's per-client threads, migration workers).
const THREADS: &[i64] = &[libc::SYS_clone, libc::SYS_clone3, libc::SYS_set_robust_list, libc::SYS_rseq];

/// The VMM thread's extras: files, new sockets, VM and memory setup, signal handlers.
const VMM_ONLY: &[i64] = &[
    libc::SYS_openat,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_socket,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_connect,
    libc::SYS_socketpair,
    libc::SYS_epoll_create1,
    libc::SYS_eventfd2,
    libc::SYS_memfd_create,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
    libc::SYS_userfaultfd,
    libc::SYS_mincore,
    libc::SYS_rt_sigaction,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_pipe2,
    libc::SYS_prlimit64,
    libc::SYS_uname,
    libc::SYS_getcwd,
    libc::SYS_readlink,
    libc::SYS_fsync,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
];

fn allowed(kind: ThreadKind) -> Vec<i64> {
    let parts: &[&[i64]] = match kind {
        ThreadKind::Vmm => &[COMMON, SOCKET_IO, THREADS, VMM_ONLY],
        ThreadKind::Vcpu => &[COMMON],
        ThreadKind::Api => &[COMMON, SOCKET_IO, THREADS],
        ThreadKind::Migration => &[COMMON, SOCKET_IO, THREADS, &[libc::SYS_mincore, libc::SYS_pread64]],
    };
    parts.concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_compiles_to_a_program_in_both_modes() {
        for kind in KINDS {
            for mode in [Mode::Enforce, Mode::Log] {
                let programs = compile(kind, mode).unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(programs.len(), if kind == ThreadKind::Vmm { 1 } else { 2 }, "{kind:?}");
                let list = programs.last().map_or(0, |p| p.len());
                assert!(list > 10, "{kind:?}: {list} instructions");
            }
        }
    }

    #[test]
    fn narrower_kinds_never_allow_what_the_vmm_thread_forbids() {
        // Filters stack, so a call only a worker's list has would trap anyway: keep the
        // lists honest (every worker call is in the VMM list).
        let vmm = allowed(ThreadKind::Vmm);
        for kind in [ThreadKind::Vcpu, ThreadKind::Api, ThreadKind::Migration] {
            for call in allowed(kind) {
                assert!(vmm.contains(&call), "{kind:?} allows {call}, the VMM thread does not");
            }
        }
        assert!(!allowed(ThreadKind::Vcpu).contains(&libc::SYS_socket));
        assert!(!allowed(ThreadKind::Api).contains(&libc::SYS_openat));
        assert!(!vmm.contains(&libc::SYS_execve));
    }

    #[test]
    fn the_violation_message_formats_numbers() {
        let mut buffer = [0u8; 16];
        let n = decimal(&mut buffer, 59);
        assert_eq!(&buffer[..n], b"59");
        let n = decimal(&mut buffer, 0);
        assert_eq!(&buffer[..n], b"0");
    }
}
