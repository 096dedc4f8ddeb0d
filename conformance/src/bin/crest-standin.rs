//! `crest-standin FAULT REAL-CREST [CREST ARGS…]`: a broken engine, for
//! testing that the conformance gate notices. It runs the real crest with the
//! arguments it was given, except for one defect:
//!
//! - `refuse-all`: every dump and restore is refused as unsupported (exit 3,
//!   with a proper `crest: error:` line);
//! - `no-restore`: `restore` exits 0 without restoring anything;
//! - `flip-byte`: before the real dump, one byte in the middle of the
//!   target's largest private anonymous writable mapping is flipped, so the
//!   restored process has one byte of memory changed;
//! - `drop-nonblock`: before the real dump, O_NONBLOCK is cleared on every
//!   descriptor of the target that has it (through a duplicate of the
//!   descriptor, which shares its open file description), so the restored
//!   process has lost it;
//! - `ignore-pre-copy`: `dump --pre-copy` runs as a plain dump (the pre-copy
//!   options are dropped), as an engine that ignored them would.
//!
//! The last two change the target just before it is dumped: seen from
//! outside, that is the same as a dump or restore that changed it.
//!
//! Use it through a script given to `--engine-bin`:
//! `exec /path/crest-standin flip-byte /path/crest "$@"`.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};

/// The subcommand and the target pid of `crest [-v…] dump (-t|--session|--pgid) N …`.
fn subcommand_and_target(args: &[String]) -> (Option<&str>, Option<i32>) {
    let sub = args
        .iter()
        .find(|a| !a.starts_with('-'))
        .map(String::as_str);
    let target = args
        .windows(2)
        .find(|w| matches!(w[0].as_str(), "-t" | "--tree" | "--session" | "--pgid"))
        .and_then(|w| w[1].parse().ok());
    (sub, target)
}

/// Flips the middle byte of `pid`'s largest private anonymous rw mapping.
fn flip_byte(pid: i32) -> Result<String, String> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).map_err(|e| e.to_string())?;
    let (start, end) = maps
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let anon = f.len() == 5 || f.get(5) == Some(&"[heap]");
            if f.get(1) != Some(&"rw-p") || !anon {
                return None;
            }
            let (a, b) = f[0].split_once('-')?;
            Some((
                u64::from_str_radix(a, 16).ok()?,
                u64::from_str_radix(b, 16).ok()?,
            ))
        })
        .max_by_key(|(a, b)| b - a)
        .ok_or("no private anonymous writable mapping")?;
    let at = start + (end - start) / 2;
    let mem = OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/{pid}/mem"))
        .map_err(|e| e.to_string())?;
    let mut b = [0u8; 1];
    mem.read_exact_at(&mut b, at).map_err(|e| e.to_string())?;
    b[0] ^= 0xff;
    mem.write_all_at(&b, at).map_err(|e| e.to_string())?;
    Ok(format!("flipped the byte at {at:#x} of pid {pid}"))
}

/// Clears O_NONBLOCK on every descriptor of `pid` that has it.
fn drop_nonblock(pid: i32) -> Result<String, String> {
    // SAFETY: pidfd_open takes plain values and returns a new fd or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    if pidfd < 0 {
        return Err(format!("pidfd_open: {}", std::io::Error::last_os_error()));
    }
    let mut cleared = Vec::new();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_err(|e| e.to_string())?;
    for fd in fds.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok()) {
        let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap_or_default();
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|v| i32::from_str_radix(v.trim(), 8).ok())
            .unwrap_or(0);
        if flags & libc::O_NONBLOCK == 0 {
            continue;
        }
        // SAFETY: pidfd_getfd takes plain values and returns a new fd or -1.
        let mine = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd, fd, 0) } as i32;
        if mine < 0 {
            continue;
        }
        // SAFETY: fcntl on the duplicate we own; then it is closed.
        unsafe {
            let fl = libc::fcntl(mine, libc::F_GETFL);
            libc::fcntl(mine, libc::F_SETFL, fl & !libc::O_NONBLOCK);
            libc::close(mine);
        }
        cleared.push(fd.to_string());
    }
    // SAFETY: closing the pidfd opened above.
    unsafe { libc::close(pidfd) };
    Ok(format!(
        "cleared O_NONBLOCK on fds [{}] of pid {pid}",
        cleared.join(", ")
    ))
}

/// `args` without `--pre-copy` and its options (with their values).
fn without_pre_copy(args: &[OsString]) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        match s.as_ref() {
            "--pre-copy" => {}
            "--pre-copy-rounds" | "--pre-copy-tracker" => {
                it.next();
            }
            _ if s.starts_with("--pre-copy-") => {}
            _ => out.push(a.clone()),
        }
    }
    out
}

fn main() -> ExitCode {
    let argv: Vec<OsString> = std::env::args_os().skip(1).collect();
    let (Some(fault), Some(real)) = (argv.first(), argv.get(1)) else {
        eprintln!(
            "usage: crest-standin refuse-all|no-restore|flip-byte|drop-nonblock|ignore-pre-copy REAL-CREST [ARGS…]"
        );
        return ExitCode::from(2);
    };
    let fault = fault.to_string_lossy().to_string();
    let mut rest: Vec<OsString> = argv[2..].to_vec();
    let args: Vec<String> = rest
        .iter()
        .map(|a| a.to_string_lossy().to_string())
        .collect();
    let (sub, target) = subcommand_and_target(&args);
    match (fault.as_str(), sub) {
        ("refuse-all", Some("dump" | "restore")) => {
            eprintln!(
                "crest: error: pid {}: everything: not supported yet",
                target.unwrap_or(0)
            );
            return ExitCode::from(3);
        }
        ("no-restore", Some("restore")) => return ExitCode::SUCCESS,
        ("flip-byte" | "drop-nonblock", Some("dump")) => {
            let Some(pid) = target else {
                eprintln!("crest-standin: no target pid in {args:?}");
                return ExitCode::from(2);
            };
            let done = if fault == "flip-byte" {
                flip_byte(pid)
            } else {
                drop_nonblock(pid)
            };
            match done {
                Ok(what) => eprintln!("crest-standin: {what}"),
                Err(e) => eprintln!("crest-standin: {fault} on pid {pid}: {e}"),
            }
        }
        ("ignore-pre-copy", Some("dump")) => rest = without_pre_copy(&rest),
        ("refuse-all" | "no-restore" | "flip-byte" | "drop-nonblock" | "ignore-pre-copy", _) => {}
        (other, _) => {
            eprintln!("crest-standin: unknown fault {other:?}");
            return ExitCode::from(2);
        }
    }
    let e = Command::new(real).args(&rest).exec();
    eprintln!("crest-standin: exec {}: {e}", real.to_string_lossy());
    ExitCode::from(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pre_copy_options_are_dropped() {
        let a = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(
            without_pre_copy(&a(&[
                "dump",
                "-t",
                "1",
                "--pre-copy",
                "--pre-copy-tracker",
                "soft-dirty",
                "--pre-copy-rounds=2",
                "-D",
                "x"
            ])),
            a(&["dump", "-t", "1", "-D", "x"])
        );
    }

    #[test]
    fn finds_the_subcommand_and_its_target() {
        let a = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            subcommand_and_target(&a(&["-v", "dump", "-t", "42", "-D", "x"])),
            (Some("dump"), Some(42))
        );
        assert_eq!(
            subcommand_and_target(&a(&["-v", "dump", "--session", "7", "-D", "x"])),
            (Some("dump"), Some(7))
        );
        assert_eq!(
            subcommand_and_target(&a(&["restore", "-D", "x"])),
            (Some("restore"), None)
        );
    }
}
