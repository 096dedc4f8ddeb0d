//! The engine's error type. Every variant names the resource it is about, so
//! the CLI's one-line message tells the user what failed and why.

use std::path::PathBuf;

/// What went wrong during a dump, a restore, or reading an image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The target uses something the engine cannot carry across yet. The CLI
    /// exits with [`EXIT_UNSUPPORTED`] so a harness can tell "refused" from "broken".
    #[error("pid {pid}: {what}: not supported yet")]
    Unsupported { pid: i32, what: String },

    /// The target (or one of its tasks) is gone: it exited or was killed.
    #[error("pid {pid}: process exited during {during}")]
    Gone { pid: i32, during: &'static str },

    /// No process with that PID exists.
    #[error("pid {pid}: no such process")]
    NoSuchProcess { pid: i32 },

    /// The target is in a state the engine refuses to touch (traced by another
    /// process, a kernel thread, …).
    #[error("pid {pid}: {reason}")]
    Refused { pid: i32, reason: String },

    /// A system call on the target failed.
    #[error("pid {pid}: {what}: {source}")]
    Sys {
        pid: i32,
        what: String,
        #[source]
        source: nix::Error,
    },

    /// An image file is missing, truncated, corrupted or from another version.
    #[error("image {}: {reason}", path.display())]
    BadImage { path: PathBuf, reason: String },

    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Why one resource of a process (a descriptor, a socket) was not collected:
/// crest cannot carry it (the dump is refused as unsupported, exit 3), or
/// reading it failed.
#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    /// What the resource is, as the kind says it ("an inotify", "a netlink
    /// socket"): the caller names the descriptor ("fd 5 is …").
    #[error("{0}")]
    NotCarried(Box<dyn std::error::Error + Send + Sync>),
    #[error(transparent)]
    Failed(#[from] Error),
}

impl CollectError {
    pub fn not_carried(why: impl std::error::Error + Send + Sync + 'static) -> CollectError {
        CollectError::NotCarried(Box::new(why))
    }
}

/// Exit status of `crest` when the target uses a feature not supported yet.
pub const EXIT_UNSUPPORTED: i32 = 3;

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn sys(pid: i32, what: impl Into<String>, source: nix::Error) -> Error {
        Error::Sys {
            pid,
            what: what.into(),
            source,
        }
    }

    pub fn unsupported(pid: i32, what: impl Into<String>) -> Error {
        Error::Unsupported {
            pid,
            what: what.into(),
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub fn bad_image(path: impl Into<PathBuf>, reason: impl Into<String>) -> Error {
        Error::BadImage {
            path: path.into(),
            reason: reason.into(),
        }
    }

    /// The exit status the CLI uses for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Unsupported { .. } => EXIT_UNSUPPORTED,
            _ => 1,
        }
    }
}
