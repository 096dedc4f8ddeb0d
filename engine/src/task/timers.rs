//! Process timers: POSIX timers (timer_create) and itimers.
//!
//! itimers: collect asks the seized target (remote getitimer); restore sets
//! them again (remote setitimer).
//!
//! POSIX timers: collect reads `/proc/PID/timers` (ID, signal, sigev_value,
//! notification, clock) and asks the seized target for each timer's remaining
//! time and interval (remote timer_gettime). Restore recreates each timer in
//! the restored process with its old ID (remote timer_create, see
//! [`restore_posix`]) and arms it with the remaining time.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::sys::remote::RemoteCall;

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
pub fn parse_proc_timers(text: &str) -> Result<Vec<PosixTimer>, TimersError> {
    let mut out: Vec<PosixTimer> = Vec::new();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        let bad = || TimersError::Unreadable {
            line: line.to_string(),
        };
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
            return Err(TimersError::BeforeId {
                line: line.to_string(),
            });
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

/// A `/proc/PID/timers` crest cannot read.
#[derive(Debug, thiserror::Error)]
pub enum TimersError {
    #[error("unreadable line {line:?}")]
    Unreadable { line: String },
    #[error("{line:?} before any ID line")]
    BeforeId { line: String },
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

/// `struct itimerval`, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ITimer {
    pub which: i32,
    pub interval_us: u64,
    pub value_us: u64,
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from_ne_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
}

/// The armed itimers of the process behind `remote`.
pub fn collect_itimers(remote: &RemoteCall) -> Result<Vec<ITimer>> {
    let mut itimers = Vec::new();
    for which in [libc::ITIMER_REAL, libc::ITIMER_VIRTUAL, libc::ITIMER_PROF] {
        remote.call(
            libc::SYS_getitimer,
            [which as u64, remote.scratch, 0, 0, 0, 0],
            "getitimer",
        )?;
        let b = remote.read_scratch(32)?;
        let t = ITimer {
            which,
            interval_us: u64_at(&b, 0) * 1_000_000 + u64_at(&b, 1),
            value_us: u64_at(&b, 2) * 1_000_000 + u64_at(&b, 3),
        };
        if t.value_us != 0 || t.interval_us != 0 {
            itimers.push(t);
        }
    }
    Ok(itimers)
}

/// Arms `itimers` again in the process behind `remote`.
pub fn restore_itimers(remote: &RemoteCall, itimers: &[ITimer]) -> Result<()> {
    for it in itimers {
        // A periodic timer caught the instant it fired reads 0 left (its signal
        // is among the pending ones); a value of 0 would disarm it: re-arm it
        // for one more interval.
        let value = if it.value_us == 0 {
            it.interval_us
        } else {
            it.value_us
        };
        let v = [
            it.interval_us / 1_000_000,
            it.interval_us % 1_000_000,
            value / 1_000_000,
            value % 1_000_000,
        ];
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_ne_bytes()).collect();
        let at = remote.write_scratch(0, &bytes)?;
        remote.call(
            libc::SYS_setitimer,
            [it.which as u64, at, 0, 0, 0, 0],
            "setitimer",
        )?;
    }
    Ok(())
}

/// Collects the POSIX timers of the seized process `remote` (its scratch page
/// receives timer_gettime's answers).
pub fn collect_posix(remote: &RemoteCall) -> Result<Vec<PosixTimer>> {
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
pub fn restore_posix(remote: &RemoteCall, timers: &[PosixTimer]) -> Result<(), TimerError> {
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
            ).into());
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
                return Err(TimerError::WrongId { pid, id: t.id, got });
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

/// Why a POSIX timer could not be recreated with its ID.
#[derive(Debug, thiserror::Error)]
pub enum TimerError {
    #[error("pid {pid}: timer {id} came back as timer {got}")]
    WrongId { pid: i32, id: i32, got: i32 },
    #[error(transparent)]
    Engine(#[from] Error),
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
}
