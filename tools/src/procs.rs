//! Child processes of a benchmark or fault-matrix cell: `popek run` sources and
//! destinations, `popek migrate`, QEMU; output in files, killed on drop (a cell never
//! leaves a VM behind).

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Proc {
    child: Child,
    out: PathBuf,
    err: PathBuf,
    status: Option<i32>,
}

impl Proc {
    /// Runs `program ARGS` (through `prefix`, e.g. `ip netns exec NAME`, when not empty)
    /// with its output in `dir/TAG.out` and `dir/TAG.err`.
    pub fn spawn(prefix: &[String], program: &Path, args: &[&str], dir: &Path, tag: &str) -> Result<Proc, String> {
        let out = dir.join(format!("{tag}.out"));
        let err = dir.join(format!("{tag}.err"));
        let file = |p: &Path| std::fs::File::create(p).map_err(|e| format!("{}: {e}", p.display()));
        let mut command = match prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(program);
                c
            }
            None => Command::new(program),
        };
        let child = command
            .args(args)
            .stdin(Stdio::null())
            .stdout(file(&out)?)
            .stderr(file(&err)?)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", program.display()))?;
        Ok(Proc { child, out, err, status: None })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    /// The exit status if it ended (a signal `s` counts as 128 + s, as a shell says).
    pub fn try_status(&mut self) -> Option<i32> {
        if self.status.is_none() {
            if let Ok(Some(s)) = self.child.try_wait() {
                self.status = Some(s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0)));
            }
        }
        self.status
    }

    /// Waits for the process to end, at most `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_status() {
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until `needle` shows up in stdout or stderr.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.stdout().contains(needle) || self.stderr().contains(needle) {
                return Ok(());
            }
            if let Some(status) = self.try_status() {
                return Err(format!("ended (status {status}) before {needle:?}: {}", last_line(&self.stderr())));
            }
            if Instant::now() > deadline {
                return Err(format!("never said {needle:?} in {timeout:?}"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn kill(&mut self) {
        if self.try_status().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last non-empty line of `text`, at most 160 characters.
pub fn last_line(text: &str) -> String {
    let line = text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
    match line.char_indices().nth(160) {
        Some((at, _)) => format!("{}...", &line[..at]),
        None => line.to_string(),
    }
}
