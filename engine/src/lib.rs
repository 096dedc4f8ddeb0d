//! crest: a checkpoint/restart engine for Linux processes.
//!
//! The two pipelines, each a short list of steps:
//! - [`dump`]: freeze → collect → write → release;
//! - [`restore`]: read → plan → fork → build → verify → resume.
//!
//! What they move, one module per kind of state, each with its collect half,
//! its restore half and its image types together:
//! - [`tree`]: the process tree (scope, sessions, groups, zombies; who forks whom);
//! - [`task`]: per-task state (registers, FPU, signals, credentials, rseq,
//!   robust list, scheduling, limits, timers);
//! - [`mm`]: memory (mappings, the page files' one writer and one reader,
//!   pre-copy, shared memory, SysV shm);
//! - [`fds`]: descriptors (the fd tables, the table of open files, one
//!   module per kind: regular files, pipes, memfds, eventfds, epoll,
//!   signalfds, timerfds, ttys…);
//! - [`net`]: sockets (unix, TCP, UDP) and the network lock;
//! - [`api`]: the libcrest handshake.
//!
//! Below them: [`model`] (the whole image as typed data), [`image`] (the
//! container: records and blobs by kind and id, knowing no kind) and [`sys`]
//! (ptrace, /proc readers, remote system calls), which imports nothing above
//! it. Beside them: [`show`] and [`check`], and [`error`].

pub mod api;
pub mod check;
pub mod dump;
pub mod error;
pub mod fds;
pub mod image;
pub mod mm;
pub mod model;
pub mod net;
pub mod restore;
pub mod show;
pub mod sys;
pub mod task;
pub mod tree;

pub use error::{Error, Result, EXIT_UNSUPPORTED};
pub use model::ProcessImage;
pub use sys::PAGE_SIZE;
