//! POSIX timers (timer_create) and timerfds.
//!
//! POSIX timers: collect reads `/proc/PID/timers` (ID, signal, sigev_value,
//! notification, clock) and asks the seized target for each timer's remaining
//! time and interval (remote timer_gettime). Restore recreates each timer in
//! the restored process with its old ID (remote timer_create, see
//! [`restore_posix`]) and arms it with the remaining time.
//!
//! timerfds: collect reads fdinfo (clock, unread ticks, settime flags, the
//! remaining time and interval); restore creates a timerfd, arms it (an
//! absolute timer is re-armed at "now + remaining" on its own clock, with its
//! absolute and cancel-on-set flags) and gives back its unread ticks
//! (TFD_IOC_SET_TICKS).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

const SIGEV_SIGNAL: i32 = 0;
const SIGEV_NONE: i32 = 1;
const SIGEV_THREAD: i32 = 2;
const SIGEV_THREAD_ID: i32 = 4;

/// One timer_create timer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PosixTimer {
    /// The kernel's timer ID (what timer_create returned; glibc's timer_t).
    pub id: i32,
    /// The clock, as the kernel keeps it (CPU clocks are negative encodings).
    pub clock: i32,
    /// sigev_notify: SIGEV_SIGNAL, SIGEV_NONE, SIGEV_THREAD, maybe | SIGEV_THREAD_ID.
    pub notify: i32,
    pub signo: i32,
    /// sigev_value, delivered in the signal's si_value.
    pub sigval: u64,
    /// The thread notified (SIGEV_THREAD_ID) or the process.
    pub target: i32,
    pub interval_ns: u64,
    /// Time left until the next expiry; 0 = disarmed.
    pub value_ns: u64,
}

/// Parses `/proc/PID/timers`: blocks of `ID:`, `signal: SIGNO/SIGVAL`,
/// `notify: KIND/pid.N` (or `tid.N`) and `ClockID:` lines. The remaining time
/// is not there; it stays 0 until [`collect_posix`] asks the kernel.
pub fn parse_proc_timers(text: &str) -> std::result::Result<Vec<PosixTimer>, String> {
    let mut out: Vec<PosixTimer> = Vec::new();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        let bad = || format!("unreadable line {line:?}");
        if key == "ID" {
            out.push(PosixTimer {
                id: value.parse().map_err(|_| bad())?,
                clock: 0,
                notify: SIGEV_SIGNAL,
                signo: 0,
                sigval: 0,
                target: 0,
                interval_ns: 0,
                value_ns: 0,
            });
            continue;
        }
        let Some(t) = out.last_mut() else {
            return Err(format!("{line:?} before any ID line"));
        };
        match key {
            "signal" => {
                let (signo, val) = value.split_once('/').ok_or_else(bad)?;
                t.signo = signo.parse().map_err(|_| bad())?;
                let val = val.trim_start_matches("0x");
                t.sigval = if val == "(null)" {
                    0
                } else {
                    u64::from_str_radix(val, 16).map_err(|_| bad())?
                };
            }
            "notify" => {
                let (kind, who) = value.split_once('/').ok_or_else(bad)?;
                let base = match kind {
                    "signal" => SIGEV_SIGNAL,
                    "none" => SIGEV_NONE,
                    "thread" => SIGEV_THREAD,
                    _ => return Err(bad()),
                };
                let (whom, n) = who.split_once('.').ok_or_else(bad)?;
                t.notify = base | if whom == "tid" { SIGEV_THREAD_ID } else { 0 };
                t.target = n.parse().map_err(|_| bad())?;
            }
            "ClockID" => t.clock = value.parse().map_err(|_| bad())?,
            _ => {}
        }
    }
    Ok(out)
}

fn ns(sec: u64, nsec: u64) -> u64 {
    sec.saturating_mul(1_000_000_000).saturating_add(nsec)
}

fn timespec_bytes(ns: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&(ns / 1_000_000_000).to_ne_bytes());
    b[8..].copy_from_slice(&(ns % 1_000_000_000).to_ne_bytes());
    b
}

/// `struct itimerspec` for (interval, value) in nanoseconds.
fn itimerspec_bytes(interval_ns: u64, value_ns: u64) -> Vec<u8> {
    let mut v = timespec_bytes(interval_ns).to_vec();
    v.extend_from_slice(&timespec_bytes(value_ns));
    v
}

/// Collects the POSIX timers of the seized process `remote` (its scratch page
/// receives timer_gettime's answers).
pub fn collect_posix(remote: &crate::sys::remote::RemoteCall) -> Result<Vec<PosixTimer>> {
    let pid = remote.tracee.pid;
    let text = crate::sys::proc::read(pid, "timers").unwrap_or_default();
    let mut timers = parse_proc_timers(&text).map_err(|e| Error::Refused {
        pid,
        reason: format!("/proc/{pid}/timers: {e}"),
    })?;
    timers.sort_by_key(|t| t.id);
    for t in &mut timers {
        remote.call(
            libc::SYS_timer_gettime,
            [t.id as u64, remote.scratch, 0, 0, 0, 0],
            &format!("timer_gettime of timer {}", t.id),
        )?;
        let b = remote.read_scratch(32)?;
        let at = |i: usize| u64::from_ne_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        t.interval_ns = ns(at(0), at(1));
        t.value_ns = ns(at(2), at(3));
    }
    Ok(timers)
}

/// `struct sigevent` as timer_create takes it (64 bytes).
fn sigevent_bytes(t: &PosixTimer) -> [u8; 64] {
    let mut b = [0u8; 64];
    b[..8].copy_from_slice(&t.sigval.to_ne_bytes());
    b[8..12].copy_from_slice(&t.signo.to_ne_bytes());
    b[12..16].copy_from_slice(&t.notify.to_ne_bytes());
    b[16..20].copy_from_slice(&t.target.to_ne_bytes());
    b
}

/// Most timer_create calls the restore makes to reach a timer's ID on a
/// kernel that cannot be told the ID (before 6.16): IDs come from a counter
/// per process, so reaching ID N takes N+1 creations.
const MAX_LINEAR_IDS: i32 = 4096;

/// Recreates `timers` in the restored process through `remote` (its main
/// thread), each with its old ID, then arms them. Runs
/// after the process's threads exist (a timer may notify one of them).
pub fn restore_posix(remote: &crate::sys::remote::RemoteCall, timers: &[PosixTimer]) -> Result<()> {
    if timers.is_empty() {
        return Ok(());
    }
    const PR_TIMER_CREATE_RESTORE_IDS: u64 = 77;
    let (pid, scratch) = (remote.pid(), remote.scratch);
    let call = |nr: i64, args: [u64; 6], what: &str| remote.call(nr, args, what);
    let ev_at = scratch;
    let id_at = scratch + 64;
    let spec_at = scratch + 128;
    let mut sorted = timers.to_vec();
    sorted.sort_by_key(|t| t.id);
    // Linux 6.16+: timer_create takes the wanted ID from *created_timer_id.
    let explicit = remote.raw(
        libc::SYS_prctl,
        [PR_TIMER_CREATE_RESTORE_IDS, 1, 0, 0, 0, 0],
    )? == 0;
    for t in &sorted {
        if !explicit && t.id > MAX_LINEAR_IDS {
            return Err(Error::unsupported(
                pid,
                format!(
                    "POSIX timer ID {} on a kernel without PR_TIMER_CREATE_RESTORE_IDS (Linux 6.16+): reaching it would take {} timer_create calls",
                    t.id,
                    t.id + 1
                ),
            ));
        }
        crate::sys::ptrace::write_mem(pid, ev_at, &sigevent_bytes(t))?;
        let what = format!("timer_create of timer {}", t.id);
        loop {
            crate::sys::ptrace::write_mem(pid, id_at, &t.id.to_ne_bytes())?;
            call(
                libc::SYS_timer_create,
                [t.clock as i64 as u64, ev_at, id_at, 0, 0, 0],
                &what,
            )?;
            let mut got = [0u8; 4];
            crate::sys::ptrace::read_mem(pid, id_at, &mut got)?;
            let got = i32::from_ne_bytes(got);
            if got == t.id {
                break;
            }
            // Without explicit IDs: a lower ID is a gap (a timer deleted
            // before the dump): delete it and take the next one.
            call(
                libc::SYS_timer_delete,
                [got as u64, 0, 0, 0, 0, 0],
                "timer_delete",
            )?;
            if explicit || got > t.id {
                return Err(Error::Restore(format!(
                    "pid {pid}: timer {} came back as timer {got}",
                    t.id
                )));
            }
        }
    }
    if explicit {
        call(
            libc::SYS_prctl,
            [PR_TIMER_CREATE_RESTORE_IDS, 0, 0, 0, 0, 0],
            "prctl(PR_TIMER_CREATE_RESTORE_IDS, OFF)",
        )?;
    }
    for t in sorted
        .iter()
        .filter(|t| t.value_ns != 0 || t.interval_ns != 0)
    {
        // A periodic timer caught as it expired reads 0 left: 0 would disarm
        // it, so it runs one more interval.
        let value = if t.value_ns == 0 {
            t.interval_ns
        } else {
            t.value_ns
        };
        crate::sys::ptrace::write_mem(pid, spec_at, &itimerspec_bytes(t.interval_ns, value))?;
        call(
            libc::SYS_timer_settime,
            [t.id as u64, 0, spec_at, 0, 0, 0],
            &format!("timer_settime of timer {}", t.id),
        )?;
    }
    Ok(())
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
pub fn parse_timerfd(fdinfo: &str, flags: i32) -> std::result::Result<Timerfd, String> {
    let field = |key: &str| {
        fdinfo
            .lines()
            .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
            .ok_or_else(|| format!("a timerfd without {key:?} in its fdinfo"))
    };
    let pair = |key: &str| -> std::result::Result<u64, String> {
        let v = field(key)?;
        let (s, n) = v
            .trim_matches(['(', ')'])
            .split_once(',')
            .ok_or_else(|| format!("a timerfd with an unreadable {key} {v:?}"))?;
        let num = |x: &str| {
            x.trim()
                .parse::<u64>()
                .map_err(|_| format!("a timerfd with an unreadable {key} {v:?}"))
        };
        Ok(ns(num(s)?, num(n)?))
    };
    let int = |key: &str, radix: u32| -> std::result::Result<i64, String> {
        let v = field(key)?;
        i64::from_str_radix(&v, radix).map_err(|_| format!("a timerfd with {key} {v:?}"))
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

/// Creates the timerfd `t` (close-on-exec; the caller places it) and arms it.
pub fn open_timerfd(at: i32, t: &Timerfd) -> std::result::Result<i32, String> {
    let fail = |what: &str| format!("fd {at}: {what}: {}", std::io::Error::last_os_error());
    // SAFETY: timerfd_create takes integers and returns a new fd we own.
    let fd =
        unsafe { libc::timerfd_create(t.clock, libc::TFD_CLOEXEC | (t.flags & libc::O_NONBLOCK)) };
    if fd < 0 {
        return Err(fail("timerfd_create"));
    }
    let close_on_err = |msg: String| {
        // SAFETY: closing the fd we just created, on an error path.
        unsafe { libc::close(fd) };
        msg
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

/// A clock ID as a name, for `crest show`.
pub fn clock_name(clock: i32) -> String {
    match clock {
        libc::CLOCK_REALTIME => "CLOCK_REALTIME".into(),
        libc::CLOCK_MONOTONIC => "CLOCK_MONOTONIC".into(),
        libc::CLOCK_PROCESS_CPUTIME_ID => "CLOCK_PROCESS_CPUTIME_ID".into(),
        libc::CLOCK_THREAD_CPUTIME_ID => "CLOCK_THREAD_CPUTIME_ID".into(),
        libc::CLOCK_BOOTTIME => "CLOCK_BOOTTIME".into(),
        libc::CLOCK_REALTIME_ALARM => "CLOCK_REALTIME_ALARM".into(),
        libc::CLOCK_BOOTTIME_ALARM => "CLOCK_BOOTTIME_ALARM".into(),
        c if c < 0 => format!("CPU clock {c}"),
        c => format!("clock {c}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_timers_parse() {
        let text = "ID: 0\nsignal: 10/00000000000004d2\nnotify: signal/pid.4242\nClockID: 1\n\
                    ID: 2\nsignal: 14/0000000000000000\nnotify: none/pid.4242\nClockID: 0\n\
                    ID: 3\nsignal: 34/00007f0000001000\nnotify: signal/tid.4250\nClockID: -6\n";
        let t = parse_proc_timers(text).unwrap();
        assert_eq!(t.len(), 3);
        assert_eq!(
            (
                t[0].id,
                t[0].signo,
                t[0].sigval,
                t[0].notify,
                t[0].target,
                t[0].clock
            ),
            (0, 10, 0x4d2, SIGEV_SIGNAL, 4242, 1)
        );
        assert_eq!((t[1].id, t[1].notify, t[1].clock), (2, SIGEV_NONE, 0));
        assert_eq!(
            (t[2].notify, t[2].target, t[2].clock, t[2].sigval),
            (SIGEV_SIGNAL | SIGEV_THREAD_ID, 4250, -6, 0x7f00_0000_1000)
        );
        assert!(parse_proc_timers("signal: 10/0\n").is_err());
        assert!(parse_proc_timers("ID: 0\nnotify: bogus/pid.1\n").is_err());
        assert_eq!(parse_proc_timers("").unwrap(), vec![]);
    }

    #[test]
    fn timerfd_fdinfo_parses() {
        let text = "pos:\t0\nflags:\t02004000\nmnt_id:\t15\nino:\t1057\nclockid: 1\nticks: 3\n\
                    settime flags: 01\nit_value: (0, 9512345)\nit_interval: (1, 500)\n";
        let t = parse_timerfd(text, libc::O_NONBLOCK).unwrap();
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
        assert!(parse_timerfd("clockid: 1\n", 0).is_err());
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
        let fd = open_timerfd(3, &t).unwrap();
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap();
        let back = parse_timerfd(&info, libc::O_NONBLOCK).unwrap();
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
