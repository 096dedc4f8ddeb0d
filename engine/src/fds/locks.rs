//! File locks: flock, POSIX record and OFD locks held by the dumped processes.
//!
//! Collect reads them from each descriptor's fdinfo: its `lock:` lines list
//! the locks set through that open file whose owner is the process (POSIX) or
//! the open file itself (flock, OFD). Restore takes them again through the
//! restored process once its descriptors are final (closing any descriptor of
//! a file drops the process's POSIX locks on it), failing clearly when someone
//! else holds a conflicting lock by then.

use crate::error::Error;
use crate::sys::remote::RemoteCall;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LockKind {
    /// flock(2): owned by the open file description.
    Flock,
    /// fcntl F_SETLK: owned by the process.
    Posix,
    /// fcntl F_OFD_SETLK: owned by the open file description.
    Ofd,
}

/// One lock, taken again through descriptor `fd`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileLock {
    pub fd: i32,
    pub kind: LockKind,
    pub write: bool,
    pub start: u64,
    /// 0: to the end of the file, however long it grows.
    pub len: u64,
}

impl FileLock {
    pub fn describe(&self) -> String {
        let kind = match self.kind {
            LockKind::Flock => "flock",
            LockKind::Posix => "POSIX",
            LockKind::Ofd => "OFD",
        };
        let mode = if self.write { "write" } else { "read" };
        match (self.kind, self.len) {
            (LockKind::Flock, _) => format!("fd {}: {kind} {mode} lock", self.fd),
            (_, 0) => format!(
                "fd {}: {kind} {mode} lock from {} to EOF",
                self.fd, self.start
            ),
            (_, len) => format!(
                "fd {}: {kind} {mode} lock on bytes {}..{}",
                self.fd,
                self.start,
                self.start + len
            ),
        }
    }
}

/// The locks in one descriptor's fdinfo, e.g.
/// `lock:\t1: POSIX  ADVISORY  WRITE 1234 08:01:5678 0 9`. Leases,
/// delegations and mandatory locks are refused (the reason is returned).
pub fn parse_fdinfo(fd: i32, fdinfo: &str) -> Result<Vec<FileLock>, NotCarried> {
    let mut out = Vec::new();
    for line in fdinfo.lines().filter_map(|l| l.strip_prefix("lock:")) {
        let w: Vec<&str> = line.split_whitespace().collect();
        // [id:, kind, ADVISORY|MANDATORY, READ|WRITE, pid, dev:ino, start, end]
        let (Some(kind), Some(mode), Some(rw), Some(start), Some(end)) =
            (w.get(1), w.get(2), w.get(3), w.get(6), w.get(7))
        else {
            return Err(NotCarried::Unreadable {
                fd,
                line: line.to_string(),
            });
        };
        let kind = match *kind {
            "FLOCK" => LockKind::Flock,
            "POSIX" => LockKind::Posix,
            "OFDLCK" => LockKind::Ofd,
            other => {
                return Err(NotCarried::Lease {
                    fd,
                    kind: other.to_string(),
                })
            }
        };
        if *mode != "ADVISORY" {
            return Err(NotCarried::NotAdvisory {
                fd,
                kind: w[1].to_string(),
                mode: mode.to_string(),
            });
        }
        let write = match *rw {
            "WRITE" => true,
            "READ" => false,
            other => {
                return Err(NotCarried::Type {
                    fd,
                    rw: other.to_string(),
                })
            }
        };
        let start: u64 = start.parse().map_err(|_| NotCarried::Start {
            fd,
            start: start.to_string(),
        })?;
        let len = match *end {
            "EOF" => 0,
            e => e
                .parse::<u64>()
                .map(|e| e + 1 - start)
                .map_err(|_| NotCarried::End {
                    fd,
                    end: e.to_string(),
                })?,
        };
        let lock = FileLock {
            fd,
            kind,
            write,
            start,
            len,
        };
        if !out.contains(&lock) {
            out.push(lock);
        }
    }
    Ok(out)
}

/// A lock crest does not carry (a lease, a mandatory lock), or a lock line
/// it cannot read.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotCarried {
    #[error("fd {fd}: unreadable lock line {line:?}")]
    Unreadable { fd: i32, line: String },
    #[error("fd {fd}: holds a {kind} (leases and delegations)")]
    Lease { fd: i32, kind: String },
    #[error("fd {fd}: holds a {kind} {mode} lock")]
    NotAdvisory { fd: i32, kind: String, mode: String },
    #[error("fd {fd}: holds a lock of type {rw}")]
    Type { fd: i32, rw: String },
    #[error("fd {fd}: lock start {start:?}")]
    Start { fd: i32, start: String },
    #[error("fd {fd}: lock end {end:?}")]
    End { fd: i32, end: String },
}

/// `struct flock` as x86-64 lays it out: type, whence, start, len, pid.
fn flock_bytes(l: &FileLock) -> [u8; 32] {
    let mut b = [0u8; 32];
    let ty = if l.write {
        libc::F_WRLCK
    } else {
        libc::F_RDLCK
    } as i16;
    b[0..2].copy_from_slice(&ty.to_ne_bytes());
    b[2..4].copy_from_slice(&(libc::SEEK_SET as i16).to_ne_bytes());
    b[8..16].copy_from_slice(&(l.start as i64).to_ne_bytes());
    b[16..24].copy_from_slice(&(l.len as i64).to_ne_bytes());
    b
}

/// Takes `locks` again in the restored process behind `remote` (stopped,
/// seized; its scratch page holds the `struct flock`).
pub fn restore(remote: &RemoteCall, locks: &[FileLock]) -> Result<(), LockError> {
    const F_OFD_SETLK: u64 = 37;
    for l in locks {
        let r = match l.kind {
            LockKind::Flock => {
                let op = if l.write {
                    libc::LOCK_EX
                } else {
                    libc::LOCK_SH
                } | libc::LOCK_NB;
                remote.raw(libc::SYS_flock, [l.fd as u64, op as u64, 0, 0, 0, 0])?
            }
            LockKind::Posix | LockKind::Ofd => {
                let scratch = remote.write_scratch(0, &flock_bytes(l))?;
                let cmd = if l.kind == LockKind::Posix {
                    libc::F_SETLK as u64
                } else {
                    F_OFD_SETLK
                };
                remote.raw(libc::SYS_fcntl, [l.fd as u64, cmd, scratch, 0, 0, 0])?
            }
        };
        if (-4095..0).contains(&r) {
            let (pid, lock) = (remote.pid(), l.describe());
            return Err(match nix::errno::Errno::from_raw(-r as i32) {
                nix::errno::Errno::EAGAIN | nix::errno::Errno::EACCES => {
                    LockError::Conflict { pid, lock }
                }
                errno => LockError::Failed { pid, lock, errno },
            });
        }
    }
    Ok(())
}

/// Why a restored process could not take a lock again.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("pid {pid}: {lock}: cannot take it again: another process holds a conflicting lock")]
    Conflict { pid: i32, lock: String },
    #[error("pid {pid}: {lock}: cannot take it again: {errno}")]
    Failed {
        pid: i32,
        lock: String,
        errno: nix::errno::Errno,
    },
    #[error(transparent)]
    Engine(#[from] Error),
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    #[rstest]
    #[case(
        "lock:\t1: FLOCK  ADVISORY  WRITE 12 fe:00:99 0 EOF",
        LockKind::Flock,
        true,
        0,
        0
    )]
    #[case(
        "lock:\t2: POSIX  ADVISORY  WRITE 12 fe:00:99 0 9",
        LockKind::Posix,
        true,
        0,
        10
    )]
    #[case(
        "lock:\t3: POSIX  ADVISORY  READ 12 fe:00:99 100 EOF",
        LockKind::Posix,
        false,
        100,
        0
    )]
    #[case(
        "lock:\t4: OFDLCK ADVISORY  READ -1 fe:00:99 5 5",
        LockKind::Ofd,
        false,
        5,
        1
    )]
    fn parses_fdinfo_lock_lines(
        #[case] line: &str,
        #[case] kind: LockKind,
        #[case] write: bool,
        #[case] start: u64,
        #[case] len: u64,
    ) {
        let text = format!("pos:\t0\nflags:\t02\nmnt_id:\t24\nino:\t99\n{line}\n");
        assert_eq!(
            parse_fdinfo(7, &text),
            Ok(vec![FileLock {
                fd: 7,
                kind,
                write,
                start,
                len
            }])
        );
    }

    #[rstest]
    #[case("lock:\t1: LEASE  ACTIVE    READ 12 fe:00:99 0 EOF", "LEASE")]
    #[case("lock:\t1: POSIX  MANDATORY WRITE 12 fe:00:99 0 EOF", "MANDATORY")]
    fn refuses_leases_and_mandatory_locks(#[case] line: &str, #[case] mentions: &str) {
        let err = parse_fdinfo(3, line).unwrap_err().to_string();
        assert!(err.contains(mentions), "{err}");
    }

    #[test]
    fn no_lock_lines_no_locks() {
        assert_eq!(parse_fdinfo(3, "pos:\t0\nflags:\t02\n"), Ok(vec![]));
    }
}
