//! Signals: handlers (sigaction), pending signals with their siginfo (per
//! thread and process-wide), masks, and the alternate signal stack.
//!
//! Collect asks the seized target (remote rt_sigaction and sigaltstack,
//! PTRACE_PEEKSIGINFO). Restore: the restore child sets its handlers, its
//! main thread's alternate stack and queues its pending signals itself
//! ([`restore_in_child`]); the other threads' stacks and pending signals are
//! given through remote calls in each ([`restore_thread_pending`],
//! [`restore_thread_altstack`]); the masks are set last, with the registers.

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::sys::names::signal_name;
use crate::sys::remote::RemoteCall;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AltStack {
    pub sp: u64,
    pub flags: i32,
    pub size: u64,
}

/// A raw siginfo as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SigInfo(#[serde(with = "crate::image::hex_bytes")] pub Vec<u8>);

impl SigInfo {
    /// A siginfo as PTRACE_PEEKSIGINFO gave it. A POSIX timer's signal carries
    /// a kernel-private cookie (`si_sys_private`) that the kernel matches
    /// against the timer when the signal is dequeued; it means nothing to the
    /// restored timer, so it is dropped.
    pub fn from_kernel(raw: &[u8]) -> SigInfo {
        const SI_TIMER: i32 = -2;
        let mut v = raw.to_vec();
        if v.len() >= 36 && i32::from_ne_bytes([v[8], v[9], v[10], v[11]]) == SI_TIMER {
            v[32..36].fill(0);
        }
        SigInfo(v)
    }

    pub fn signo(&self) -> i32 {
        i32::from_ne_bytes([self.0[0], self.0[1], self.0[2], self.0[3]])
    }
}

/// `struct sigaction` as the kernel's rt_sigaction takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SigAction {
    pub signo: i32,
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    pub mask: u64,
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from_ne_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
}

/// The handlers of the process behind `remote` (those not at their default).
pub fn collect_sigactions(remote: &RemoteCall) -> Result<Vec<SigAction>> {
    let mut sigactions = Vec::new();
    for signo in 1..=64 {
        if signo == libc::SIGKILL || signo == libc::SIGSTOP {
            continue;
        }
        remote.call(
            libc::SYS_rt_sigaction,
            [signo as u64, 0, remote.scratch, 8, 0, 0],
            "rt_sigaction",
        )?;
        let b = remote.read_scratch(32)?;
        let act = SigAction {
            signo,
            handler: u64_at(&b, 0),
            flags: u64_at(&b, 1),
            restorer: u64_at(&b, 2),
            mask: u64_at(&b, 3),
        };
        if act.handler != 0 || act.flags != 0 || act.mask != 0 {
            sigactions.push(act);
        }
    }
    Ok(sigactions)
}

/// The signals queued for the thread behind `remote`, or (`shared`) for its
/// whole process, without dequeuing them.
pub fn collect_pending(remote: &RemoteCall, shared: bool) -> Result<Vec<SigInfo>> {
    Ok(remote
        .tracee
        .pending_siginfos(shared)?
        .into_iter()
        .map(|b| SigInfo::from_kernel(&b))
        .collect())
}

/// The alternate signal stack of the thread behind `remote`.
pub fn collect_altstack(remote: &RemoteCall) -> Result<Option<AltStack>> {
    remote.call(
        libc::SYS_sigaltstack,
        [0, remote.scratch, 0, 0, 0, 0],
        "sigaltstack",
    )?;
    let ss = remote.read_scratch(24)?;
    let flags = i32::from_ne_bytes(ss[8..12].try_into().expect("4 bytes"));
    Ok((flags & libc::SS_DISABLE == 0).then(|| AltStack {
        sp: u64_at(&ss, 0),
        flags,
        size: u64_at(&ss, 2),
    }))
}

/// A signal disposition, the alternate stack or a pending signal the restore
/// child could not set on itself.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct SignalSetupError {
    what: String,
    #[source]
    source: std::io::Error,
}

impl SignalSetupError {
    fn last(what: impl Into<String>) -> SignalSetupError {
        SignalSetupError {
            what: what.into(),
            source: std::io::Error::last_os_error(),
        }
    }
}

/// What the restore child sets on itself: its handlers, its (main thread's)
/// alternate stack, and its pending signals, the thread's then the process's.
pub fn restore_in_child(
    sigactions: &[SigAction],
    altstack: Option<AltStack>,
    thread_pending: &[SigInfo],
    shared_pending: &[SigInfo],
) -> Result<(), SignalSetupError> {
    // SAFETY: rt_sigaction, sigaltstack, getpid and rt_(tg)sigqueueinfo on
    // ourselves, with buffers we own; the freshly cloned restore child is
    // single-threaded.
    unsafe {
        for signo in 1..=64 {
            if signo == libc::SIGKILL || signo == libc::SIGSTOP {
                continue;
            }
            let act = sigactions.iter().find(|a| a.signo == signo);
            let k: [u64; 4] = act
                .map(|a| [a.handler, a.flags, a.restorer, a.mask])
                .unwrap_or([0; 4]);
            if libc::syscall(libc::SYS_rt_sigaction, signo, k.as_ptr(), 0usize, 8usize) < 0 {
                return Err(SignalSetupError::last(format!(
                    "sigaction {}",
                    signal_name(signo)
                )));
            }
        }
        let ss = match altstack {
            Some(a) => libc::stack_t {
                ss_sp: a.sp as *mut libc::c_void,
                ss_flags: a.flags & !libc::SS_ONSTACK,
                ss_size: a.size as usize,
            },
            None => libc::stack_t {
                ss_sp: std::ptr::null_mut(),
                ss_flags: libc::SS_DISABLE,
                ss_size: 0,
            },
        };
        if libc::sigaltstack(&ss, std::ptr::null_mut()) < 0 {
            return Err(SignalSetupError::last("sigaltstack"));
        }
        let me = libc::getpid();
        for (info, shared) in thread_pending
            .iter()
            .map(|i| (i, false))
            .chain(shared_pending.iter().map(|i| (i, true)))
        {
            let r = if shared {
                libc::syscall(libc::SYS_rt_sigqueueinfo, me, info.signo(), info.0.as_ptr())
            } else {
                libc::syscall(
                    libc::SYS_rt_tgsigqueueinfo,
                    me,
                    me,
                    info.signo(),
                    info.0.as_ptr(),
                )
            };
            if r < 0 {
                return Err(SignalSetupError::last(format!(
                    "queueing pending {}",
                    signal_name(info.signo())
                )));
            }
        }
    }
    Ok(())
}

/// Queues the pending signals of a thread of process `tgid` other than the
/// main one, from the thread itself (the kernel lets only the receiving
/// thread send a siginfo with si_code >= 0).
pub fn restore_thread_pending(thread: &RemoteCall, tgid: i32, pending: &[SigInfo]) -> Result<()> {
    for info in pending {
        let at = thread.write_scratch(0, &info.0)?;
        thread.call(
            libc::SYS_rt_tgsigqueueinfo,
            [
                tgid as u64,
                thread.tracee.pid as u64,
                info.signo() as u64,
                at,
                0,
                0,
            ],
            "rt_tgsigqueueinfo",
        )?;
    }
    Ok(())
}

/// Sets the alternate stack of a thread other than the main one.
pub fn restore_thread_altstack(thread: &RemoteCall, altstack: &AltStack) -> Result<()> {
    let a = altstack;
    let ss: Vec<u8> = [a.sp, (a.flags & !libc::SS_ONSTACK) as u32 as u64, a.size]
        .iter()
        .flat_map(|v| v.to_ne_bytes())
        .collect();
    let at = thread.write_scratch(0, &ss)?;
    thread.call(libc::SYS_sigaltstack, [at, 0, 0, 0, 0, 0], "sigaltstack")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timer_signal_loses_its_kernel_cookie() {
        let mut raw = vec![0u8; 128];
        raw[0..4].copy_from_slice(&10i32.to_ne_bytes());
        raw[8..12].copy_from_slice(&(-2i32).to_ne_bytes());
        raw[32..36].copy_from_slice(&7i32.to_ne_bytes());
        let s = SigInfo::from_kernel(&raw);
        assert_eq!(s.signo(), 10);
        assert_eq!(&s.0[32..36], &[0; 4]);
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<SigInfo>(&json).unwrap(), s);
    }
}
