//! userfaultfd, made inside another process and driven from crest.
//!
//! A userfaultfd belongs to the mm of the process that creates it, so crest
//! makes it in the target with a remote system call, takes it with
//! pidfd_getfd and closes the target's descriptor: the target's fd table is
//! unchanged, and when crest drops the descriptor (or dies) the kernel
//! unregisters every range. The ioctls act on that mm whoever calls them.
//! Restore fills fresh anonymous memory with `UFFDIO_COPY` (the kernel
//! allocates each page and copies into it, without zeroing it first or
//! taking a fault per page); pre-copy tracks writes with async
//! write-protection (see the pre-copy of dumps).

use std::os::fd::{AsRawFd, OwnedFd};

use crate::error::Result;
use crate::sys::remote::RemoteCall;

pub const UFFD_API: u64 = 0xaa;
pub const REGISTER_MODE_MISSING: u64 = 1;
const COPY_MODE_DONTWAKE: u64 = 1;
/// `_IOWR(0xAA, 0x3F, struct uffdio_api)`.
const UFFDIO_API: u64 = 0xc018_aa3f;
/// `_IOWR(0xAA, 0x00, struct uffdio_register)`.
const UFFDIO_REGISTER: u64 = 0xc020_aa00;
/// `_IOWR(0xAA, 0x03, struct uffdio_copy)`.
const UFFDIO_COPY: u64 = 0xc028_aa03;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRegister {
    start: u64,
    len: u64,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

/// Makes a userfaultfd in the process behind `remote` (stopped) and returns
/// crest's copy of it; `Ok(None)` when the kernel refuses one (no
/// CONFIG_USERFAULTFD, or not permitted).
pub fn make_in(remote: &RemoteCall, flags: u64) -> Result<Option<OwnedFd>> {
    let r = remote.raw(libc::SYS_userfaultfd, [flags, 0, 0, 0, 0, 0])?;
    if r < 0 {
        tracing::debug!(
            pid = remote.pid(),
            errno = -r,
            "userfaultfd in the process failed"
        );
        return Ok(None);
    }
    let taken = crate::sys::fd::pidfd_getfd(remote.pid(), r as i32);
    let closed = remote.call(
        libc::SYS_close,
        [r as u64, 0, 0, 0, 0, 0],
        "close of the userfaultfd crest made",
    );
    let fd = taken?;
    closed?;
    Ok(Some(fd))
}

/// `UFFDIO_API` with `features`.
pub fn api(fd: &OwnedFd, features: u64) -> std::io::Result<()> {
    let mut api = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes a struct uffdio_api, which `api` is.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as _, &mut api) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `UFFDIO_REGISTER` of `[start, end)` in `mode`.
pub fn register(fd: &OwnedFd, start: u64, end: u64, mode: u64) -> std::io::Result<()> {
    let mut reg = UffdioRegister {
        start,
        len: end - start,
        mode,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_REGISTER reads and writes a struct uffdio_register, which `reg` is.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_REGISTER as _, &mut reg) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Fills `[dst, dst + data.len())` of the registered, not yet populated
/// memory with `data` (`UFFDIO_COPY`). Its error says how many bytes were
/// copied before it.
pub fn copy(fd: &OwnedFd, dst: u64, data: &[u8]) -> Result<(), CopyError> {
    let mut done = 0u64;
    while done < data.len() as u64 {
        let mut c = UffdioCopy {
            dst: dst + done,
            src: data.as_ptr() as u64 + done,
            len: data.len() as u64 - done,
            mode: COPY_MODE_DONTWAKE,
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY reads `len` bytes at `src` (inside `data`) and
        // writes the struct's `copy` field.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_COPY as _, &mut c) };
        if c.copy > 0 {
            done += c.copy as u64;
        }
        if r < 0 {
            let e = std::io::Error::last_os_error();
            // EAGAIN: a partial copy (the mm changed under it); go on.
            if e.raw_os_error() == Some(libc::EAGAIN) && c.copy > 0 {
                continue;
            }
            return Err(CopyError { done, source: e });
        }
    }
    Ok(())
}

/// `UFFDIO_COPY` stopped after `done` bytes.
#[derive(Debug, thiserror::Error)]
#[error("UFFDIO_COPY stopped after {done} bytes: {source}")]
pub struct CopyError {
    pub done: u64,
    #[source]
    pub source: std::io::Error,
}
