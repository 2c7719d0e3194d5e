//! The `popek` command line: parse, set up logging, call the library, turn the outcome into
//! an exit status. Exit statuses: the guest's own are odd (`(v << 1) | 1`, as with QEMU's
//! isa-debug-exit); Popek's are even, so the two never collide (see README).

use clap::{Parser, Subcommand, ValueEnum};
use popek::config::{self, BootMode, Kernel, VmConfig};
use popek::trap::msr::UnknownMsrPolicy;
use popek::vcpu::{FaultKind, VmExit};
use popek::vm::{self, Vm};
use std::path::PathBuf;
use std::process::ExitCode;

/// Exit statuses of `popek` itself (all even; odd ones come from the guest).
mod status {
    pub const RESET: u8 = 0;
    pub const USAGE: u8 = 2;
    pub const BAD_INPUT: u8 = 4;
    pub const NO_KVM: u8 = 6;
    pub const TRIPLE_FAULT: u8 = 8;
    pub const FAIL_ENTRY: u8 = 10;
    pub const EMULATION: u8 = 12;
    pub const SYSTEM_EVENT: u8 = 14;
    pub const VMM_ERROR: u8 = 16;
    pub const MIGRATION: u8 = 18;
}

/// How long an exiting `popek run` waits for its TLS connections to send what it wrote.
const TLS_FLUSH: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(Parser)]
#[command(name = "popek", version, about = "A tiny KVM hypervisor for seeing and measuring virtualization")]
#[command(after_help = "Exit status: the guest's exit-port value v gives (v << 1) | 1 (odd), as QEMU's \
isa-debug-exit does; popek's own: 0 guest asked for reset, 2 usage, 4 bad input (image, size, file), \
6 KVM unavailable, 8 triple fault, 10 VM entry failed, 12 emulation failure, 14 KVM system event, \
16 other VMM error, 18 migration failed (the VM keeps running where it was), 20 a thread made a system call \
its seccomp filter forbids.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a kernel (the bundled test guest by default) and run it until it exits.
    Run(Box<RunArgs>),
    /// Classify an image's instructions by the Popek-Goldberg criteria (privileged,
    /// sensitive-unprivileged, innocuous) and list every sensitive-unprivileged site.
    Classify {
        /// An ELF (its executable sections), or a raw binary with --flat.
        image: PathBuf,
        /// The image is a raw binary.
        #[arg(long)]
        flat: bool,
        /// Decoding mode: 16, 32 or 64 (default: from the ELF class; 64 for --flat).
        #[arg(long)]
        bits: Option<u32>,
        /// Address of the first byte of a --flat image (hex with 0x, or decimal).
        #[arg(long, default_value = "0", value_parser = parse_address)]
        base: u64,
        /// Print JSON instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Move a running VM (started with --api-socket) to a destination started with
    /// `popek run --incoming ADDR`; prints the report.
    Migrate {
        /// The source VM's control socket.
        #[arg(long, value_name = "PATH")]
        api_socket: PathBuf,
        /// Destination: tcp:HOST:PORT or unix:PATH.
        #[arg(long, value_name = "ADDR")]
        to: String,
        /// How to move it: stop-copy (pause, copy everything, run there), precopy (copy
        /// while it runs, in rounds, then pause for the rest), postcopy (move the vCPUs at
        /// once, memory follows on demand and in the background) or hybrid (pre-copy
        /// rounds, then post-copy when they stop converging or on `popek migrate-postcopy`).
        #[arg(long, default_value = "stop-copy")]
        mode: String,
        /// Post-copy: how long to keep re-establishing a broken link before giving up.
        #[arg(long, default_value_t = 60, value_name = "SECS")]
        recover_timeout: u64,
        /// Pre-copy: stop when what is left would take at most this long to send.
        #[arg(long, default_value_t = 1.0, value_name = "MS")]
        downtime_limit: f64,
        /// Pre-copy: at most this many rounds; then stop and copy the rest anyway.
        #[arg(long, default_value_t = 30, value_name = "N")]
        max_rounds: u32,
        /// Write the report as JSON to FILE too.
        #[arg(long, value_name = "FILE")]
        report_json: Option<PathBuf>,
        /// Test mode: the destination checks its RAM is byte for byte the source's at the
        /// pause (costs a full read of memory on both sides, inside the downtime).
        #[arg(long)]
        verify_memory: bool,
        /// Send at most this many bytes per second (K/M/G suffixes, binary), e.g. 100M.
        #[arg(long, value_name = "RATE", value_parser = parse_rate)]
        max_bandwidth: Option<u64>,
        /// Pre-copy: when the rounds stop shrinking, stall the vCPUs for a growing share of
        /// each 10 ms (20%, 40%, ... 90%) until it converges.
        #[arg(long)]
        auto_converge: bool,
        /// Hybrid: switch to post-copy only on `popek migrate-postcopy` (or after
        /// --max-rounds), not when the rounds stop converging.
        #[arg(long)]
        manual_switch: bool,
        /// Pre-copy and hybrid: keep up to this much of the pages sent (K/M/G suffixes) to
        /// send a page sent again as only the words that changed; 0 sends whole pages.
        #[arg(long, default_value = "128M", value_name = "SIZE", value_parser = parse_size)]
        delta_cache: u64,
        /// Compress memory frames (lz4): auto (when the measured link is slower than the
        /// compressor makes up for), on (whenever a frame comes out smaller), off.
        #[arg(long, default_value = "auto", value_parser = ["auto", "on", "off"])]
        compress: String,
    },
    /// Switch a running hybrid migration to post-copy after its current round.
    MigratePostcopy {
        #[arg(long, value_name = "PATH")]
        api_socket: PathBuf,
    },
    /// Ask a running VM (started with --api-socket) for its status.
    Status {
        #[arg(long, value_name = "PATH")]
        api_socket: PathBuf,
    },
    /// Ask a running VM for its exit, hypercall and device statistics (JSON).
    Stats {
        #[arg(long, value_name = "PATH")]
        api_socket: PathBuf,
    },
    /// Pause a running VM's vCPUs.
    Pause {
        #[arg(long, value_name = "PATH")]
        api_socket: PathBuf,
    },
    /// Resume a paused VM's vCPUs.
    Resume {
        #[arg(long, value_name = "PATH")]
        api_socket: PathBuf,
    },
    /// Write the bundled test guest ELF to a file (to boot it elsewhere, e.g. under QEMU).
    ExportGuest {
        /// Where to write the ELF.
        #[arg(long, short)]
        output: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum BootArg {
    /// The VMM loads the kernel and starts at its entry (PVH or Multiboot).
    Direct,
    /// Start at the reset vector of Popek's firmware ROM, which jumps to the kernel.
    Firmware,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Kernel image: a PVH ELF64 or a Multiboot v1 ELF32. Default: the bundled test guest.
    #[arg(long, value_name = "FILE")]
    kernel: Option<PathBuf>,
    /// Guest RAM: a size with K/M/G suffix (a bare number is MiB).
    #[arg(long, short, default_value = "256M", value_name = "SIZE")]
    memory: String,
    /// Number of vCPUs; all but the first wait for the guest to start them (INIT/SIPI).
    #[arg(long, default_value_t = 1, value_name = "N")]
    vcpus: u32,
    /// Kernel command line. The bundled guest takes `test=NAME` (hello, exit, echo, mem,
    /// initrd, rom, smp, triple-fault).
    #[arg(long, default_value = "", value_name = "TEXT")]
    cmdline: String,
    /// A file handed to the kernel as its initrd (PVH module 0 / Multiboot module).
    #[arg(long, value_name = "FILE")]
    initrd: Option<PathBuf>,
    /// How the first instruction is reached.
    #[arg(long, value_enum, default_value = "direct")]
    boot: BootArg,
    /// The KVM device node.
    #[arg(long, default_value = "/dev/kvm", value_name = "PATH")]
    kvm_device: PathBuf,
    /// Do not feed standard input to the guest's serial console.
    #[arg(long)]
    no_stdin: bool,
    /// Serve control requests (status, pause, resume, migrate) on this Unix socket.
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// Do not boot: wait for a migrating VM on tcp:HOST:PORT or unix:PATH and run it.
    #[arg(long, value_name = "ADDR")]
    incoming: Option<String>,
    /// Migration peers must prove they hold this key (a file of at least 16 bytes) before
    /// any state moves; give the same key to the source and the destination.
    #[arg(long, value_name = "FILE")]
    auth_key: Option<PathBuf>,
    /// Migrate over mutual TLS 1.3: this side's certificate (PEM), used by both the
    /// source (client) and the destination (server). Needs --tls-key and --tls-ca.
    #[arg(long, value_name = "FILE", requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, value_name = "FILE", requires_all = ["tls_cert", "tls_ca"])]
    tls_key: Option<PathBuf>,
    /// The CA certificate(s) (PEM) the peer's certificate must be signed by. The
    /// destination's certificate must name the address the source dials (its IP or DNS
    /// name; "localhost" for unix: addresses).
    #[arg(long, value_name = "FILE", requires_all = ["tls_cert", "tls_key"])]
    tls_ca: Option<PathBuf>,
    /// Allow --incoming on a non-loopback address without --auth-key.
    #[arg(long)]
    insecure: bool,
    /// With --incoming: allocate the VM's RAM (--memory, which must then match the
    /// incoming VM) before listening, so that receiving it costs memcpy speed, not a page
    /// allocation per page (post-copy then maps pages with userfaultfd minor faults).
    #[arg(long)]
    prealloc: bool,
    /// With --incoming, in post-copy: how long the VM waits on its missing pages for the
    /// source to come back after a broken link before giving up (the VM is then lost).
    #[arg(long, default_value_t = 60, value_name = "SECS")]
    recover_timeout: u64,
    /// Print a table of VM exits (per kind and vCPU, busiest ports/addresses/MSRs) to
    /// stderr when the VM ends.
    #[arg(long)]
    stats: bool,
    /// Write the exit statistics as JSON to FILE when the VM ends.
    #[arg(long, value_name = "FILE")]
    stats_json: Option<PathBuf>,
    /// Record every VM exit as a JSON line in FILE (at most --trace-limit lines).
    #[arg(long, value_name = "FILE")]
    trace_exits: Option<PathBuf>,
    /// Most lines --trace-exits writes; later exits are only counted.
    #[arg(long, default_value_t = 1_000_000, value_name = "N")]
    trace_limit: u64,
    /// What MSRs unknown to KVM and Popek do: `gp` injects #GP (as hardware does), `zero`
    /// reads as zero and ignores writes.
    #[arg(long, value_enum, default_value = "gp")]
    msr_policy: MsrPolicyArg,
    /// Single-step the boot vCPU, decode and classify every instruction it executes, and
    /// print what ran (per class, CPL, and the sensitive-unprivileged sites) at the end.
    #[arg(long)]
    audit: bool,
    /// Most instructions the audit steps; then the guest runs on unaudited.
    #[arg(long, default_value_t = 100_000, value_name = "N")]
    audit_limit: u64,
    /// System-call filters per thread kind (vmm, vcpu, api, migration; docs/security.md):
    /// `on` stops the process (exit 20, naming the thread and call) on a forbidden call,
    /// `log` lets it through and has the kernel log it, `off` installs none.
    #[arg(long, value_enum, default_value = "on")]
    seccomp: SeccompArg,
    /// Test hook: the first thread of this kind (vmm, vcpu, api, migration) makes one
    /// system call its filter forbids.
    #[arg(long, hide = true, value_name = "KIND", value_parser = parse_thread_kind)]
    seccomp_probe: Option<popek::seccomp::ThreadKind>,
}

#[derive(Clone, Copy, ValueEnum)]
enum SeccompArg {
    On,
    Log,
    Off,
}

fn parse_thread_kind(text: &str) -> Result<popek::seccomp::ThreadKind, String> {
    popek::seccomp::ThreadKind::parse(text)
        .ok_or_else(|| format!("'{text}' is not a thread kind (vmm, vcpu, api, migration)"))
}

#[derive(Clone, Copy, ValueEnum)]
enum MsrPolicyArg {
    Gp,
    Zero,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().filter_or("POPEK_LOG", "warn")).init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { status::USAGE } else { 0 });
        }
    };
    match cli.command {
        Command::Run(args) => {
            let code = run(*args);
            popek::migration::tls::flush(TLS_FLUSH);
            code
        }
        Command::Classify { image, flat, bits, base, json } => {
            classify(&image, popek::classify::Options { flat, bits, base }, json)
        }
        Command::Migrate {
            api_socket,
            to,
            mode,
            downtime_limit,
            max_rounds,
            report_json,
            verify_memory,
            max_bandwidth,
            auto_converge,
            recover_timeout,
            manual_switch,
            delta_cache,
            compress,
        } => {
            let request = serde_json::json!({"cmd": "migrate", "to": to, "mode": mode,
                "downtime_limit_ms": downtime_limit, "max_rounds": max_rounds, "verify_memory": verify_memory,
                "max_bandwidth": max_bandwidth, "auto_converge": auto_converge, "recover_timeout_s": recover_timeout,
                "manual_switch": manual_switch, "delta_cache": delta_cache, "compress": compress});
            api_call(&api_socket, &request, report_json.as_deref())
        }
        Command::MigratePostcopy { api_socket } => {
            api_call(&api_socket, &serde_json::json!({"cmd": "migrate-postcopy"}), None)
        }
        Command::Status { api_socket } => api_call(&api_socket, &serde_json::json!({"cmd": "status"}), None),
        Command::Stats { api_socket } => api_call(&api_socket, &serde_json::json!({"cmd": "stats"}), None),
        Command::Pause { api_socket } => api_call(&api_socket, &serde_json::json!({"cmd": "pause"}), None),
        Command::Resume { api_socket } => api_call(&api_socket, &serde_json::json!({"cmd": "resume"}), None),
        Command::ExportGuest { output } => match std::fs::write(&output, popek::bundled::GUEST_ELF) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(status::BAD_INPUT, &format!("cannot write {}: {e}", output.display())),
        },
    }
}

/// How long after Running the destination frees what the migration no longer needs.
const CLEANUP_DELAY: std::time::Duration = std::time::Duration::from_millis(20);

/// The destination side of a migration: receive, run, confirm.
fn run_incoming(
    address: &str,
    config: &VmConfig,
    requests: Option<std::sync::mpsc::Receiver<popek::api::Call>>,
    (stdin, insecure, recover_timeout, prepared): (
        bool,
        bool,
        std::time::Duration,
        Option<std::sync::Arc<popek::memory::Prepared>>,
    ),
) -> ExitCode {
    let address: popek::migration::transport::Address = match address.parse() {
        Ok(a) => a,
        Err(e) => return fail(status::BAD_INPUT, &e.to_string()),
    };
    if config.auth_key.is_none() && !address.is_local() {
        if !insecure {
            return fail(
                status::BAD_INPUT,
                &format!("listening on {address} without --auth-key would let anyone who reaches it push a VM onto this host; give both sides --auth-key FILE, or pass --insecure to accept that"),
            );
        }
        eprintln!("popek: warning: accepting an unauthenticated migration on {address} (--insecure)");
    }
    // Frees what the migration no longer needs, a little after Running (see `confirm`).
    let reaper = match popek::parked::Parked::spawn("cleanup") {
        Ok(thread) => thread,
        Err(e) => return fail(status::VMM_ERROR, &format!("cannot start a thread: {e}")),
    };
    let console = Box::new(std::io::stdout());
    let incoming = match popek::migration::destination::receive(
        &address,
        config.kvm_device.clone(),
        config.auth_key.as_ref(),
        console,
        (recover_timeout, prepared),
    ) {
        Ok(incoming) => incoming,
        Err(e) => return fail(status::MIGRATION, &format!("incoming migration failed: {e}")),
    };
    use popek::migration::destination::Link;
    // The staging mapping of prepared RAM stays mapped while the VM runs: unmapping it
    // (~80 ms for 1 GiB here) stalls the vCPUs' own page faults even on another thread,
    // and it costs only its page tables (2 MiB per GiB); the process exit unmaps it.
    let popek::migration::destination::Incoming {
        mut vm,
        mut link,
        state_arrived,
        staging: _staging,
        buffers,
        unused,
        listener,
    } = incoming;
    log::debug!("incoming: machine restored {:?} after the state arrived", state_arrived.elapsed());
    let confirm = |vm: &mut Vm| {
        let running = popek::migration::protocol::Running {
            restore_us: state_arrived.elapsed().as_micros() as u64,
            resumed_unix_ns: popek::migration::protocol::unix_ns(),
        };
        log::debug!("incoming: vCPUs started {:?} after the state arrived", state_arrived.elapsed());
        if let Err(e) = link.confirm_running(&running) {
            log::warn!("could not confirm to the source: {e}");
        }
        // On one host the source's reader of Running often shares this core (a socket's
        // wake-up puts the reader on the writer's core): let it read now rather than after
        // whatever this thread does next (90-130 us here). A no-op when nothing waits.
        std::thread::yield_now();
        // The vCPUs were held until Running went out (see `Vm::run_with`); they go now,
        // before the clean-up below.
        vm.resume_all();
        // Out of the downtime, but not at once: the receive buffer's unmap (~0.5 ms
        // here), the post-copy threads a pre-copy did not need and the listening socket
        // would compete for a core with the source's reader of Running, whose wake-up
        // ends the downtime, while the guest takes the other (a dirtier's downtime was
        // 0.45 ms longer end to end than by events, an all-written guest's 1.5 ms).
        let later = (buffers, unused, listener);
        let _ = reaper.start(move || {
            std::thread::sleep(CLEANUP_DELAY);
            drop(later);
        });
    };
    let input = stdin.then(std::io::stdin);
    let exit = match vm.run_with(input, requests, confirm) {
        Ok(exit) => exit,
        Err(e) => return fail(status::VMM_ERROR, &chain(&e)),
    };
    if let Link::Postcopy(postcopy) = link {
        // The guest ended before all of its memory arrived: let the source finish, so it
        // learns the move completed, before this process goes.
        if postcopy.missing() > 0 {
            eprintln!("popek: the VM ended during post-copy; receiving the last {} pages", postcopy.missing());
        }
        match postcopy.wait() {
            Ok(done) => log::debug!("post-copy done: {done:?}"),
            Err(e) => eprintln!("popek: post-copy: {e}"),
        }
    }
    finish(exit)
}

/// Sends one request to a VM's control socket and prints the reply.
fn api_call(socket: &std::path::Path, request: &serde_json::Value, report_json: Option<&std::path::Path>) -> ExitCode {
    use std::io::{BufRead, Write};
    let stream = match std::os::unix::net::UnixStream::connect(socket) {
        Ok(s) => s,
        Err(e) => return fail(status::BAD_INPUT, &format!("cannot reach the VM at {}: {e}", socket.display())),
    };
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(e) => return fail(status::VMM_ERROR, &e.to_string()),
    };
    if let Err(e) = writeln!(writer, "{request}") {
        return fail(status::VMM_ERROR, &format!("cannot send the request: {e}"));
    }
    // Progress lines (pre-copy rounds) go to stderr as they come; the last line answers.
    let mut reader = std::io::BufReader::new(stream);
    let mut line = String::new();
    let reply = loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => return fail(status::VMM_ERROR, "the VM closed the connection without a reply"),
            Ok(_) => {}
            Err(e) => return fail(status::VMM_ERROR, &format!("no reply: {e}")),
        }
        let value: serde_json::Value = serde_json::from_str(&line).unwrap_or(serde_json::Value::Null);
        match value.get("progress") {
            Some(progress) => eprintln!("popek: migration {progress}"),
            None => break value,
        }
    };
    println!("{}", serde_json::to_string_pretty(&reply).unwrap_or(line.clone()));
    if let Some(r) = reply.get("report") {
        let rounds = r["rounds"].as_array().map_or(0, |v| v.len());
        eprintln!(
            "popek: migrated to {} ({}): downtime {:.2} ms, total {:.2} ms, {:.1} MB sent, {} pre-copy rounds, {} zero pages skipped",
            r["to"].as_str().unwrap_or("?"),
            r["mode"].as_str().unwrap_or("?"),
            r["downtime_ms"].as_f64().unwrap_or(f64::NAN),
            r["total_ms"].as_f64().unwrap_or(f64::NAN),
            (r["memory"]["bytes_on_wire"].as_f64().unwrap_or(0.0) + r["state_bytes"].as_f64().unwrap_or(0.0)) / 1e6,
            rounds,
            r["memory"]["zero_pages"].as_u64().unwrap_or(0)
        );
        let p = &r["postcopy"];
        if !p.is_null() {
            let d = &p["destination"];
            eprintln!(
                "popek: post-copy: {} pages needed, {} sent on request, {} pushed; {} demand faults, latency p50 {} us, p99 {} us; {:.1} ms; {} reconnects",
                p["pages_needed"], p["pages_requested_sent"], p["pages_pushed"], d["demand_faults"],
                d["fault_latency_p50_us"], d["fault_latency_p99_us"], d["postcopy_ms"].as_f64().unwrap_or(f64::NAN),
                p["reconnects"]
            );
        }
    }
    if let (Some(path), Some(report)) = (report_json, reply.get("report")) {
        if let Err(e) = std::fs::write(path, report.to_string()) {
            eprintln!("popek: cannot write {}: {e}", path.display());
        }
    }
    if reply.get("ok") == Some(&serde_json::Value::Bool(true)) {
        ExitCode::SUCCESS
    } else {
        let error = reply.get("error").and_then(|e| e.as_str()).unwrap_or("the VM refused");
        fail(status::MIGRATION, error)
    }
}

/// A rate in bytes per second: a number with an optional K/M/G suffix (binary units).
fn parse_rate(text: &str) -> Result<u64, String> {
    let n = parse_bytes(text).map_err(|_| format!("'{text}' is not a rate (examples: 100M, 1G, 500000)"))?;
    n.filter(|&r| r > 0).ok_or_else(|| format!("'{text}' is not a usable rate"))
}

fn parse_size(text: &str) -> Result<u64, String> {
    let n = parse_bytes(text).map_err(|_| format!("'{text}' is not a size (examples: 0, 64M, 1G)"))?;
    n.ok_or_else(|| format!("'{text}' is too large"))
}

/// A byte count with an optional K/M/G (binary) suffix; `None` when it overflows.
fn parse_bytes(text: &str) -> Result<Option<u64>, std::num::ParseIntError> {
    let (digits, shift) = match text.trim().to_ascii_uppercase().trim_end_matches("/S").trim_end_matches('B') {
        t if t.ends_with('K') => (t[..t.len() - 1].to_string(), 10),
        t if t.ends_with('M') => (t[..t.len() - 1].to_string(), 20),
        t if t.ends_with('G') => (t[..t.len() - 1].to_string(), 30),
        t => (t.to_string(), 0),
    };
    Ok(digits.parse::<u64>()?.checked_mul(1 << shift))
}

fn parse_address(text: &str) -> Result<u64, String> {
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.map_err(|_| format!("'{text}' is not an address"))
}

fn classify(image: &std::path::Path, options: popek::classify::Options, json: bool) -> ExitCode {
    let data = match std::fs::read(image) {
        Ok(data) => data,
        Err(e) => return fail(status::BAD_INPUT, &format!("cannot read {}: {e}", image.display())),
    };
    let start = std::time::Instant::now();
    let report = match popek::classify::classify(&data, &options) {
        Ok(report) => report,
        Err(e) => return fail(status::BAD_INPUT, &format!("{}: {e}", image.display())),
    };
    let elapsed = start.elapsed();
    let text = if json {
        match serde_json::to_string_pretty(&report) {
            Ok(text) => text + "\n",
            Err(e) => return fail(status::VMM_ERROR, &e.to_string()),
        }
    } else {
        format!("{}: {}", image.display(), report.table())
    };
    // A closed pipe (`| head`) is the reader's choice, not an error worth a panic.
    let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes());
    eprintln!("popek: classified {} instructions in {:.1} ms", report.instructions, elapsed.as_secs_f64() * 1e3);
    ExitCode::SUCCESS
}

fn run(args: RunArgs) -> ExitCode {
    let memory_bytes = match config::parse_size(&args.memory) {
        Ok(bytes) => bytes,
        Err(e) => return fail(status::BAD_INPUT, &e.to_string()),
    };
    let config = VmConfig {
        memory_bytes,
        vcpus: args.vcpus,
        kernel: args.kernel.map_or(Kernel::Bundled, Kernel::File),
        cmdline: args.cmdline,
        initrd: args.initrd,
        boot: match args.boot {
            BootArg::Direct => BootMode::Direct,
            BootArg::Firmware => BootMode::Firmware,
        },
        kvm_device: args.kvm_device,
        msr_policy: match args.msr_policy {
            MsrPolicyArg::Gp => UnknownMsrPolicy::Gp,
            MsrPolicyArg::Zero => UnknownMsrPolicy::Zero,
        },
        trace_exits: args.trace_exits.clone().map(|path| (path, args.trace_limit)),
        audit: args.audit.then_some(args.audit_limit),
        auth_key: None,
    };
    let mut config = config;
    if let Some(path) = &args.auth_key {
        match popek::migration::auth::Key::load(path) {
            Ok(key) => config.auth_key = Some(key),
            Err(e) => return fail(status::BAD_INPUT, &e),
        }
    }
    if let Err(e) = config.validate() {
        return fail(status::BAD_INPUT, &e.to_string());
    }
    if let (Some(cert), Some(key), Some(ca)) = (&args.tls_cert, &args.tls_key, &args.tls_ca) {
        use popek::migration::tls;
        match tls::Settings::load(&tls::Files { cert, key, ca }) {
            Ok(settings) => tls::enable(settings),
            Err(e) => return fail(status::BAD_INPUT, &chain(&e)),
        }
    }
    // Before any other thread starts, so that every thread inherits at least this filter.
    let seccomp = match args.seccomp {
        SeccompArg::On => popek::seccomp::Mode::Enforce,
        SeccompArg::Log => popek::seccomp::Mode::Log,
        SeccompArg::Off => popek::seccomp::Mode::Off,
    };
    if let Err(e) = popek::seccomp::install(seccomp, args.seccomp_probe) {
        return fail(status::VMM_ERROR, &e.to_string());
    }
    let requests = match args.api_socket.as_deref().map(popek::api::spawn_server).transpose() {
        Ok(r) => r,
        Err(e) => return fail(status::BAD_INPUT, &format!("cannot serve the API socket: {e}")),
    };
    if let Some(address) = &args.incoming {
        let recover = std::time::Duration::from_secs(args.recover_timeout);
        let prepared = if args.prealloc {
            let started = std::time::Instant::now();
            match popek::memory::Prepared::new(config.memory_bytes) {
                Ok(p) => {
                    eprintln!("popek: allocated {} MiB of guest RAM in {:.0?}", p.size() >> 20, started.elapsed());
                    Some(std::sync::Arc::new(p))
                }
                Err(e) => return fail(status::VMM_ERROR, &chain(&e)),
            }
        } else {
            None
        };
        return run_incoming(address, &config, requests, (!args.no_stdin, args.insecure, recover, prepared));
    }
    let mut vm = match Vm::new(&config, Box::new(std::io::stdout())) {
        Ok(vm) => vm,
        Err(e) => return fail(creation_status(&e), &chain(&e)),
    };
    log::info!("booting {} kernel", vm.protocol());
    let input = (!args.no_stdin).then(std::io::stdin);
    let exit = match vm.run_with(input, requests, |_| {}) {
        Ok(exit) => exit,
        Err(e) => return fail(status::VMM_ERROR, &chain(&e)),
    };
    if let Some(audit) = vm.audit_report() {
        eprint!("\n{}", audit.table());
    }
    if let Err(message) = report_stats(&vm, &exit, args.stats, args.stats_json.as_deref()) {
        eprintln!("popek: error: {message}");
    }
    finish(exit)
}

/// Prints and/or writes the exit statistics.
fn report_stats(vm: &Vm, exit: &VmExit, table: bool, json: Option<&std::path::Path>) -> Result<(), String> {
    if !table && json.is_none() {
        return Ok(());
    }
    let exits = vm.exit_report();
    if table {
        eprint!("\n{}", exits.table());
    }
    if let Some(path) = json {
        let mut value = vm.stats_json();
        value["end"] = serde_json::Value::String(format!("{exit:?}"));
        let text = serde_json::to_string_pretty(&value).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(())
}

/// Turns the VM's end into the process exit status. Uses `std::process::exit` so that vCPU
/// threads still parked in KVM_RUN do not keep the process alive.
fn finish(exit: VmExit) -> ExitCode {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    popek::migration::tls::flush(TLS_FLUSH);
    let code: i32 = match exit {
        VmExit::Guest(v) => (i32::from(v) << 1) | 1,
        VmExit::Reset => {
            eprintln!("popek: the guest requested a reset; stopping (popek does not reboot)");
            i32::from(status::RESET)
        }
        VmExit::Migrated(report) => {
            eprintln!("popek: the VM moved away; report: {report}");
            0
        }
        VmExit::MigrationLost(reason) => {
            eprintln!("popek: error: {reason}");
            i32::from(status::MIGRATION)
        }
        VmExit::Stopped => i32::from(status::VMM_ERROR),
        VmExit::Fault(fault) => {
            eprintln!("popek: error: vCPU {}: {}", fault.vcpu, fault.detail);
            eprint!("{}", fault.dump);
            i32::from(match fault.kind {
                FaultKind::TripleFault => status::TRIPLE_FAULT,
                FaultKind::FailEntry => status::FAIL_ENTRY,
                FaultKind::Emulation => status::EMULATION,
                FaultKind::SystemEvent => status::SYSTEM_EVENT,
                FaultKind::Other => status::VMM_ERROR,
            })
        }
    };
    std::process::exit(code)
}

fn creation_status(e: &vm::Error) -> u8 {
    match e {
        vm::Error::NoKvm(_) | vm::Error::KvmPermission(_) | vm::Error::OpenKvm { .. } | vm::Error::NotKvm { .. } => {
            status::NO_KVM
        }
        vm::Error::Boot(_) => status::BAD_INPUT,
        _ => status::VMM_ERROR,
    }
}

/// "outer: inner: innermost", the way a user reads a cause chain on one line.
fn chain(e: &dyn std::error::Error) -> String {
    popek::error_chain(e)
}

fn fail(code: u8, message: &str) -> ExitCode {
    eprintln!("popek: error: {message}");
    ExitCode::from(code)
}
