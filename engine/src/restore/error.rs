//! Why a restore failed: each step's own errors and those of the kinds it
//! restores, nested ([`RestoreError`]). The exit status stays the engine's
//! contract: 3 when the image holds something this machine cannot take back
//! (an engine [`Error::Unsupported`] anywhere inside), 1 otherwise.

use crate::error::Error;
use crate::fds::locks::LockError;
use crate::fds::memfd::MemfdError;
use crate::fds::regular::FileChanged;
use crate::fds::restore::FilesError;
use crate::mm::restore::RebuildError;
use crate::mm::sysvshm::SysvShmError;
use crate::task::timers::TimerError;
use crate::task::TaskError;
use crate::tree::TreeError;

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// A string of the image (a path, a name) that cannot be passed to the
    /// kernel.
    #[error("pid {pid}: bad {what} {value:?}")]
    BadString {
        pid: i32,
        what: &'static str,
        value: String,
    },
    #[error("pid {pid}: no free address range for the restore trampoline")]
    NoRoomForTrampoline { pid: i32 },
    /// What a mapping is mapped from is not among the image's open files.
    #[error("{what} is missing from the image")]
    MissingSource { what: String },
    /// The built tree, seen from outside, is not what the image says.
    #[error("pid {pid}: after the restore its {field} is {got}, the image says {want}")]
    Mismatch {
        pid: i32,
        field: &'static str,
        got: String,
        want: String,
    },
    #[error("cannot create a PID namespace (clone3 CLONE_NEWPID): {0}")]
    NoPidns(nix::errno::Errno),
    /// What the namespace's init reported (as text: it crossed from there).
    #[error("in a new PID namespace: {report}")]
    InPidns { report: String },
    #[error("pid {root}: restored in a new PID namespace, but not found under its init {init}")]
    RootNotFound { root: i32, init: i32 },
    /// What the detached restore helper reported (as text).
    #[error("{report}")]
    Detached { report: String },
    #[error(transparent)]
    Tree(#[from] TreeError),
    #[error(transparent)]
    Files(#[from] FilesError),
    #[error(transparent)]
    FileChanged(#[from] FileChanged),
    #[error(transparent)]
    SysvShm(#[from] SysvShmError),
    #[error(transparent)]
    Rebuild(#[from] RebuildError),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    Task(#[from] TaskError),
    #[error(transparent)]
    Memfd(#[from] MemfdError),
    #[error(transparent)]
    Engine(#[from] Error),
}

impl RestoreError {
    /// The engine error inside, if any (an unsupported feature, a process
    /// gone, a system call that failed).
    pub fn engine(&self) -> Option<&Error> {
        match self {
            RestoreError::Engine(e)
            | RestoreError::Tree(TreeError::Engine(e))
            | RestoreError::Rebuild(RebuildError::Engine(e))
            | RestoreError::Lock(LockError::Engine(e))
            | RestoreError::Task(TaskError::Engine(e))
            | RestoreError::Task(TaskError::Timer(TimerError::Engine(e)))
            | RestoreError::Memfd(MemfdError::Image(e))
            | RestoreError::SysvShm(SysvShmError::Image(e)) => Some(e),
            _ => None,
        }
    }

    /// The exit status the CLI uses for this error.
    pub fn exit_code(&self) -> i32 {
        self.engine().map_or(1, Error::exit_code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::EXIT_UNSUPPORTED;

    /// An unsupported feature found deep in a step still exits 3; the
    /// message is the inner one, unchanged.
    #[test]
    fn unsupported_inside_a_step_keeps_its_exit_code() {
        let inner = Error::unsupported(7, "POSIX timer ID 5000");
        let e = RestoreError::from(TaskError::Timer(TimerError::Engine(inner)));
        assert_eq!(e.exit_code(), EXIT_UNSUPPORTED);
        assert_eq!(
            e.to_string(),
            "pid 7: POSIX timer ID 5000: not supported yet"
        );
        let e = RestoreError::from(TreeError::Died { pid: 7 });
        assert_eq!(e.exit_code(), 1);
    }
}
