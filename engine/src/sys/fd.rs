//! Descriptors of other processes: taking a copy of one (`pidfd_getfd`) and
//! telling whether two are the same open file description (`kcmp`).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::error::{Error, Result};

/// Duplicates fd `fd` of `pid` into crest (pidfd_getfd, Linux 5.6+).
pub fn pidfd_getfd(pid: i32, fd: i32) -> Result<OwnedFd> {
    let pidfd = crate::sys::proc::pidfd_open(pid)?;
    // SAFETY: pidfd_getfd takes integers and returns a descriptor we then own.
    let ours = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) } as i32;
    if ours < 0 {
        let e = nix::errno::Errno::last();
        return Err(Error::sys(pid, format!("pidfd_getfd of fd {fd}"), e));
    }
    // SAFETY: a descriptor just returned to us and owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(ours) })
}

/// Whether fd `fd1` of `pid1` and fd `fd2` of `pid2` are one open file
/// description (kcmp KCMP_FILE).
pub fn same_file(pid1: i32, fd1: i32, pid2: i32, fd2: i32) -> bool {
    const KCMP_FILE: libc::c_long = 0;
    // SAFETY: kcmp takes only integers and reads no memory of ours.
    unsafe { libc::syscall(libc::SYS_kcmp, pid1, pid2, KCMP_FILE, fd1, fd2) == 0 }
}
