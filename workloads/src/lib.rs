//! The workload protocol shared by every program in this crate.
//!
//! A workload is a program the conformance suite checkpoints. It is started as
//! `WORKLOAD --ctl DIR [ARGS…]` in a session of its own and then:
//!
//! 1. sets up the state its requirement is about (a heap pattern, an open file…);
//! 2. calls [`Ctl::ready`], which atomically creates `DIR/ready` holding its pid;
//! 3. calls [`Ctl::wait_for_go`], which returns once `DIR/go` exists — the harness
//!    creates it after the dump and restore cycles are done;
//! 4. checks that its state survived and calls [`Ctl::finish`] with the list of
//!    differences: it writes `DIR/result` (`ok` or the differences, one per line),
//!    prints the differences on stderr and exits 0 when there are none, 1 otherwise.
//!
//! The control directory is a plain directory so that the protocol itself uses
//! no resource the engine must carry across (no pipe, socket or signal).

pub mod support;

use std::ffi::OsString;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The name of the file a workload creates when its state is set up.
pub const READY_FILE: &str = "ready";
/// The name of the file the harness creates to ask the workload to verify.
pub const GO_FILE: &str = "go";
/// The name of the file a workload writes its verdict to.
pub const RESULT_FILE: &str = "result";

/// A workload's end of the protocol.
#[derive(Debug, Clone)]
pub struct Ctl {
    dir: PathBuf,
}

impl Ctl {
    /// Parses `--ctl DIR` from the front of the command line and returns the
    /// remaining arguments. Exits with status 2 and a usage line when it is missing.
    pub fn from_args() -> (Ctl, Vec<OsString>) {
        let mut args: Vec<OsString> = std::env::args_os().skip(1).collect();
        if args.len() >= 2 && args[0] == "--ctl" {
            let dir = PathBuf::from(args.remove(1));
            args.remove(0);
            return (Ctl { dir }, args);
        }
        let me = std::env::args().next().unwrap_or_else(|| "workload".into());
        eprintln!("usage: {me} --ctl DIR [ARGS…]");
        std::process::exit(2);
    }

    /// A control handle for `dir` (used by tests that drive a workload in-process).
    pub fn new(dir: impl Into<PathBuf>) -> Ctl {
        Ctl { dir: dir.into() }
    }

    /// The control directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A path inside the control directory, for workloads that need scratch files.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Announces that the state is set up: creates `ready` holding this pid.
    pub fn ready(&self) {
        write_atomically(&self.path(READY_FILE), &format!("{}\n", std::process::id()));
    }

    /// Blocks until the harness creates `go`. Polls every few milliseconds with
    /// `nanosleep`, which the engine must restart correctly when it restores a
    /// workload caught inside it.
    pub fn wait_for_go(&self) {
        let go = self.path(GO_FILE);
        while !go.exists() {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Reports the verdict and exits: 0 when `differences` is empty, 1 otherwise.
    pub fn finish(&self, differences: &[String]) -> ! {
        if differences.is_empty() {
            write_atomically(&self.path(RESULT_FILE), "ok\n");
            std::process::exit(0);
        }
        let text = differences.join("\n") + "\n";
        write_atomically(&self.path(RESULT_FILE), &text);
        let _ = std::io::stderr().write_all(text.as_bytes());
        std::process::exit(1);
    }
}

/// Collects the differences a workload finds while verifying its state.
#[derive(Debug, Default)]
pub struct Checks {
    differences: Vec<String>,
}

impl Checks {
    pub fn new() -> Checks {
        Checks::default()
    }

    /// Records `what` as a difference unless `ok`.
    pub fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            self.differences.push(what());
        }
    }

    /// Records a difference when `actual != expected`.
    pub fn eq<T: PartialEq + std::fmt::Debug>(&mut self, what: &str, actual: T, expected: T) {
        if actual != expected {
            self.differences
                .push(format!("{what}: expected {expected:?}, found {actual:?}"));
        }
    }

    /// Records a difference from a failed operation.
    pub fn fail(&mut self, what: impl Into<String>) {
        self.differences.push(what.into());
    }

    pub fn into_differences(self) -> Vec<String> {
        self.differences
    }
}

fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, text)
        .and_then(|()| fs::rename(&tmp, path))
        .unwrap_or_else(|e| {
            eprintln!("workload: cannot write {}: {e}", path.display());
            std::process::exit(3);
        });
}

/// A deterministic byte pattern: `pattern_byte(seed, i)` for offset `i`.
/// Cheap enough to fill and check hundreds of MiB.
pub fn pattern_byte(seed: u64, i: usize) -> u8 {
    let x = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed;
    (x >> 29) as u8 ^ (i >> 12) as u8
}

/// Fills `buf` with the pattern for `seed`.
pub fn fill_pattern(buf: &mut [u8], seed: u64) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = pattern_byte(seed, i);
    }
}

/// The first offset at which `buf` differs from the pattern for `seed`.
pub fn first_pattern_mismatch(buf: &[u8], seed: u64) -> Option<usize> {
    buf.iter()
        .enumerate()
        .find(|&(i, &b)| b != pattern_byte(seed, i))
        .map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_round_trips_and_detects_a_flipped_byte() {
        let mut buf = vec![0u8; 3 * 4096 + 17];
        fill_pattern(&mut buf, 7);
        assert_eq!(first_pattern_mismatch(&buf, 7), None);
        buf[5000] ^= 1;
        assert_eq!(first_pattern_mismatch(&buf, 7), Some(5000));
        assert_ne!(first_pattern_mismatch(&buf, 8), None);
    }

    #[test]
    fn protocol_files_are_written_atomically() {
        let dir = std::env::temp_dir().join(format!("crest-wl-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let ctl = Ctl::new(&dir);
        ctl.ready();
        let pid: u32 = fs::read_to_string(dir.join(READY_FILE))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(pid, std::process::id());
        assert!(!dir.join("ready.tmp").exists());
        fs::remove_dir_all(&dir).unwrap();
    }
}
