//! The descriptor model every file kind shares (CRIU's): per process an fd
//! table (fd number, close-on-exec, file id); per dump one table of open
//! files (id → the kind's state, in [`crate::fds`]); per kind one set of
//! operations, whose restore answers [`Restored::Done`] or
//! [`Restored::NotYet`] (the loop comes back once what it needs exists).
//!
//! Two descriptors of one process with the same file id are dups of one open
//! file description; the same id in two processes is one description they
//! share (inherited across fork).

use std::os::fd::OwnedFd;

use serde::{Deserialize, Serialize};

/// An open file's id in the dump's table of open files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct FileId(pub u32);

impl FileId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl std::fmt::Display for FileId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// One descriptor of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FdEntry {
    pub fd: i32,
    pub cloexec: bool,
    /// The open file it refers to.
    pub file: FileId,
}

/// A process's descriptors and the directories it works in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FdTable {
    /// In descriptor order.
    pub fds: Vec<FdEntry>,
    pub cwd: String,
    pub root: String,
}

impl FdTable {
    /// The first descriptor of each open file the process holds, in
    /// descriptor order (the others are dups of these).
    pub fn firsts(&self) -> Vec<FdEntry> {
        let mut out: Vec<FdEntry> = Vec::new();
        for e in &self.fds {
            if !out.iter().any(|o| o.file == e.file) {
                out.push(*e);
            }
        }
        out
    }

    /// The first descriptor of this process that refers to `file`.
    pub fn first_fd_of(&self, file: FileId) -> Option<i32> {
        self.fds.iter().find(|e| e.file == file).map(|e| e.fd)
    }
}

/// What a kind's restore step answers.
#[derive(Debug)]
pub enum Restored<T> {
    /// Done: the file exists (here is what was made).
    Done(T),
    /// Not yet: something it needs does not exist yet (epoll: its targets;
    /// a unix socket: the files in flight on it; a TCP connection: the
    /// listeners); the restore loop comes back to it.
    NotYet,
}

/// An open file the restorer made, to place at its slot: the descriptor, and
/// the status flags to set on it there (they belong to the open file
/// description, shared by every holder).
#[derive(Debug)]
pub struct Opened {
    pub fd: OwnedFd,
    pub status_flags: Option<i32>,
}

impl Opened {
    pub fn new(fd: OwnedFd, status_flags: Option<i32>) -> Opened {
        Opened { fd, status_flags }
    }
}

/// Flags kept when reopening: everything but creation-time and close-on-exec.
pub const REOPEN_MASK: i32 =
    !(libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC | libc::O_NOCTTY | libc::O_CLOEXEC);

/// Status flags of a descriptor (what `F_SETFL` takes): no access mode.
pub fn status_flags(flags: i32) -> i32 {
    flags & REOPEN_MASK & !libc::O_ACCMODE
}

/// The descriptors of the process being restored, as its restore child
/// places them: those done, and those still to come (an epoll watches
/// descriptors of both).
#[derive(Debug, Default)]
pub struct ChildFds {
    pub done: Vec<i32>,
    pub pending: Vec<i32>,
}

/// Creating, opening or placing the file of descriptor `fd` failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("fd {fd}: {what}: {source}")]
    Sys {
        fd: i32,
        /// The step that failed ("eventfd", "open /etc/hosts", "dup2").
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("fd {fd}: bad path")]
    BadPath { fd: i32 },
}

impl OpenError {
    /// Step `what` for descriptor `fd` failed with the last OS error.
    pub fn last(fd: i32, what: impl Into<String>) -> OpenError {
        OpenError::Sys {
            fd,
            what: what.into(),
            source: std::io::Error::last_os_error(),
        }
    }
}

/// Opens `path` with `flags` (close-on-exec; the caller places it) for
/// descriptor `at`, at offset `pos`. Returns the new descriptor.
pub fn open_path(at: i32, path: &str, flags: i32, pos: Option<u64>) -> Result<i32, OpenError> {
    let c = std::ffi::CString::new(path).map_err(|_| OpenError::BadPath { fd: at })?;
    // SAFETY: `c` is a valid NUL-terminated string; open returns a new fd or -1.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(OpenError::last(at, format!("open {path}")));
    }
    if let Some(pos) = pos {
        // SAFETY: lseek on the fd we just opened.
        if unsafe { libc::lseek(fd, pos as i64, libc::SEEK_SET) } < 0 {
            return Err(OpenError::last(at, format!("seek {path} to {pos}")));
        }
    }
    Ok(fd)
}

/// An open file's access mode and status flags, for `crest show`.
pub fn access(flags: i32) -> String {
    let mode = match flags & libc::O_ACCMODE {
        libc::O_RDONLY => "read-only",
        libc::O_WRONLY => "write-only",
        _ => "read-write",
    };
    let mut s = mode.to_string();
    for (bit, name) in [
        (libc::O_APPEND, "append"),
        (libc::O_NONBLOCK, "nonblock"),
        (libc::O_DIRECT, "direct"),
        (libc::O_SYNC, "sync"),
    ] {
        if flags & bit != 0 {
            s.push_str(", ");
            s.push_str(name);
        }
    }
    s
}
