//! crest: a checkpoint/restart engine for Linux processes.
//!
//! Dump: freeze ([`ptrace`]) → collect (one module per resource kind:
//! [`mm`], [`task`], [`files`]) → write an [`image`] → kill, resume or stop.
//! Restore: read and validate the image → fork a child with the original PID
//! → the child sets up what it can on itself (files, signals, limits) → the
//! restorer rebuilds its address space and registers through ptrace → resume.

pub mod api;
pub mod check;
pub mod dump;
pub mod error;
pub mod files;
pub mod image;
pub mod locks;
pub mod memfd;
pub mod mm;
pub mod netlock;
mod pagecrc;
pub mod pagepipe;
pub mod pipes;
pub mod precopy;
pub mod restore;
pub mod savefiles;
pub mod show;
pub mod sockets;
pub mod sys;
pub mod sysvshm;
pub mod task;
pub mod tcp;
pub mod timers;
pub mod tty;
pub mod udp;

use serde::{Deserialize, Serialize};

pub use error::{Error, Result, EXIT_UNSUPPORTED};

pub use sys::PAGE_SIZE;

/// Everything the image holds about one process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessImage {
    pub pid: i32,
    pub ppid: i32,
    pub pgid: i32,
    pub sid: i32,
    /// It was stopped (SIGSTOP, job control) when dumped, and is restored stopped.
    #[serde(default)]
    pub stopped: bool,
    /// The main thread first.
    pub threads: Vec<task::ThreadImage>,
    pub state: task::ProcessState,
    pub mm: mm::MmImage,
    pub files: files::FilesImage,
    /// The process took part through libcrest: where its state word is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<api::ApiImage>,
    /// File locks it holds, taken again once its descriptors are in place.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub locks: Vec<locks::FileLock>,
    /// A session leader's controlling terminal: the pts index of a pty in the dump.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ctty: Option<u32>,
}
