//! timerfds: their clock, unread expirations, settime flags and timer.
//!
//! Collect reads fdinfo (clock, unread ticks, settime flags, the remaining
//! time and interval); restore creates a timerfd in the restorer, arms it (an
//! absolute timer is re-armed at "now + remaining" on its own clock, with its
//! absolute and cancel-on-set flags) and gives back its unread ticks
//! (TFD_IOC_SET_TICKS); every holder inherits it.

use std::os::fd::{FromRawFd, OwnedFd};

use serde::{Deserialize, Serialize};

use crate::fds::table::{OpenError, Opened};
use crate::sys::names::clock_name;

fn ns(sec: u64, nsec: u64) -> u64 {
    sec.saturating_mul(1_000_000_000).saturating_add(nsec)
}

const TFD_TIMER_ABSTIME: i32 = 1;
/// `_IOW('T', 0, u64)`: sets a timerfd's expiration count (CONFIG_CHECKPOINT_RESTORE).
const TFD_IOC_SET_TICKS: libc::c_ulong = 0x4008_5400;

/// A timerfd: its clock, unread expirations, settime flags and timer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timerfd {
    pub clock: i32,
    /// Expirations not read yet.
    pub ticks: u64,
    /// TFD_TIMER_ABSTIME, TFD_TIMER_CANCEL_ON_SET.
    pub settime_flags: i32,
    /// Time left until the next expiry (relative, whatever the flags); 0 = disarmed.
    pub value_ns: u64,
    pub interval_ns: u64,
    /// File status flags (O_NONBLOCK).
    pub flags: i32,
}

/// Parses a timerfd's fdinfo: `clockid:`, `ticks:`, `settime flags:` (octal),
/// `it_value: (SEC, NSEC)`, `it_interval: (SEC, NSEC)`.
pub fn parse(fdinfo: &str, flags: i32) -> Result<Timerfd, Unreadable> {
    let field = |key: &'static str| {
        fdinfo
            .lines()
            .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
            .ok_or(Unreadable::Missing { key })
    };
    let pair = |key: &'static str| -> Result<u64, Unreadable> {
        let value = field(key)?;
        let unreadable = || Unreadable::Pair {
            key,
            value: value.clone(),
        };
        let (s, n) = value
            .trim_matches(['(', ')'])
            .split_once(',')
            .ok_or_else(unreadable)?;
        let num = |x: &str| x.trim().parse::<u64>().map_err(|_| unreadable());
        Ok(ns(num(s)?, num(n)?))
    };
    let int = |key: &'static str, radix: u32| -> Result<i64, Unreadable> {
        let value = field(key)?;
        i64::from_str_radix(&value, radix).map_err(|_| Unreadable::Number { key, value })
    };
    Ok(Timerfd {
        clock: int("clockid:", 10)? as i32,
        ticks: int("ticks:", 10)? as u64,
        settime_flags: int("settime flags:", 8)? as i32,
        value_ns: pair("it_value:")?,
        interval_ns: pair("it_interval:")?,
        flags,
    })
}

/// A timerfd crest does not carry: its fdinfo lacks a field, or shows one
/// crest cannot read.
#[derive(Debug, thiserror::Error)]
pub enum Unreadable {
    #[error("a timerfd without {key:?} in its fdinfo")]
    Missing { key: &'static str },
    #[error("a timerfd with an unreadable {key} {value:?}")]
    Pair { key: &'static str, value: String },
    #[error("a timerfd with {key} {value:?}")]
    Number { key: &'static str, value: String },
}

/// Creates the timerfd `t` (close-on-exec; the caller places it) and arms it.
pub fn open(at: i32, t: &Timerfd) -> Result<i32, OpenError> {
    let fail = |what: &str| OpenError::last(at, what);
    // SAFETY: timerfd_create takes integers and returns a new fd we own.
    let fd =
        unsafe { libc::timerfd_create(t.clock, libc::TFD_CLOEXEC | (t.flags & libc::O_NONBLOCK)) };
    if fd < 0 {
        return Err(fail("timerfd_create"));
    }
    let close_on_err = |e: OpenError| {
        // SAFETY: closing the fd we just created, on an error path.
        unsafe { libc::close(fd) };
        e
    };
    if t.value_ns != 0 || t.interval_ns != 0 {
        let value = if t.value_ns == 0 {
            t.interval_ns
        } else {
            t.value_ns
        };
        let mut value = value;
        if t.settime_flags & TFD_TIMER_ABSTIME != 0 {
            // The dump recorded time left; an absolute timer expires at now + left
            // on its own clock, and keeps its flags (cancel-on-set needs them).
            let mut now = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: clock_gettime writes into `now`.
            if unsafe { libc::clock_gettime(t.clock, &mut now) } < 0 {
                return Err(close_on_err(fail("clock_gettime")));
            }
            value = value.saturating_add(ns(now.tv_sec as u64, now.tv_nsec as u64));
        }
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: (t.interval_ns / 1_000_000_000) as i64,
                tv_nsec: (t.interval_ns % 1_000_000_000) as i64,
            },
            it_value: libc::timespec {
                tv_sec: (value / 1_000_000_000) as i64,
                tv_nsec: (value % 1_000_000_000) as i64,
            },
        };
        // SAFETY: `spec` is a valid itimerspec; no old value is asked for.
        if unsafe { libc::timerfd_settime(fd, t.settime_flags, &spec, std::ptr::null_mut()) } < 0 {
            return Err(close_on_err(fail("timerfd_settime")));
        }
    }
    if t.ticks != 0 {
        // SAFETY: the ioctl reads one u64 from `ticks`.
        if unsafe { libc::ioctl(fd, TFD_IOC_SET_TICKS, &t.ticks as *const u64) } < 0 {
            return Err(close_on_err(fail(&format!(
                "restoring {} unread expirations (TFD_IOC_SET_TICKS)",
                t.ticks
            ))));
        }
    }
    Ok(fd)
}

impl Timerfd {
    /// [`open`] as the restorer's open file.
    pub fn restore(&self, at: i32) -> Result<Opened, OpenError> {
        let fd = open(at, self)?;
        // SAFETY: a descriptor just created and owned by nothing else.
        Ok(Opened::new(unsafe { OwnedFd::from_raw_fd(fd) }, None))
    }

    pub fn describe(&self, shared: bool, cloexec: &str) -> String {
        let abs = if self.settime_flags & TFD_TIMER_ABSTIME != 0 {
            ", absolute"
        } else {
            ""
        };
        let text = format!(
            "timerfd on {}{abs}: {:.6} s left, interval {:.6} s, {} unread expirations",
            clock_name(self.clock),
            self.value_ns as f64 / 1e9,
            self.interval_ns as f64 / 1e9,
            self.ticks
        );
        if shared {
            format!("{text} (shared{cloexec})")
        } else {
            format!("{text}{cloexec}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timerfd_fdinfo_parses() {
        let text = "pos:\t0\nflags:\t02004000\nmnt_id:\t15\nino:\t1057\nclockid: 1\nticks: 3\n\
                    settime flags: 01\nit_value: (0, 9512345)\nit_interval: (1, 500)\n";
        let t = parse(text, libc::O_NONBLOCK).unwrap();
        assert_eq!(
            t,
            Timerfd {
                clock: 1,
                ticks: 3,
                settime_flags: 1,
                value_ns: 9_512_345,
                interval_ns: 1_000_000_500,
                flags: libc::O_NONBLOCK,
            }
        );
        assert!(parse("clockid: 1\n", 0).is_err());
    }

    #[test]
    fn a_restored_timerfd_keeps_settings_and_ticks() {
        let t = Timerfd {
            clock: libc::CLOCK_MONOTONIC,
            ticks: 5,
            settime_flags: TFD_TIMER_ABSTIME,
            value_ns: 30_000_000_000,
            interval_ns: 60_000_000_000,
            flags: libc::O_NONBLOCK,
        };
        let fd = open(3, &t).unwrap();
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap();
        let back = parse(&info, libc::O_NONBLOCK).unwrap();
        assert_eq!(back.ticks, 5);
        assert_eq!(back.settime_flags, TFD_TIMER_ABSTIME);
        assert_eq!(back.interval_ns, 60_000_000_000);
        assert!(back.value_ns <= 30_000_000_000 && back.value_ns > 29_000_000_000);
        let mut n = 0u64;
        // SAFETY: reading one u64 from the timerfd we own.
        let r = unsafe { libc::read(fd, (&mut n as *mut u64).cast(), 8) };
        assert_eq!((r, n), (8, 5));
        // SAFETY: closing our fd.
        unsafe { libc::close(fd) };
    }
}
