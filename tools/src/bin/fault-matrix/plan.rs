//! The matrix's coordinates: migration mode x protocol phase x fault, which combinations
//! mean something, and what a cell's name is.

use std::fmt;

/// A migration mode, as `popek migrate --mode` spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    StopCopy,
    Precopy,
    Postcopy,
    Hybrid,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::StopCopy => "stop-copy",
            Mode::Precopy => "precopy",
            Mode::Postcopy => "postcopy",
            Mode::Hybrid => "hybrid",
        }
    }

    /// Whether the VM can run on the destination before all of its memory is there.
    pub fn postcopy(self) -> bool {
        matches!(self, Mode::Postcopy | Mode::Hybrid)
    }
}

/// Where in the protocol the fault hits (docs/migration.md, "Sequence").
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// The source's Hello reaches the relay (the destination has not accepted yet).
    Handshake,
    /// Page stream: the second Memory frame (the first in post-copy, whose only Memory
    /// frame before the switch carries the device pages).
    Memory,
    /// The machine state went out and the destination answers Running: the fault hits
    /// that answer before it reaches the source. The VM already runs on the destination.
    State,
    /// Post-copy and hybrid, after Running reached the source: the first page frame the
    /// source sends afterwards (memory is still being pulled). A hybrid migration whose
    /// guest dirtied nothing since the last round has no pages left to pull: then the
    /// fault hits the source's Complete.
    Running,
    /// Post-copy and hybrid: the source's Complete (every page sent), before the
    /// destination's Done.
    Complete,
}

/// What goes wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// Every relayed connection is shut down in both directions, both processes live on;
    /// later connections (a post-copy reconnection) are relayed again.
    Cut,
    /// The relay stops forwarding in both directions for a while, then goes on.
    Delay,
    /// SIGKILL to the destination process.
    KillDst,
    /// SIGKILL to the source process.
    KillSrc,
    /// The destination refuses: a real size mismatch at the handshake, later a Refuse
    /// frame in place of the destination's next answer.
    Refuse,
}

impl Fault {
    pub fn name(self) -> &'static str {
        match self {
            Fault::Cut => "cut",
            Fault::Delay => "delay",
            Fault::KillDst => "kill-dst",
            Fault::KillSrc => "kill-src",
            Fault::Refuse => "refuse",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Handshake => "handshake",
            Phase::Memory => "memory",
            Phase::State => "state",
            Phase::Running => "running",
            Phase::Complete => "complete",
        })
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One cell of the matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Cell {
    pub mode: Mode,
    pub phase: Phase,
    pub fault: Fault,
}

impl Cell {
    pub fn name(&self) -> String {
        format!("{} {} {}", self.mode, self.phase, self.fault)
    }

    /// A side killed once the VM ran on the destination in post-copy: neither side alone
    /// holds the VM any more (docs/migration.md, "The unrecoverable case"). The survivor
    /// must say so and exit; the VM is gone by design. (The source killed at Complete is
    /// not: every page was sent, and the destination keeps the VM if they all arrived.)
    pub fn documented_unrecoverable(&self) -> bool {
        self.mode.postcopy()
            && match self.fault {
                Fault::KillSrc => matches!(self.phase, Phase::State | Phase::Running),
                Fault::KillDst => matches!(self.phase, Phase::Running | Phase::Complete),
                _ => false,
            }
    }
}

/// Whether a combination means something. `running` and `complete` exist only where the
/// VM can run on the destination with memory still to come; killing the source before the destination
/// runs the VM destroys its only copy (no VMM can survive that, so nothing is tested).
pub fn applicable(mode: Mode, phase: Phase, fault: Fault) -> bool {
    if matches!(phase, Phase::Running | Phase::Complete) && !mode.postcopy() {
        return false;
    }
    !(fault == Fault::KillSrc && matches!(phase, Phase::Handshake | Phase::Memory))
}

/// Every applicable cell of the chosen modes, phases and faults, mode by mode.
pub fn cells(modes: &[Mode], phases: &[Phase], faults: &[Fault]) -> Vec<Cell> {
    let mut cells = Vec::new();
    for &mode in modes {
        for &phase in phases {
            for &fault in faults {
                if applicable(mode, phase, fault) {
                    cells.push(Cell { mode, phase, fault });
                }
            }
        }
    }
    cells
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_full_matrix_has_every_meaningful_cell_once() {
        let all = cells(
            &[Mode::StopCopy, Mode::Precopy, Mode::Postcopy, Mode::Hybrid],
            &[Phase::Handshake, Phase::Memory, Phase::State, Phase::Running, Phase::Complete],
            &[Fault::Cut, Fault::Delay, Fault::KillDst, Fault::KillSrc, Fault::Refuse],
        );
        // stop-copy and pre-copy: 3 phases x 4 faults + kill-src at state; post-copy and
        // hybrid: 5 x 4 + kill-src at state, running and complete.
        assert_eq!(all.len(), 2 * 13 + 2 * 23);
        assert!(!all.iter().any(|c| c.phase == Phase::Running && !c.mode.postcopy()));
        assert_eq!(all.iter().filter(|c| c.documented_unrecoverable()).count(), 8);
    }
}
