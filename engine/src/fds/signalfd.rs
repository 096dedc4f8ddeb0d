//! signalfds: the set of signals they read. Collect reads the mask from
//! fdinfo; restore creates the signalfd in the restorer and every holder
//! inherits it.

use std::os::fd::{FromRawFd, OwnedFd};

use serde::{Deserialize, Serialize};

use crate::fds::table::{OpenError, Opened};
use crate::sys::names::mask_names;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signalfd {
    pub mask: u64,
    pub flags: i32,
}

impl Signalfd {
    pub fn from_fdinfo(fdinfo: &str, flags: i32) -> Result<Signalfd, NoMask> {
        let mask = fdinfo
            .lines()
            .find_map(|l| l.strip_prefix("sigmask:").map(str::trim))
            .and_then(|v| u64::from_str_radix(v, 16).ok())
            .ok_or(NoMask)?;
        Ok(Signalfd { mask, flags })
    }

    /// Creates it (close-on-exec; the caller places it).
    pub fn open(&self, at: i32) -> Result<i32, OpenError> {
        // SAFETY: a sigset_t we fill ourselves; signalfd returns a new fd.
        let fd = unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for sig in 1..=64 {
                if self.mask & (1u64 << (sig - 1)) != 0 {
                    libc::sigaddset(&mut set, sig);
                }
            }
            libc::signalfd(
                -1,
                &set,
                libc::SFD_CLOEXEC | (self.flags & libc::O_NONBLOCK),
            )
        };
        if fd < 0 {
            return Err(OpenError::last(at, "signalfd"));
        }
        Ok(fd)
    }

    /// [`Signalfd::open`] as the restorer's open file.
    pub fn restore(&self, at: i32) -> Result<Opened, OpenError> {
        let fd = self.open(at)?;
        // SAFETY: a descriptor just created and owned by nothing else.
        Ok(Opened::new(unsafe { OwnedFd::from_raw_fd(fd) }, None))
    }

    pub fn describe(&self, shared: bool, cloexec: &str) -> String {
        let signals = mask_names(self.mask).join(" ");
        if shared {
            format!("signalfd for [{signals}] (shared{cloexec})")
        } else {
            format!("signalfd for [{signals}]{cloexec}")
        }
    }
}

/// A signalfd crest does not carry: its fdinfo shows no mask it can read.
#[derive(Debug, thiserror::Error)]
#[error("a signalfd without a readable mask")]
pub struct NoMask;

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// Restore, collect again: the same state.
    #[test]
    fn round_trip() {
        let saved = Signalfd {
            mask: (1 << (libc::SIGUSR1 - 1)) | (1 << (libc::SIGRTMIN() + 2 - 1)),
            flags: libc::O_NONBLOCK,
        };
        let back = saved.restore(3).unwrap();
        let info =
            std::fs::read_to_string(format!("/proc/self/fdinfo/{}", back.fd.as_raw_fd())).unwrap();
        let flags = crate::fds::table::status_flags(crate::sys::proc::parse_fdinfo(&info).flags);
        assert_eq!(Signalfd::from_fdinfo(&info, flags).unwrap(), saved);
        assert_eq!(
            saved.describe(true, ""),
            "signalfd for [SIGUSR1 SIGRTMIN+2] (shared)"
        );
    }
}
