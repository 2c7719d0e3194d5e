//! The fuzzing surface: one function per fuzz target, each taking one input as bytes from
//! a peer, a client or a guest and running it through the decoders Popek uses on such
//! input, without KVM. `tools/fuzz/` (cargo-fuzz targets, run by `tools/fuzz.sh`) and
//! `tests/fuzz_corpus.rs` (which replays the committed corpora and every crash found so
//! far) call the same functions, so a regression input checks exactly what crashed.
//!
//! Every function returns `Ok` when the input was accepted (a whole valid stream, request,
//! image or call) and `Err` with the reason when it was refused. A refusal is correct
//! behaviour; only a panic, a hang or an abort is a bug. Where a property beyond "no panic"
//! holds for every input, the function checks it and panics if it does not, so the fuzzer
//! reports it.
//!
//! Guest RAM here is two small regions with a hole between them
//! ([`fuzz_ram`]), so that ranges which straddle the hole or leave RAM are reachable
//! without the gigabytes a real VM needs before its RAM splits around the MMIO hole.

use crate::boot::{self, Initrd};
use crate::config::BootMode;
use crate::devices::console::Console;
use crate::devices::hypercall::{HypercallDevice, HypercallState};
use crate::devices::serial::SerialDevice;
use crate::devices::BusDevice;
use crate::memory::GuestRam;
use crate::migration::memory::Incoming;
use crate::migration::pages::{PageMap, PageSet};
use crate::migration::postcopy_destination::{drop_pages, postcopy_records};
use crate::migration::postcopy_source::parse_requests;
use crate::migration::protocol::{self, Answer, Complete, Done, Hello, Kind, Missing, Postcopy, Resume, Running};
use crate::migration::state::MachineState;
use crate::trap::msr::{MsrEmulation, UnknownMsrPolicy};
use popek_abi::hypercall as hc;
use popek_abi::layout;
use std::io::{BufRead, Read};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use vm_memory::{Bytes, GuestAddress};

/// A fuzz target's entry: one input, accepted (`Ok`) or refused with the reason.
pub type Target = fn(&[u8]) -> Result<(), String>;

/// The targets by name (the names of `tools/fuzz/fuzz_targets/*.rs` and of the corpus
/// directories).
pub const TARGETS: [(&str, Target); 5] = [
    ("migration_stream", migration_stream),
    ("machine_state", machine_state),
    ("control_request", control_request),
    ("kernel_image", kernel_image),
    ("hypercall", hypercall),
];

/// Start and size of the two RAM regions of [`fuzz_ram`]: 2 MiB at 0 and 2 MiB at 4 MiB.
pub const FUZZ_RAM: [(u64, usize); 2] = [(0, 2 << 20), (4 << 20, 2 << 20)];

/// Fresh guest RAM of the [`FUZZ_RAM`] layout.
pub fn fuzz_ram() -> GuestRam {
    let ranges: Vec<_> = FUZZ_RAM.iter().map(|&(start, len)| (GuestAddress(start), len)).collect();
    // Allocating 4 MiB of anonymous memory fails only when the host is out of memory, which
    // is no finding about the input.
    GuestRam::from_ranges(&ranges).expect("allocate the fuzzing RAM")
}

fn json<T: serde::de::DeserializeOwned>(kind: Kind, payload: &[u8]) -> Result<T, String> {
    serde_json::from_slice(payload).map_err(|e| format!("malformed {kind:?} message: {e}"))
}

/// A migration stream as a destination (and, for page requests, a source) receives it:
/// frames one after another until the input ends, each payload decoded the way the
/// receiver of its kind decodes it, Memory records applied to guest RAM. The frame order
/// is not enforced here (the receivers' loops, which need a VM, do that): every decoder is
/// reachable from any position.
pub fn migration_stream(data: &[u8]) -> Result<(), String> {
    let ram = fuzz_ram();
    let map = PageMap::new(&ram);
    let mut incoming = Incoming::default();
    let mut input = data;
    let (mut payload, mut unpacked) = (Vec::new(), Vec::new());
    while !input.is_empty() {
        let kind = protocol::read_frame_into(&mut input, &mut payload).map_err(|e| crate::error_chain(&e))?;
        match kind {
            Kind::Hello => {
                json::<Hello>(kind, &payload)?;
            }
            Kind::Accept | Kind::Refuse => {
                json::<Answer>(kind, &payload)?;
            }
            // The HMAC handshake needs a key and a live peer: its payload's JSON is all a
            // stream can carry to it.
            Kind::Auth => {
                serde_json::from_slice::<serde_json::Value>(&payload).map_err(|e| format!("malformed Auth: {e}"))?;
            }
            Kind::State => {
                decode_state(&payload)?;
            }
            Kind::Memory => incoming.memory(&ram, &payload).map_err(|e| crate::error_chain(&e))?,
            Kind::MemoryLz4 => incoming.compressed_memory(&ram, &payload).map_err(|e| crate::error_chain(&e))?,
            Kind::Complete => {
                let complete: Complete = json(kind, &payload)?;
                incoming.complete(&ram, &complete).map_err(|e| crate::error_chain(&e))?;
            }
            Kind::Running => {
                json::<Running>(kind, &payload)?;
            }
            Kind::Postcopy => {
                let switch: Postcopy = json(kind, &payload)?;
                // What `Postcopy::start` does with the discarded ranges, before the checksum
                // (which a mutated stream rarely matches) so that the ranges get exercised.
                let need = PageSet::full(map.total());
                need.insert_ranges(&map, &switch.discard)?;
                drop_pages(&map, &switch.discard)?;
                incoming.check_crc32(switch.memory_crc32).map_err(|e| crate::error_chain(&e))?;
            }
            Kind::PageRequest => {
                let gpas = parse_requests(&payload).ok_or("malformed PageRequest message")?;
                // The source's lookups for each requested page (outside RAM: skipped there).
                for gpa in gpas {
                    if let Some(index) = map.index_of_gpa(gpa) {
                        assert_eq!(map.gpa(index), gpa & !(crate::migration::pages::PAGE - 1));
                        let _ = map.run_limit(index);
                    }
                }
            }
            Kind::PostcopyPages => {
                postcopy_records(&ram, &payload)?;
            }
            Kind::PostcopyPagesLz4 => {
                let raw = crate::migration::compress::unpack(&payload, &mut unpacked).map_err(|e| e.to_string())?;
                postcopy_records(&ram, raw)?;
            }
            Kind::Done => {
                json::<Done>(kind, &payload)?;
            }
            Kind::Resume | Kind::Urgent => {
                json::<Resume>(kind, &payload)?;
            }
            Kind::Missing => {
                let missing: Missing = json(kind, &payload)?;
                PageSet::new(map.total()).insert_ranges(&map, &missing.ranges)?;
            }
            Kind::Discard => {
                let discard: Missing = json(kind, &payload)?;
                incoming.forget(&ram, &discard.ranges).map_err(|e| crate::error_chain(&e))?;
                drop_pages(&map, &discard.ranges)?;
            }
            Kind::Populate => {
                let populate: Missing = json(kind, &payload)?;
                incoming.populate(&ram, &populate.ranges).map_err(|e| crate::error_chain(&e))?;
            }
            Kind::Sync => {}
        }
    }
    Ok(())
}

/// Parses a State payload the way the destination does.
fn decode_state(payload: &[u8]) -> Result<MachineState, String> {
    MachineState::decode(payload).map_err(|e| crate::error_chain(&e))
}

/// A State body (the payload minus its checksum): parsed, then restored into everything
/// of a VM that is not KVM's (the UART, the MSR block, the hypercall device with its
/// generation word in guest RAM), the way `Vm::restore_machine` and `publish_generation`
/// do after the KVM state. Checks that a parsed state
/// serializes to bytes that parse back to the same state, and that the restore moves the
/// generation on by one.
pub fn machine_state(data: &[u8]) -> Result<(), String> {
    // The input is a State body: a fuzzer would hardly ever get the payload's checksum
    // right, and the checksum itself is the stream target's business.
    let machine = MachineState::from_body(data).map_err(|e| crate::error_chain(&e))?;
    let again = machine.encode().map_err(|e| format!("cannot serialize the state: {e}"))?;
    let reparsed = decode_state(&again).unwrap_or_else(|e| panic!("a parsed state does not parse again: {e}"));
    let third = reparsed.encode().map_err(|e| format!("cannot serialize the state: {e}"))?;
    assert!(again == third, "a parsed state serializes differently after a round trip");

    let ram = fuzz_ram();
    let interrupt = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)
        .map_err(|e| format!("cannot create an eventfd: {e}"))?;
    let serial = SerialDevice::new(interrupt, Console::new(Box::new(std::io::sink())));
    serial.restore_registers(&machine.devices.serial);
    // The restored UART must answer register reads and writes (the guest's next accesses).
    for offset in 0..8 {
        let mut byte = [0u8];
        serial.read(offset, &mut byte);
    }
    let _ = serial.write(0, b"x");
    let _ = serial.registers();
    MsrEmulation::new(UnknownMsrPolicy::Gp).set_scratch(&machine.devices.msr_scratch);
    let recorder = crate::trap::exits::Recorder::new(1, None).map_err(|e| e.to_string())?;
    let hypercalls = HypercallState::new(&ram, Arc::new(AtomicU64::new(0)), recorder);
    hypercalls.import(&machine.devices);
    hypercalls.publish_generation(&ram);
    assert_eq!(hypercalls.generation(), machine.devices.generation.wrapping_add(1), "a restore is one generation on");
    let _ = hypercalls.free_page_count();
    Ok(())
}

/// Control-socket input as the socket's reader takes it: lines of at most the request
/// limit, each trimmed and parsed; for a migrate request, its address parsed too (the
/// first thing the VM's thread does with it). Accepted when every line is.
pub fn control_request(data: &[u8]) -> Result<(), String> {
    let mut reader = std::io::BufReader::new(data).take(crate::api::MAX_REQUEST as u64);
    let mut line = String::new();
    let mut first_error = None;
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => break,
            Ok(_) => {}
            // Not UTF-8: the server drops the connection.
            Err(e) => return Err(first_error.unwrap_or(format!("unreadable request line: {e}"))),
        }
        reader.set_limit(crate::api::MAX_REQUEST as u64);
        let outcome = crate::api::parse(line.trim()).and_then(|request| match request {
            crate::api::Request::Migrate { to, .. } => to
                .parse::<crate::migration::transport::Address>()
                .map(|address| {
                    let _ = address.is_local();
                })
                .map_err(|e| e.to_string()),
            _ => Ok(()),
        });
        if let Err(e) = outcome {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// RAM for [`kernel_image`]: the smallest VM Popek runs (8 MiB, one region).
const IMAGE_RAM: u64 = crate::config::MIN_MEMORY_MIB << 20;
/// The command line [`kernel_image`] boots with, as it lies in guest memory.
const CMDLINE: &[u8] = b"console=ttyS0\0";
const VCPUS: u32 = 2;

/// A kernel image loaded as `popek run --kernel FILE --initrd FILE` would (direct boot,
/// a 4 KiB initrd), and again for firmware boot without an initrd, each into fresh RAM.
/// Accepted when the direct boot loads. Checks that a loaded image left Popek's command
/// line and MP table as written and that its entry state points at boot information.
pub fn kernel_image(data: &[u8]) -> Result<(), String> {
    let initrd = Initrd { data: vec![0xa5; 4096], name: "fuzz-initrd".into() };
    let load = |initrd: Option<&Initrd>, mode: BootMode| -> Result<boot::BootPlan, String> {
        let ram = crate::memory::create_ram(IMAGE_RAM).map_err(|e| crate::error_chain(&e))?;
        let cmdline = std::str::from_utf8(&CMDLINE[..CMDLINE.len() - 1]).unwrap_or_default();
        let request = boot::Boot { kernel: data, name: "<fuzz>", initrd, cmdline, vcpus: VCPUS, mode };
        let plan = boot::load_image(&ram, &request).map_err(|e| crate::error_chain(&e))?;
        // Popek's boot data is intact: images that would overlap it are refused, so no
        // kernel byte may have landed on the command line or the MP table.
        let mut cmdline = [0u8; CMDLINE.len()];
        ram.read_slice(&mut cmdline, GuestAddress(layout::CMDLINE)).expect("the command line in RAM");
        assert_eq!(&cmdline, CMDLINE, "the kernel overwrote the command line");
        let mptable = crate::arch::x86_64::mptable::MpTable { cpus: VCPUS as u8 }.build(layout::MPTABLE);
        let mut found = vec![0u8; mptable.len()];
        ram.read_slice(&mut found, GuestAddress(layout::MPTABLE)).expect("the MP table in RAM");
        assert!(found == mptable, "the kernel overwrote the MP table");
        if let boot::Entry::ProtectedMode(entry) = plan.entry {
            match plan.protocol {
                "multiboot" => assert_eq!(entry.eax, boot::multiboot::BOOTLOADER_MAGIC),
                _ => assert_eq!(u64::from(entry.ebx), layout::PVH_START_INFO),
            }
            // EBX points to the boot information, which was written into RAM.
            let flags_or_magic: u32 = ram.read_obj(GuestAddress(entry.ebx.into())).expect("boot information in RAM");
            assert_ne!(flags_or_magic, 0, "empty boot information at {:#x}", entry.ebx);
        }
        Ok(plan)
    };
    let direct = load(Some(&initrd), BootMode::Direct);
    let firmware = load(None, BootMode::Firmware);
    if let (Ok(direct), Ok(firmware)) = (&direct, &firmware) {
        assert_eq!((direct.protocol, firmware.entry), ("pvh", boot::Entry::ResetVector));
    }
    direct.map(|_| ())
}

/// Bytes per call in a [`hypercall`] input: the `out` (u32 value, u8 width, three bytes
/// unused) and the 48-byte request block written at that address first.
pub const HYPERCALL_STEP: usize = 8 + hc::REQUEST_SIZE;

/// A guest's hypercalls: the input is a sequence of steps of [`HYPERCALL_STEP`] bytes,
/// each `gpa u32 | width u8 | 3 unused | request block` (a short last step is padded with
/// zeros). Each step writes the block into guest RAM at `gpa` (as far as it lies in RAM)
/// and then writes `gpa` to the hypercall port with an access `width % 5` bytes wide, as a
/// guest's `out` does. One device serves every step, so calls see each other's state
/// (free-page hints, the registered generation word). SLEEP is the one call that blocks
/// (up to 10 s, by design): its duration is cut to under a microsecond here.
///
/// Checks: an answered call's `ret` is a result or one of the documented errors, and a
/// call that cannot be answered leaves the block's `ret` as it was. Accepted when every
/// call was answered with a result (`ret >= 0`).
pub fn hypercall(data: &[u8]) -> Result<(), String> {
    let ram = fuzz_ram();
    let recorder = crate::trap::exits::Recorder::new(1, None).map_err(|e| e.to_string())?;
    let state = Arc::new(HypercallState::new(&ram, Arc::new(AtomicU64::new(0)), recorder));
    let device = HypercallDevice::new(ram.clone(), Console::new(Box::new(std::io::sink())), state);
    let mut refused = None;
    for (n, chunk) in data.chunks(HYPERCALL_STEP).enumerate() {
        let mut step = [0u8; HYPERCALL_STEP];
        step[..chunk.len()].copy_from_slice(chunk);
        let gpa = u32::from_le_bytes([step[0], step[1], step[2], step[3]]);
        let width = usize::from(step[4] % 5);
        let block = &mut step[8..];
        let word = |block: &[u8], i: usize| u64::from_le_bytes(block[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
        if word(block, 0) == hc::SLEEP && word(block, 1) <= hc::SLEEP_MAX_NS {
            let short = word(block, 1) % 1000;
            block[8..16].copy_from_slice(&short.to_le_bytes());
        }
        let gpa = u64::from(gpa);
        // Byte by byte: a block straddling the end of a region is written as far as RAM goes.
        for (i, b) in block.iter().enumerate() {
            let _ = ram.write_obj(*b, GuestAddress(gpa + i as u64));
        }
        let ret_at = GuestAddress(gpa + hc::RET_OFFSET as u64);
        let before: Option<i64> = ram.read_obj(ret_at).ok();
        let answerable =
            width == 4 && gpa.is_multiple_of(8) && crate::memory::is_ram(&ram, gpa, hc::REQUEST_SIZE as u64);
        let _ = device.write(0, &gpa.to_le_bytes()[..width]);
        let after: Option<i64> = ram.read_obj(ret_at).ok();
        if answerable {
            let ret = after.unwrap_or(i64::MIN);
            assert!(
                ret >= 0 || [-hc::EFAULT, -hc::EINVAL, -hc::ENOSYS].contains(&ret),
                "call {n}: undocumented result {ret}"
            );
            if ret < 0 {
                refused.get_or_insert(format!("call {n}: error {ret}"));
            }
        } else {
            assert_eq!(before, after, "call {n}: an unanswerable call changed the block");
            refused.get_or_insert(format!("call {n}: no valid request block at {gpa:#x}"));
        }
    }
    refused.map_or(Ok(()), Err)
}
