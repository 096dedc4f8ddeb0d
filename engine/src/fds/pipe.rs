//! Pipes and FIFOs: which ends are in the dump, their unread data and capacity.
//!
//! Collect notes each end a process holds ([`PipeEnd`], an open file); once
//! every process is collected, [`resolve`] keeps the pipes whose ends are
//! all in the dump ([`Pipe`]), reading their contents without consuming
//! them: the read end is duplicated into crest with `pidfd_getfd` and
//! `tee`d into a scratch pipe. An end whose other end is outside is stdio
//! rebound to the restorer's, or refused.
//! Restore creates each pipe once in the restorer (a FIFO is reopened by its
//! path), refills it, and every process holding an end inherits it.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::fds::table::{FileId, Opened};

/// One end of a pipe, as an open file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipeEnd {
    pub inode: u64,
    pub write: bool,
    /// Status flags of this end (O_NONBLOCK, O_DIRECT…).
    pub flags: i32,
    /// A named FIFO: reopened by this path rather than created anew.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fifo: Option<String>,
}

/// A pipe with both ends in the dump.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pipe {
    pub inode: u64,
    /// F_GETPIPE_SZ.
    pub capacity: u32,
    /// Unread bytes, in order.
    #[serde(with = "crate::image::hex_bytes")]
    pub data: Vec<u8>,
    /// A named FIFO, reopened at this path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fifo: Option<String>,
}

/// The capacity of the pipe `fd` of `pid` is an end of.
fn capacity_of(pid: i32, fd: i32) -> Result<u32> {
    let end = crate::sys::fd::pidfd_getfd(pid, fd)?;
    // SAFETY: fcntl on an fd we own.
    let capacity = unsafe { libc::fcntl(end.as_raw_fd(), libc::F_GETPIPE_SZ) };
    if capacity < 0 {
        return Err(Error::sys(
            pid,
            format!("fd {fd}: F_GETPIPE_SZ"),
            nix::errno::Errno::last(),
        ));
    }
    Ok(capacity as u32)
}

/// Copies the unread contents of the pipe whose read end is `fd` of `pid`.
fn peek(pid: i32, fd: i32) -> Result<(u32, Vec<u8>)> {
    let end = crate::sys::fd::pidfd_getfd(pid, fd)?;
    // SAFETY: fcntl, pipe2, tee and read on fds we own, into a buffer we own.
    unsafe {
        let capacity = libc::fcntl(end.as_raw_fd(), libc::F_GETPIPE_SZ);
        if capacity < 0 {
            return Err(Error::sys(
                pid,
                format!("fd {fd}: F_GETPIPE_SZ"),
                nix::errno::Errno::last(),
            ));
        }
        let mut p = [0i32; 2];
        if libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) < 0 {
            return Err(Error::sys(pid, "pipe2", nix::errno::Errno::last()));
        }
        let (r, w) = (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1]));
        libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, capacity);
        let mut data = Vec::new();
        let n = libc::tee(
            end.as_raw_fd(),
            w.as_raw_fd(),
            capacity as usize,
            libc::SPLICE_F_NONBLOCK,
        );
        if n < 0 && nix::errno::Errno::last() != nix::errno::Errno::EAGAIN {
            return Err(Error::sys(
                pid,
                format!("fd {fd}: tee"),
                nix::errno::Errno::last(),
            ));
        }
        let mut buf = vec![0u8; capacity as usize];
        loop {
            let got = libc::read(r.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len());
            if got <= 0 {
                break;
            }
            data.extend_from_slice(&buf[..got as usize]);
        }
        Ok((capacity as u32, data))
    }
}

impl PipeEnd {
    /// The end `pipe:[inode]` (or FIFO `fifo`) open with `flags`.
    pub fn collect(inode: u64, flags: i32, fifo: Option<String>) -> PipeEnd {
        PipeEnd {
            inode,
            write: flags & libc::O_ACCMODE == libc::O_WRONLY,
            flags: crate::fds::table::status_flags(flags),
            fifo,
        }
    }

    fn side(&self) -> &'static str {
        if self.write {
            "write"
        } else {
            "read"
        }
    }

    pub fn describe(&self, shared: bool, cloexec: &str, pipes: &[Pipe]) -> String {
        if !shared {
            return format!("{} end of pipe {}", self.side(), self.inode);
        }
        let unread = pipes
            .iter()
            .find(|p| p.inode == self.inode)
            .map_or(0, |p| p.data.len());
        format!(
            "{} end of pipe {} ({unread} bytes unread{cloexec})",
            self.side(),
            self.inode
        )
    }
}

/// A process's hold on a pipe end: its pid, its first descriptor of it, the end.
pub struct Held<'a> {
    pub pid: i32,
    pub fd: i32,
    pub end: &'a PipeEnd,
}

/// What [`resolve`] makes of a hold.
#[derive(Debug, PartialEq, Eq)]
pub enum Resolved {
    /// The pipe is in the dump.
    Kept,
    /// Stdio whose other end is outside: rebound to the restorer's (what it was).
    Outside(String),
}

/// Decides, once every process is collected, what each held end becomes: a
/// pipe with both ends in the dump (or whose other end is closed everywhere)
/// is saved with its data; an end whose other end is outside is rebound to
/// the restorer's stdio if it was stdio, else refused. `dumped`: the
/// processes of the dump. Returns the pipes and a verdict per hold.
pub fn resolve(held: &[Held], dumped: &[i32]) -> Result<(Vec<Pipe>, Vec<Resolved>)> {
    let ends: Vec<(u64, bool)> = held.iter().map(|h| (h.end.inode, h.end.write)).collect();
    let mut pipes: Vec<Pipe> = Vec::new();
    let mut verdicts = Vec::new();
    for h in held {
        let (inode, write) = (h.end.inode, h.end.write);
        // The other end is in the dump, or closed everywhere (a writer that
        // exited leaves its unread data behind): either way the pipe is ours.
        let other_end = ends.contains(&(inode, !write)) || !held_outside(inode, dumped);
        if !other_end {
            if h.fd <= 2 {
                verdicts.push(Resolved::Outside(format!("pipe:[{inode}]")));
                continue;
            }
            return Err(Error::unsupported(
                h.pid,
                format!(
                    "fd {} is the {} end of a pipe whose other end is outside the dump",
                    h.fd,
                    h.end.side()
                ),
            ));
        }
        verdicts.push(Resolved::Kept);
        if !pipes.iter().any(|p| p.inode == inode) {
            // The data is read through a read end in the dump; a pipe whose
            // reader is gone keeps only its capacity.
            let reader = held.iter().find(|r| r.end.inode == inode && !r.end.write);
            let (capacity, data) = match reader {
                Some(r) => peek(r.pid, r.fd)?,
                None => (capacity_of(h.pid, h.fd)?, Vec::new()),
            };
            pipes.push(Pipe {
                inode,
                capacity,
                data,
                fifo: h.end.fifo.clone(),
            });
        }
    }
    Ok((pipes, verdicts))
}

/// Whether a process outside the dump holds pipe `inode` open.
fn held_outside(inode: u64, dumped: &[i32]) -> bool {
    let link = format!("pipe:[{inode}]");
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return true;
    };
    procs
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| !dumped.contains(pid))
        .any(|pid| {
            std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
                fds.filter_map(|e| e.ok()).any(|e| {
                    std::fs::read_link(e.path()).is_ok_and(|l| l.as_os_str() == link.as_str())
                })
            })
        })
}

/// The pipes the restorer has made, each once, for the ends that need them.
pub struct Pipes<'a> {
    pipes: &'a [Pipe],
    made: Vec<(u64, OwnedFd, OwnedFd)>,
}

impl<'a> Pipes<'a> {
    pub fn new(pipes: &'a [Pipe]) -> Pipes<'a> {
        Pipes {
            pipes,
            made: Vec::new(),
        }
    }

    /// Open file `id`, pipe end `end`: a copy of its end of the pipe, made
    /// (and refilled) on first use.
    pub fn restore(&mut self, id: FileId, end: &PipeEnd) -> Result<Opened, PipeError> {
        if !self.made.iter().any(|(i, _, _)| *i == end.inode) {
            let p = self
                .pipes
                .iter()
                .find(|p| p.inode == end.inode)
                .ok_or(PipeError::Missing {
                    id,
                    inode: end.inode,
                })?;
            let (r, w) = create(p)?;
            self.made.push((p.inode, r, w));
        }
        let (_, r, w) = self
            .made
            .iter()
            .find(|(i, _, _)| *i == end.inode)
            .expect("made above");
        let fd = if end.write { w } else { r };
        let copy = fd.try_clone().map_err(|source| PipeError::Sys {
            inode: end.inode,
            what: "dup".into(),
            source,
        })?;
        Ok(Opened::new(copy, Some(end.flags)))
    }
}

/// Creates pipe `p` in the restorer, refilled with its data: (read end, write end).
fn create(p: &Pipe) -> Result<(OwnedFd, OwnedFd), PipeError> {
    let mut fds = [0i32; 2];
    let failed = |what: String| PipeError::Sys {
        inode: p.inode,
        what,
        source: std::io::Error::last_os_error(),
    };
    // SAFETY: pipe2/open write or return fds we then own; fcntl and write on
    // them with our buffer.
    unsafe {
        if let Some(path) = &p.fifo {
            // A named FIFO: open it for reading and writing without blocking
            // (each end finds the other), then clear O_NONBLOCK where it was not set.
            let c = std::ffi::CString::new(path.as_str())
                .map_err(|_| PipeError::FifoPath { path: path.clone() })?;
            fds[0] = libc::open(
                c.as_ptr(),
                libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC,
            );
            fds[1] = if fds[0] >= 0 {
                libc::open(
                    c.as_ptr(),
                    libc::O_WRONLY | libc::O_NONBLOCK | libc::O_CLOEXEC,
                )
            } else {
                -1
            };
            if fds[0] < 0 || fds[1] < 0 {
                return Err(PipeError::Fifo {
                    path: path.clone(),
                    source: std::io::Error::last_os_error(),
                });
            }
        } else if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) < 0 {
            return Err(failed("pipe2".into()));
        }
        let (r, w) = (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]));
        if libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, p.capacity as libc::c_int) < 0 {
            return Err(failed(format!("capacity {}", p.capacity)));
        }
        let mut done = 0;
        while done < p.data.len() {
            let n = libc::write(
                w.as_raw_fd(),
                p.data[done..].as_ptr().cast(),
                p.data.len() - done,
            );
            if n <= 0 {
                return Err(failed("refilling".into()));
            }
            done += n as usize;
        }
        Ok((r, w))
    }
}

/// Why a pipe or FIFO could not be recreated.
#[derive(Debug, thiserror::Error)]
pub enum PipeError {
    #[error("file {id}: pipe {inode} is missing from the image")]
    Missing { id: FileId, inode: u64 },
    #[error("FIFO {path:?}: bad path")]
    FifoPath { path: String },
    #[error("FIFO {path}: {source}")]
    Fifo {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("pipe {inode}: {what}: {source}")]
    Sys {
        inode: u64,
        what: String,
        #[source]
        source: std::io::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn inode_of(fd: &OwnedFd) -> u64 {
        std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .unwrap()
            .ino()
    }

    /// Restore, collect again: the same pipe (under its new inode).
    #[test]
    fn round_trip() {
        let saved = Pipe {
            inode: 1,
            capacity: 128 * 1024,
            data: b"written, not read yet".to_vec(),
            fifo: None,
        };
        let end = |write, flags| PipeEnd {
            inode: 1,
            write,
            flags,
            fifo: None,
        };
        let mut pipes = Pipes::new(std::slice::from_ref(&saved));
        let r = pipes
            .restore(FileId(0), &end(false, libc::O_NONBLOCK))
            .unwrap();
        let w = pipes.restore(FileId(1), &end(true, 0)).unwrap();
        assert_eq!(r.status_flags, Some(libc::O_NONBLOCK));
        let inode = inode_of(&r.fd);
        let ends = [
            PipeEnd::collect(inode, libc::O_RDONLY, None),
            PipeEnd::collect(inode, libc::O_WRONLY, None),
        ];
        let me = std::process::id() as i32;
        let held = [
            Held {
                pid: me,
                fd: r.fd.as_raw_fd(),
                end: &ends[0],
            },
            Held {
                pid: me,
                fd: w.fd.as_raw_fd(),
                end: &ends[1],
            },
        ];
        let (again, verdicts) = resolve(&held, &[me]).unwrap();
        assert_eq!(verdicts, [Resolved::Kept, Resolved::Kept]);
        assert_eq!(again, [Pipe { inode, ..saved }]);
    }
}
