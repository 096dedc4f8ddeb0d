//! eventfds: the counter, and whether it counts as a semaphore.
//!
//! Collect reads both from fdinfo (before Linux 6.6 it does not show the
//! semaphore flag: the mode is then probed on crest's duplicate of the
//! target's descriptor, the counter put back as it was). Restore creates the
//! eventfd in the restorer with the counter, and every holder inherits it.

use std::os::fd::{FromRawFd, OwnedFd};

use serde::{Deserialize, Serialize};

use crate::error::{CollectError, Error};
use crate::fds::table::{OpenError, Opened};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Eventfd {
    pub count: u64,
    pub semaphore: bool,
    pub flags: i32,
}

impl Eventfd {
    /// An eventfd from its fdinfo; `semaphore_probe` tells its mode, given
    /// its counter, where fdinfo does not (before Linux 6.6).
    pub fn from_fdinfo(
        fdinfo: &str,
        flags: i32,
        semaphore_probe: &dyn Fn(u64) -> Result<bool, CollectError>,
    ) -> Result<Eventfd, CollectError> {
        let count = eventfd_count(fdinfo)?;
        // Linux 6.6 added the semaphore flag to fdinfo; before that the
        // mode is found by reading the counter (and putting it back).
        let semaphore = match fdinfo
            .lines()
            .find_map(|l| l.strip_prefix("eventfd-semaphore:").map(str::trim))
        {
            Some(v) => v == "1",
            None => semaphore_probe(count)?,
        };
        Ok(Eventfd {
            count,
            semaphore,
            flags,
        })
    }

    /// Creates it (close-on-exec; the caller places it) with its counter.
    pub fn open(&self, at: i32) -> Result<i32, OpenError> {
        let sem = if self.semaphore {
            libc::EFD_SEMAPHORE
        } else {
            0
        };
        let initial = self.count.min(u32::MAX as u64);
        // SAFETY: eventfd takes integers and returns a new fd; the write adds the
        // part of the counter above eventfd(2)'s 32-bit initial value.
        unsafe {
            let fd = libc::eventfd(
                initial as libc::c_uint,
                sem | libc::EFD_CLOEXEC | (self.flags & libc::O_NONBLOCK),
            );
            if fd < 0 {
                return Err(OpenError::last(at, "eventfd"));
            }
            if self.count > initial {
                let rest = self.count - initial;
                libc::write(fd, (&rest as *const u64).cast(), 8);
            }
            Ok(fd)
        }
    }

    /// [`Eventfd::open`] as the restorer's open file.
    pub fn restore(&self, at: i32) -> Result<Opened, OpenError> {
        let fd = self.open(at)?;
        // SAFETY: a descriptor just created and owned by nothing else.
        Ok(Opened::new(unsafe { OwnedFd::from_raw_fd(fd) }, None))
    }

    pub fn describe(&self, shared: bool, cloexec: &str) -> String {
        if shared {
            format!("eventfd, counter {} (shared{cloexec})", self.count)
        } else {
            format!("eventfd, counter {}{cloexec}", self.count)
        }
    }
}

/// Whether eventfd `fd` of the frozen `pid` is in semaphore mode, for
/// kernels whose fdinfo does not say (before 6.6): see [`probe_mode`].
/// The descriptor probed is crest's duplicate of the target's open file, so
/// the target's fd table does not change.
pub fn is_semaphore(pid: i32, fd: i32, before: u64) -> Result<bool, CollectError> {
    let efd = crate::sys::fd::pidfd_getfd(pid, fd)
        .map_err(|e| CollectError::not_carried(NotCarried::NotTaken(e)))?;
    let semaphore =
        probe_mode(&efd, before).map_err(|e| CollectError::not_carried(NotCarried::Probe(e)))?;
    let info = crate::sys::proc::read(pid, &format!("fdinfo/{fd}"))?;
    let after = eventfd_count(&info)?;
    if after != before {
        return Err(CollectError::not_carried(NotCarried::CounterChanged {
            before,
            after,
        }));
    }
    Ok(semaphore)
}

/// The counter of an eventfd, from its fdinfo (the kernel prints it in hex,
/// "%16llx").
fn eventfd_count(fdinfo: &str) -> Result<u64, CollectError> {
    fdinfo
        .lines()
        .find_map(|l| l.strip_prefix("eventfd-count:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .ok_or_else(|| CollectError::not_carried(NotCarried::NoCount))
}

/// An eventfd crest does not carry.
#[derive(Debug, thiserror::Error)]
pub enum NotCarried {
    #[error("an eventfd without a readable count")]
    NoCount,
    #[error("an eventfd whose mode could not be probed ({0})")]
    NotTaken(#[source] Error),
    #[error("an eventfd whose mode could not be probed ({0})")]
    Probe(#[source] ProbeError),
    #[error("an eventfd whose counter changed while its mode was probed ({before} before, {after} after: is it shared with a process outside the dump?)")]
    CounterChanged { before: u64, after: u64 },
}

/// A step of [`probe_mode`] failed.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct ProbeError {
    what: &'static str,
    #[source]
    source: std::io::Error,
}

/// Probes the mode of eventfd `efd` whose counter is `count`: a read returns
/// 1 in semaphore mode and the whole counter otherwise. The counter is raised
/// to at least 2 (so that the two answers differ), read once, and put back to
/// `count`; no read ever waits. epoll reports nothing for the moment the
/// counter was raised (it re-checks readiness before reporting), though a
/// poll(2) waiter outside the dump may wake once.
fn probe_mode(efd: &OwnedFd, count: u64) -> Result<bool, ProbeError> {
    use std::io::{Read, Write};
    // Near the top of its range a write would wait (or fail).
    if count > u64::MAX - 4 {
        return Err(ProbeError {
            what: "its counter is at its maximum",
            source: std::io::Error::from_raw_os_error(libc::EOVERFLOW),
        });
    }
    let step = |what| move |source| ProbeError { what, source };
    let mut f = std::fs::File::from(efd.try_clone().map_err(step("dup"))?);
    let add = 2u64.saturating_sub(count);
    if add > 0 {
        f.write_all(&add.to_ne_bytes()).map_err(step("write"))?;
    }
    let mut v = [0u8; 8];
    f.read_exact(&mut v).map_err(step("read"))?;
    let semaphore = u64::from_ne_bytes(v) == 1;
    if semaphore {
        // The counter is now count + add - 1.
        if add == 0 {
            f.write_all(&1u64.to_ne_bytes()).map_err(step("write"))?;
        }
        for _ in 1..add {
            f.read_exact(&mut v).map_err(step("read"))?;
        }
    } else if count > 0 {
        // The read emptied it.
        f.write_all(&count.to_ne_bytes()).map_err(step("write"))?;
    }
    Ok(semaphore)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;
    use std::os::fd::AsRawFd;

    fn eventfd(count: u32, semaphore: bool) -> OwnedFd {
        let flags = libc::EFD_CLOEXEC | if semaphore { libc::EFD_SEMAPHORE } else { 0 };
        // SAFETY: eventfd returns a new descriptor we then own.
        let fd = unsafe { libc::eventfd(count, flags) };
        assert!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
        // SAFETY: fd is a fresh descriptor nothing else owns.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    fn fdinfo(fd: &OwnedFd) -> String {
        std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).unwrap()
    }

    #[rstest]
    fn eventfd_mode_probe_keeps_the_counter(
        #[values(0, 1, 2, 3, 1000)] count: u32,
        #[values(false, true)] semaphore: bool,
    ) {
        let fd = eventfd(count, semaphore);
        assert_eq!(probe_mode(&fd, count.into()).unwrap(), semaphore);
        assert_eq!(eventfd_count(&fdinfo(&fd)).unwrap(), u64::from(count));
        // Probing twice answers the same.
        assert_eq!(probe_mode(&fd, count.into()).unwrap(), semaphore);
        assert_eq!(eventfd_count(&fdinfo(&fd)).unwrap(), u64::from(count));
    }

    /// Restore, collect again: the same state.
    #[rstest]
    fn round_trip(
        #[values(0, 7, u64::from(u32::MAX) + 5)] count: u64,
        #[values(false, true)] semaphore: bool,
    ) {
        let saved = Eventfd {
            count,
            semaphore,
            flags: libc::O_NONBLOCK,
        };
        let back = saved.restore(3).unwrap();
        let info = fdinfo(&back.fd);
        let flags = crate::fds::table::status_flags(crate::sys::proc::parse_fdinfo(&info).flags);
        let again = Eventfd::from_fdinfo(&info, flags, &|c| {
            probe_mode(&back.fd, c).map_err(|e| CollectError::not_carried(NotCarried::Probe(e)))
        })
        .unwrap();
        assert_eq!(again, saved);
    }
}
