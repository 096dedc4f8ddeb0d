//! Pipes: which ends are in the dump, their unread data and capacity.
//!
//! Collect reads a pipe's contents without consuming them: the read end is
//! duplicated into crest with `pidfd_getfd` and `tee`d into a scratch pipe.
//! Restore creates each pipe once in the restorer, refills it, and every
//! restore child inherits its ends (see `FdKind::Shared`).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::files::{FdKind, FilesImage};

/// A pipe with both ends in the dump.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipeImage {
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

/// Decides, once every process is collected, what each pipe end becomes: a
/// pipe with both ends in the dump is saved with its data; an end whose other
/// end is outside is rebound to the restorer's stdio if it was stdio, else refused.
pub fn resolve(procs: &mut [(i32, &mut FilesImage)]) -> Result<Vec<PipeImage>> {
    let ends: Vec<(u64, bool)> = procs
        .iter()
        .flat_map(|(_, f)| f.fds.iter())
        .filter_map(|f| match f.kind {
            FdKind::Pipe { inode, write, .. } => Some((inode, write)),
            _ => None,
        })
        .collect();
    let dumped: Vec<i32> = procs.iter().map(|(pid, _)| *pid).collect();
    let read_ends: Vec<(u64, i32, i32)> = procs
        .iter()
        .flat_map(|(pid, f)| f.fds.iter().map(move |fd| (*pid, fd)))
        .filter_map(|(pid, f)| match f.kind {
            FdKind::Pipe {
                inode,
                write: false,
                ..
            } => Some((inode, pid, f.fd)),
            _ => None,
        })
        .collect();
    let mut pipes: Vec<PipeImage> = Vec::new();
    for (pid, files) in procs.iter_mut() {
        for f in files.fds.iter_mut() {
            let FdKind::Pipe {
                inode,
                write,
                was_stdio,
                ..
            } = f.kind
            else {
                continue;
            };
            // The other end is in the dump, or closed everywhere (a writer that
            // exited leaves its unread data behind): either way the pipe is ours.
            let other_end = ends.contains(&(inode, !write)) || !held_outside(inode, &dumped);
            if !other_end {
                if was_stdio {
                    f.kind = FdKind::Inherited {
                        was: format!("pipe:[{inode}]"),
                    };
                    continue;
                }
                let side = if write { "write" } else { "read" };
                return Err(Error::unsupported(
                    *pid,
                    format!(
                        "fd {} is the {side} end of a pipe whose other end is outside the dump",
                        f.fd
                    ),
                ));
            }
            if !pipes.iter().any(|p| p.inode == inode) {
                // The data is read through a read end in the dump; a pipe whose
                // reader is gone keeps only its capacity.
                let (capacity, data) = match read_ends.iter().find(|(i, _, _)| *i == inode) {
                    Some(&(_, rpid, rfd)) => peek(rpid, rfd)?,
                    None => (capacity_of(*pid, f.fd)?, Vec::new()),
                };
                let fifo = match &f.kind {
                    FdKind::Pipe { fifo, .. } => fifo.clone(),
                    _ => None,
                };
                pipes.push(PipeImage {
                    inode,
                    capacity,
                    data,
                    fifo,
                });
            }
        }
    }
    Ok(pipes)
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

/// Creates the pipes of the image in the restorer: returns (inode, read end,
/// write end), each refilled with its data.
pub fn create(pipes: &[PipeImage]) -> Result<Vec<(u64, OwnedFd, OwnedFd)>> {
    let mut out = Vec::new();
    for p in pipes {
        let mut fds = [0i32; 2];
        // SAFETY: pipe2/open write or return fds we then own; fcntl and write on
        // them with our buffer.
        unsafe {
            if let Some(path) = &p.fifo {
                // A named FIFO: open it for reading and writing without blocking
                // (each end finds the other), then clear O_NONBLOCK where it was not set.
                let c = std::ffi::CString::new(path.as_str())
                    .map_err(|_| Error::Restore(format!("FIFO {path:?}: bad path")))?;
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
                    return Err(Error::Restore(format!(
                        "FIFO {path}: {}",
                        std::io::Error::last_os_error()
                    )));
                }
            } else if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) < 0 {
                return Err(Error::Restore(format!(
                    "pipe {}: pipe2: {}",
                    p.inode,
                    std::io::Error::last_os_error()
                )));
            }
            let (r, w) = (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]));
            if libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, p.capacity as libc::c_int) < 0 {
                return Err(Error::Restore(format!(
                    "pipe {}: capacity {}: {}",
                    p.inode,
                    p.capacity,
                    std::io::Error::last_os_error()
                )));
            }
            let mut done = 0;
            while done < p.data.len() {
                let n = libc::write(
                    w.as_raw_fd(),
                    p.data[done..].as_ptr().cast(),
                    p.data.len() - done,
                );
                if n <= 0 {
                    return Err(Error::Restore(format!(
                        "pipe {}: refilling: {}",
                        p.inode,
                        std::io::Error::last_os_error()
                    )));
                }
                done += n as usize;
            }
            out.push((p.inode, r, w));
        }
    }
    Ok(out)
}
