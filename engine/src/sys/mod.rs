//! The system layer: what the kernel offers crest, in small safe functions.
//! It imports nothing of the engine above it but the error type.
//!
//! - [`proc`]: readers of `/proc/PID/*` (maps, stat, status, fdinfo,
//!   pagemap), pure parsers tested on literal text;
//! - [`ptrace`]: seizing a task, its registers and signal state, its memory;
//! - [`remote`]: running system calls inside a stopped task ([`remote::RemoteCall`]);
//! - [`fd`]: other processes' descriptors (`pidfd_getfd`, `kcmp`);
//! - [`process`]: `clone3` and what a fresh restore child drops;
//! - [`sockdiag`]: what sock_diag tells about a socket (a unix socket's
//!   peer, an accept queue);
//! - [`uffd`]: userfaultfds made inside a target;
//! - [`names`]: signal and clock names.

/// x86-64 base page size.
pub const PAGE_SIZE: u64 = 4096;

pub mod fd;
pub mod names;
pub mod proc;
pub mod process;
pub mod ptrace;
pub mod remote;
pub mod sockdiag;
pub mod uffd;
