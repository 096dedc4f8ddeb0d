//! What a restore passes down: its options, and the context its steps
//! share (the image, its checked pages, the plan).

use std::path::PathBuf;
use std::time::Duration;

use crate::fds::savefiles::RestoreFiles;
use crate::mm::pages::Pages;
use crate::model::Checkpoint;
use crate::restore::plan::Plan;

#[derive(Debug, Clone)]
pub struct RestoreOptions {
    pub dir: PathBuf,
    /// Return once the process runs instead of waiting for it.
    pub detach: bool,
    /// Leave the restored process stopped (SIGSTOP).
    pub stop: bool,
    /// How long to wait for the original PID to become free.
    pub pid_wait: Duration,
    /// Restore even if an open file changed since the dump (logged, not refused).
    pub allow_changed_files: bool,
    /// Restore into a new PID namespace, under an init of crest's own, so
    /// that PIDs taken here do not block the restore.
    pub pidns: bool,
    /// Give back the files saved with `--save-files` this way.
    pub restore_files: Option<RestoreFiles>,
    /// `--relocate OLD=NEW`: paths under OLD are opened under NEW.
    pub relocate: Vec<(String, String)>,
    /// How long to wait for a listening port to become free: connections the
    /// process had closed may hold it in TIME_WAIT for up to 60 s.
    pub port_wait: Duration,
}

/// What `restore` leaves behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restored {
    /// The process runs and is our child.
    Child { pid: i32 },
    /// The process runs, detached from us (reparented to init or a subreaper).
    Detached { pid: i32 },
    /// The process runs in a new PID namespace under `init`, crest's child,
    /// which exits with the root's status (as `crest restore` does) once the
    /// namespace is empty. `pid` is the root's PID as seen from here; inside
    /// the namespace it has its original one.
    InPidns { pid: i32, init: i32, detached: bool },
}

/// One restore's state, passed down: the image, its pages (checked), the
/// plan and the options. Each process is then built through one remote-call
/// handle at its trampoline (`build`).
pub struct RestoreContext<'a> {
    pub image: &'a Checkpoint,
    pub pages: &'a [Pages],
    pub plan: Plan,
    pub opts: &'a RestoreOptions,
    pub progress: &'a indicatif::ProgressBar,
}
