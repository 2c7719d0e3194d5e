//! Decides, frame by frame, what the relay does: it follows the protocol's phases from
//! the message kinds it sees in both directions and fires the planned fault once, at the
//! first frame of the planned phase. Pure logic (no sockets), so it is unit-tested.

use crate::plan::{Cell, Fault, Mode, Phase};
use std::time::Duration;

/// Message kinds (vmm/src/migration/protocol.rs; docs/migration.md). Kept here rather
/// than imported: the relay is an outside observer of the documented wire format.
pub mod kind {
    pub const HELLO: u16 = 1;
    pub const REFUSE: u16 = 3;
    pub const STATE: u16 = 4;
    pub const MEMORY: u16 = 5;
    pub const COMPLETE: u16 = 6;
    pub const RUNNING: u16 = 7;
    pub const POSTCOPY: u16 = 9;
    pub const POSTCOPY_PAGES: u16 = 11;
    pub const RESUME: u16 = 13;
    pub const URGENT: u16 = 15;
    pub const DISCARD: u16 = 16;
    pub const SYNC: u16 = 17;
    pub const POPULATE: u16 = 18;
    pub const MEMORY_LZ4: u16 = 19;
    pub const POSTCOPY_PAGES_LZ4: u16 = 20;
}

/// Which way a frame travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Source -> destination.
    ToDst,
    /// Destination -> source.
    ToSrc,
}

/// A relayed connection (numbered in the order the source opened them).
pub type ConnId = usize;

/// What to do with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Forward,
    /// Stop forwarding everywhere for this long, then forward this frame.
    Stall(Duration),
    /// Drop this frame and shut every connection down.
    Cut,
    /// Drop this frame and SIGKILL the destination (false) or the source (true).
    Kill {
        source: bool,
    },
    /// Drop this frame, stop passing anything to the destination (its side is shut
    /// down), and answer the source's next frame that waits for an answer with Refuse.
    StartRefusing,
    /// Drop this frame (refusing: the destination no longer hears anything).
    Discard,
    /// Drop this frame and send Refuse to the source on connection `on`, then shut every
    /// connection down.
    Refuse {
        on: ConnId,
    },
}

/// Phase tracking and the one planned fault.
pub struct Injector {
    cell: Cell,
    delay: Duration,
    memory_frames: u32,
    /// Postcopy (the switch) went by: the source's State then waits for Running.
    switched: bool,
    /// Running went by towards the source.
    running: bool,
    /// The connection of the last Hello or Resume: where the source reads answers.
    main: ConnId,
    refusing: bool,
    /// Which frame the fault hit, once it fired.
    pub fired: Option<String>,
    /// Message kinds seen, in order of first appearance per direction (for the report).
    pub seen: Vec<(Dir, u16)>,
}

impl Injector {
    pub fn new(cell: Cell, delay: Duration) -> Injector {
        Injector {
            cell,
            delay,
            memory_frames: 0,
            switched: false,
            running: false,
            main: 0,
            refusing: false,
            fired: None,
            seen: Vec::new(),
        }
    }

    /// Whether the relay is answering for a refusing destination (a destination side
    /// closing then must not close the source's side before the Refuse went out).
    pub fn refusing(&self) -> bool {
        self.refusing
    }

    pub fn on_frame(&mut self, conn: ConnId, dir: Dir, kind: u16) -> Action {
        if !self.seen.contains(&(dir, kind)) {
            self.seen.push((dir, kind));
        }
        if self.refusing {
            return self.refusing_frame(conn, dir, kind);
        }
        let phase = self.phase_of(dir, kind);
        // Track after deciding: a fault "at Running" hits the Running frame itself.
        match (dir, kind) {
            (Dir::ToDst, kind::HELLO | kind::RESUME) => self.main = conn,
            (Dir::ToDst, kind::POSTCOPY) => self.switched = true,
            _ => {}
        }
        if self.fired.is_some() || phase != Some(self.cell.phase) {
            if (dir, kind) == (Dir::ToSrc, kind::RUNNING) {
                self.running = true;
            }
            return Action::Forward;
        }
        self.fired = Some(format!("{} from {}", name(kind), if dir == Dir::ToDst { "src" } else { "dst" }));
        match self.cell.fault {
            Fault::Cut => Action::Cut,
            Fault::Delay => {
                if (dir, kind) == (Dir::ToSrc, kind::RUNNING) {
                    self.running = true;
                }
                Action::Stall(self.delay)
            }
            Fault::KillDst => Action::Kill { source: false },
            Fault::KillSrc => Action::Kill { source: true },
            // The natural refusal at the handshake is the destination's own (it was
            // prepared for another RAM size): the relay only watches it go by.
            Fault::Refuse if self.cell.phase == Phase::Handshake => {
                self.fired = Some("Hello from src (dst sized otherwise)".into());
                Action::Forward
            }
            // Running replaced by Refuse; after Running the source reads the main link all
            // the time, so the refusal goes out at once.
            Fault::Refuse if dir == Dir::ToSrc || matches!(self.cell.phase, Phase::Running | Phase::Complete) => {
                Action::Refuse { on: self.main }
            }
            Fault::Refuse => {
                self.refusing = true;
                Action::StartRefusing
            }
        }
    }

    /// The phase a frame opens, if it is the planned phase's trigger.
    fn phase_of(&mut self, dir: Dir, kind: u16) -> Option<Phase> {
        match (dir, kind) {
            (Dir::ToDst, kind::HELLO) => Some(Phase::Handshake),
            (Dir::ToDst, kind::MEMORY | kind::MEMORY_LZ4) => {
                self.memory_frames += 1;
                // Post-copy sends one Memory frame (the device pages) before the switch.
                let at = if self.cell.mode == Mode::Postcopy { 1 } else { 2 };
                (self.memory_frames == at).then_some(Phase::Memory)
            }
            (Dir::ToSrc, kind::RUNNING) => Some(Phase::State),
            (Dir::ToDst, kind::POSTCOPY_PAGES | kind::POSTCOPY_PAGES_LZ4) if self.running => Some(Phase::Running),
            // Nothing was left to pull (see Phase::Running): the running phase's fault
            // hits the end of it.
            (Dir::ToDst, kind::COMPLETE) if self.running && self.cell.phase == Phase::Running => Some(Phase::Running),
            (Dir::ToDst, kind::COMPLETE) if self.running => Some(Phase::Complete),
            _ => None,
        }
    }

    fn refusing_frame(&mut self, conn: ConnId, dir: Dir, kind: u16) -> Action {
        if dir == Dir::ToSrc {
            return Action::Discard;
        }
        let waits_for_answer = match kind {
            kind::HELLO
            | kind::URGENT
            | kind::RESUME
            | kind::SYNC
            | kind::DISCARD
            | kind::POPULATE
            | kind::COMPLETE => true,
            kind::STATE => self.switched, // post-copy: Running follows the state
            kind::POSTCOPY => {
                self.switched = true;
                false
            }
            _ => false,
        };
        if waits_for_answer {
            self.refusing = false;
            Action::Refuse { on: conn }
        } else {
            Action::Discard
        }
    }
}

/// A kind's name for the report.
pub fn name(kind: u16) -> &'static str {
    const NAMES: [&str; 21] = [
        "?",
        "Hello",
        "Accept",
        "Refuse",
        "State",
        "Memory",
        "Complete",
        "Running",
        "Auth",
        "Postcopy",
        "PageRequest",
        "PostcopyPages",
        "Done",
        "Resume",
        "Missing",
        "Urgent",
        "Discard",
        "Sync",
        "Populate",
        "MemoryLz4",
        "PostcopyPagesLz4",
    ];
    NAMES.get(usize::from(kind)).copied().unwrap_or("?")
}

#[cfg(test)]
mod tests {
    use super::kind::*;
    use super::*;

    fn injector(mode: Mode, phase: Phase, fault: Fault) -> Injector {
        Injector::new(Cell { mode, phase, fault }, Duration::from_secs(2))
    }

    #[test]
    fn a_cut_at_memory_hits_the_second_memory_frame_and_only_once() {
        let mut i = injector(Mode::Precopy, Phase::Memory, Fault::Cut);
        assert_eq!(i.on_frame(0, Dir::ToDst, HELLO), Action::Forward);
        assert_eq!(i.on_frame(0, Dir::ToSrc, 2), Action::Forward);
        assert_eq!(i.on_frame(0, Dir::ToDst, MEMORY), Action::Forward);
        assert_eq!(i.on_frame(0, Dir::ToDst, MEMORY), Action::Cut);
        assert_eq!(i.on_frame(0, Dir::ToDst, MEMORY), Action::Forward);
        assert_eq!(i.fired.as_deref(), Some("Memory from src"));
    }

    #[test]
    fn postcopy_memory_is_its_one_frame_and_running_waits_for_the_running_message() {
        let mut i = injector(Mode::Postcopy, Phase::Memory, Fault::KillDst);
        assert_eq!(i.on_frame(0, Dir::ToDst, MEMORY), Action::Kill { source: false });
        let mut i = injector(Mode::Hybrid, Phase::Running, Fault::KillSrc);
        // Pages answering the restore's faults go before Running: not yet.
        assert_eq!(i.on_frame(1, Dir::ToDst, POSTCOPY_PAGES), Action::Forward);
        assert_eq!(i.on_frame(0, Dir::ToSrc, RUNNING), Action::Forward);
        assert_eq!(i.on_frame(1, Dir::ToDst, POSTCOPY_PAGES), Action::Kill { source: true });
        // Nothing left to pull: the end of post-copy instead.
        let mut i = injector(Mode::Hybrid, Phase::Running, Fault::Cut);
        assert_eq!(i.on_frame(0, Dir::ToSrc, RUNNING), Action::Forward);
        assert_eq!(i.on_frame(0, Dir::ToDst, COMPLETE), Action::Cut);
        let mut i = injector(Mode::Postcopy, Phase::Complete, Fault::KillSrc);
        assert_eq!(i.on_frame(0, Dir::ToDst, COMPLETE), Action::Forward, "not before Running");
        assert_eq!(i.on_frame(0, Dir::ToSrc, RUNNING), Action::Forward);
        assert_eq!(i.on_frame(0, Dir::ToDst, POSTCOPY_PAGES), Action::Forward);
        assert_eq!(i.on_frame(0, Dir::ToDst, COMPLETE), Action::Kill { source: true });
    }

    #[test]
    fn a_delay_at_state_stalls_running_and_lets_running_phase_follow() {
        let mut i = injector(Mode::Postcopy, Phase::State, Fault::Delay);
        assert_eq!(i.on_frame(0, Dir::ToSrc, RUNNING), Action::Stall(Duration::from_secs(2)));
        assert!(i.running);
    }

    #[test]
    fn refusing_answers_the_next_frame_that_waits_for_an_answer() {
        let mut i = injector(Mode::StopCopy, Phase::Memory, Fault::Refuse);
        i.on_frame(0, Dir::ToDst, HELLO);
        i.on_frame(0, Dir::ToDst, MEMORY);
        assert_eq!(i.on_frame(0, Dir::ToDst, MEMORY), Action::StartRefusing);
        assert!(i.refusing());
        assert_eq!(i.on_frame(0, Dir::ToDst, MEMORY), Action::Discard);
        assert_eq!(i.on_frame(0, Dir::ToDst, STATE), Action::Discard, "stop-copy: Complete follows the state");
        assert_eq!(i.on_frame(0, Dir::ToDst, COMPLETE), Action::Refuse { on: 0 });
        assert!(!i.refusing());
        // Post-copy: the state itself waits for Running.
        let mut i = injector(Mode::Postcopy, Phase::Memory, Fault::Refuse);
        assert_eq!(i.on_frame(0, Dir::ToDst, MEMORY), Action::StartRefusing);
        assert_eq!(i.on_frame(0, Dir::ToDst, POSTCOPY), Action::Discard);
        assert_eq!(i.on_frame(0, Dir::ToDst, STATE), Action::Refuse { on: 0 });
    }

    #[test]
    fn the_handshake_refusal_is_the_destinations_own() {
        let mut i = injector(Mode::StopCopy, Phase::Handshake, Fault::Refuse);
        assert_eq!(i.on_frame(0, Dir::ToDst, HELLO), Action::Forward);
        assert!(i.fired.is_some() && !i.refusing());
    }

    #[test]
    fn a_refusal_after_running_goes_to_the_main_connection_at_once() {
        let mut i = injector(Mode::Hybrid, Phase::Running, Fault::Refuse);
        i.on_frame(0, Dir::ToDst, HELLO);
        i.on_frame(1, Dir::ToDst, URGENT);
        i.on_frame(0, Dir::ToSrc, RUNNING);
        assert_eq!(i.on_frame(1, Dir::ToDst, POSTCOPY_PAGES), Action::Refuse { on: 0 });
        let mut i = injector(Mode::Precopy, Phase::State, Fault::Refuse);
        i.on_frame(0, Dir::ToDst, HELLO);
        assert_eq!(i.on_frame(0, Dir::ToSrc, RUNNING), Action::Refuse { on: 0 });
    }
}
