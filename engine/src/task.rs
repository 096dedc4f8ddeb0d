//! Per-task and per-process CPU and kernel state: registers, FPU/AVX state,
//! rseq, robust list, signals, itimers, credentials, rlimits, identity.
//! The collect half reads it from a seized task; the restore half is split
//! between the restore child (what it can set on itself) and remote calls.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::sys::proc;
use crate::sys::ptrace::Regs;
use crate::sys::remote::RemoteCall;

/// x86-64 `user_regs_struct`, by name.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registers {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub rbp: u64,
    pub rbx: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rax: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub orig_rax: u64,
    pub rip: u64,
    pub cs: u64,
    pub eflags: u64,
    pub rsp: u64,
    pub ss: u64,
    pub fs_base: u64,
    pub gs_base: u64,
    pub ds: u64,
    pub es: u64,
    pub fs: u64,
    pub gs: u64,
}

macro_rules! regs_fields {
    ($m:ident) => {
        $m!(
            r15, r14, r13, r12, rbp, rbx, r11, r10, r9, r8, rax, rcx, rdx, rsi, rdi, orig_rax, rip,
            cs, eflags, rsp, ss, fs_base, gs_base, ds, es, fs, gs
        )
    };
}

impl From<&Regs> for Registers {
    fn from(r: &Regs) -> Registers {
        macro_rules! conv { ($($f:ident),*) => { Registers { $($f: r.$f),* } } }
        regs_fields!(conv)
    }
}

impl Registers {
    pub fn to_user_regs(&self) -> Regs {
        // SAFETY: user_regs_struct is plain integers; all-zero is a valid value.
        let mut r: Regs = unsafe { std::mem::zeroed() };
        macro_rules! conv { ($($f:ident),*) => { $(r.$f = self.$f;)* } }
        regs_fields!(conv);
        r
    }

    /// The system call the task was inside when it was stopped, if any.
    pub fn interrupted_syscall(&self) -> Option<i64> {
        let nr = self.orig_rax as i64;
        (nr >= 0).then_some(nr)
    }
}

// Kernel-internal return codes a task interrupted inside a syscall shows in rax.
const ERESTARTSYS: i64 = -512;
const ERESTARTNOINTR: i64 = -513;
const ERESTARTNOHAND: i64 = -514;
const ERESTART_RESTARTBLOCK: i64 = -516;

/// How a syscall interrupted by the freeze continues. `restart_block` says
/// whether the task still has its kernel restart block (the live task after a
/// dump) or not (a restored task, which must re-issue the call itself).
pub fn resume_interrupted_syscall(regs: &mut Registers, restart_block: bool) {
    let Some(nr) = regs.interrupted_syscall() else {
        return;
    };
    match regs.rax as i64 {
        ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND => {
            regs.rax = nr as u64;
            regs.rip -= 2;
        }
        ERESTART_RESTARTBLOCK if restart_block => {
            regs.rax = libc::SYS_restart_syscall as u64;
            regs.rip -= 2;
        }
        ERESTART_RESTARTBLOCK => {
            // The restart block died with the old task, so the call is re-issued
            // as it was: a program without a signal handler never sees EINTR
            // from these calls, and must not after a restore either. Relative
            // sleeps continue from the remaining time where the kernel wrote it
            // (`rem`); ppoll and pselect already updated their timeout in memory;
            // absolute timeouts are exact; other relative timeouts (poll, futex)
            // start again, so they may wait up to twice as long — never less.
            const TIMER_ABSTIME: u64 = 1;
            if nr == libc::SYS_nanosleep && regs.rsi != 0 {
                regs.rdi = regs.rsi;
            } else if nr == libc::SYS_clock_nanosleep
                && regs.rsi & TIMER_ABSTIME == 0
                && regs.r10 != 0
            {
                regs.rdx = regs.r10;
            }
            regs.rax = nr as u64;
            regs.rip -= 2;
        }
        _ => {}
    }
    // Not inside a syscall any more: the kernel must not fix it up again.
    regs.orig_rax = u64::MAX;
}

/// One thread's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThreadImage {
    pub tid: i32,
    /// The thread's name (`/proc/PID/task/TID/comm`).
    #[serde(default)]
    pub name: String,
    pub regs: Registers,
    /// The XSAVE area (NT_X86_XSTATE): x87, SSE, AVX… as the kernel gave it.
    #[serde(with = "crate::image::hex_bytes")]
    pub xstate: Vec<u8>,
    pub sigmask: u64,
    /// Signals queued for this thread, each a raw 128-byte siginfo.
    pub pending: Vec<SigInfo>,
    pub rseq: Option<Rseq>,
    pub robust_list: Option<RobustList>,
    pub clear_child_tid: u64,
    pub altstack: Option<AltStack>,
    #[serde(default)]
    pub sched: Option<Sched>,
}

/// Scheduling of one thread: nice value, policy and priority, CPU affinity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sched {
    pub nice: i32,
    pub policy: i32,
    pub priority: i32,
    /// Allowed CPUs as a bitmap, 64 CPUs per word.
    pub affinity: Vec<u64>,
}

impl Sched {
    /// Reads the scheduling of thread `tid` from outside.
    pub fn collect(tid: i32) -> Result<Sched> {
        let err = |what: &str| Error::sys(tid, what.to_string(), nix::errno::Errno::last());
        // SAFETY: these calls take a tid and write only into locals we own.
        unsafe {
            *libc::__errno_location() = 0;
            let nice = libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t);
            if nice == -1 && nix::errno::Errno::last_raw() != 0 {
                return Err(err("getpriority"));
            }
            let policy = libc::sched_getscheduler(tid);
            if policy < 0 {
                return Err(err("sched_getscheduler"));
            }
            let mut param: libc::sched_param = std::mem::zeroed();
            if libc::sched_getparam(tid, &mut param) < 0 {
                return Err(err("sched_getparam"));
            }
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &mut set) < 0 {
                return Err(err("sched_getaffinity"));
            }
            let words = std::mem::size_of::<libc::cpu_set_t>() / 8;
            let raw =
                std::slice::from_raw_parts((&set as *const libc::cpu_set_t).cast::<u64>(), words);
            let last = raw.iter().rposition(|&w| w != 0).map_or(0, |i| i + 1);
            Ok(Sched {
                nice,
                policy,
                priority: param.sched_priority,
                affinity: raw[..last].to_vec(),
            })
        }
    }

    /// Applies it to thread `tid` from outside.
    pub fn apply(&self, tid: i32) -> Result<()> {
        let err = |what: &str| Error::sys(tid, what.to_string(), nix::errno::Errno::last());
        // SAFETY: these calls take a tid and read only locals we own.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            let words = std::mem::size_of::<libc::cpu_set_t>() / 8;
            let raw = std::slice::from_raw_parts_mut(
                (&mut set as *mut libc::cpu_set_t).cast::<u64>(),
                words,
            );
            for (dst, src) in raw.iter_mut().zip(&self.affinity) {
                *dst = *src;
            }
            if !self.affinity.is_empty()
                && libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) < 0
            {
                return Err(err("sched_setaffinity"));
            }
            let param = libc::sched_param {
                sched_priority: self.priority,
            };
            if libc::sched_setscheduler(tid, self.policy, &param) < 0 {
                return Err(err("sched_setscheduler"));
            }
            if libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, self.nice) < 0 {
                return Err(err("setpriority"));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rseq {
    pub pointer: u64,
    pub size: u32,
    pub signature: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RobustList {
    pub head: u64,
    pub len: u64,
}

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

/// `struct itimerval`, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ITimer {
    pub which: i32,
    pub interval_us: u64,
    pub value_us: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Creds {
    /// real, effective, saved, filesystem
    pub uids: [u32; 4],
    pub gids: [u32; 4],
    pub groups: Vec<u32>,
    pub cap_eff: u64,
    pub cap_prm: u64,
    pub cap_inh: u64,
    pub cap_bnd: u64,
    pub cap_amb: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rlimit {
    pub resource: u32,
    pub soft: u64,
    pub hard: u64,
}

/// Process-wide state that is not memory or files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessState {
    pub sigactions: Vec<SigAction>,
    /// Signals queued for the whole process (shared pending).
    pub shared_pending: Vec<SigInfo>,
    pub itimers: Vec<ITimer>,
    /// timer_create timers, by ID.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub posix_timers: Vec<crate::timers::PosixTimer>,
    pub creds: Creds,
    pub rlimits: Vec<Rlimit>,
    pub umask: u32,
    pub personality: u32,
    pub comm: String,
    /// PR_SET_PDEATHSIG signal, 0 for none.
    #[serde(default)]
    pub pdeathsig: i32,
    #[serde(default)]
    pub no_new_privs: bool,
    /// PR_GET_DUMPABLE: 0, 1 or 2.
    #[serde(default = "one")]
    pub dumpable: i32,
    #[serde(default)]
    pub child_subreaper: bool,
}

fn one() -> i32 {
    1
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from_ne_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
}

/// Collects the state of one seized thread; `regs` are its registers as they
/// were when it was frozen (before any remote call).
pub fn collect_thread(remote: &RemoteCall, regs: &Regs, name: String) -> Result<ThreadImage> {
    let t = remote.tracee;
    let regs = Registers::from(regs);
    let xstate = t.xstate()?;
    let sigmask = t.sigmask()?;
    let pending = t
        .pending_siginfos(false)?
        .into_iter()
        .map(|b| SigInfo::from_kernel(&b))
        .collect();
    let rseq = t.rseq_area(regs.fs_base)?.map(|a| Rseq {
        pointer: a.pointer,
        size: a.size,
        signature: a.signature,
    });
    let mut head = 0u64;
    let mut len = 0usize;
    // SAFETY: get_robust_list writes one pointer and one size_t into our locals.
    let r = unsafe { libc::syscall(libc::SYS_get_robust_list, t.pid, &mut head, &mut len) };
    if r < 0 {
        return Err(Error::sys(
            t.pid,
            "get_robust_list",
            nix::errno::Errno::last(),
        ));
    }
    let robust_list = (head != 0).then_some(RobustList {
        head,
        len: len as u64,
    });
    const PR_GET_TID_ADDRESS: u64 = 40;
    remote.call(
        libc::SYS_prctl,
        [PR_GET_TID_ADDRESS, remote.scratch, 0, 0, 0, 0],
        "prctl(PR_GET_TID_ADDRESS)",
    )?;
    let clear_child_tid = u64_at(&remote.read_scratch(8)?, 0);
    remote.call(
        libc::SYS_sigaltstack,
        [0, remote.scratch, 0, 0, 0, 0],
        "sigaltstack",
    )?;
    let ss = remote.read_scratch(24)?;
    let flags = i32::from_ne_bytes(ss[8..12].try_into().expect("4 bytes"));
    let altstack = (flags & libc::SS_DISABLE == 0).then(|| AltStack {
        sp: u64_at(&ss, 0),
        flags,
        size: u64_at(&ss, 2),
    });
    Ok(ThreadImage {
        sched: Some(Sched::collect(t.pid)?),
        tid: t.pid,
        name,
        regs,
        xstate,
        sigmask,
        pending,
        rseq,
        robust_list,
        clear_child_tid,
        altstack,
    })
}

/// Collects signal handlers, shared pending signals, itimers, credentials,
/// rlimits and the rest of the process-wide state.
pub fn collect_process(remote: &RemoteCall, status: &str) -> Result<ProcessState> {
    let pid = remote.tracee.pid;
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
    let shared_pending = remote
        .tracee
        .pending_siginfos(true)?
        .into_iter()
        .map(|b| SigInfo::from_kernel(&b))
        .collect();
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
    let ids = |key: &str| -> Result<[u32; 4]> {
        let v: Vec<u32> = proc::status_field(status, key)
            .unwrap_or("")
            .split_whitespace()
            .filter_map(|s| s.parse().ok())
            .collect();
        v.try_into().map_err(|_| Error::Refused {
            pid,
            reason: format!("cannot parse {key} from /proc/{pid}/status"),
        })
    };
    let cap = |key: &str| {
        proc::status_field(status, key)
            .and_then(|v| u64::from_str_radix(v, 16).ok())
            .unwrap_or(0)
    };
    let creds = Creds {
        uids: ids("Uid")?,
        gids: ids("Gid")?,
        groups: proc::status_field(status, "Groups")
            .unwrap_or("")
            .split_whitespace()
            .filter_map(|s| s.parse().ok())
            .collect(),
        cap_eff: cap("CapEff"),
        cap_prm: cap("CapPrm"),
        cap_inh: cap("CapInh"),
        cap_bnd: cap("CapBnd"),
        cap_amb: cap("CapAmb"),
    };
    // /proc/PID/limits, not prlimit(2): reading another uid's limits with
    // prlimit needs CAP_SYS_RESOURCE, which root may lack.
    let limits = proc::read(pid, "limits")?;
    let rlimits = parse_limits(&limits).map_err(|e| Error::Refused {
        pid,
        reason: format!("/proc/{pid}/limits: {e}"),
    })?;
    let umask = proc::status_field(status, "Umask")
        .and_then(|v| u32::from_str_radix(v, 8).ok())
        .unwrap_or(0o022);
    let personality = u32::from_str_radix(proc::read(pid, "personality")?.trim(), 16).unwrap_or(0);
    let comm = proc::read(pid, "comm")?.trim_end_matches('\n').to_string();
    const PR_GET_PDEATHSIG: u64 = 2;
    remote.call(
        libc::SYS_prctl,
        [PR_GET_PDEATHSIG, remote.scratch, 0, 0, 0, 0],
        "prctl(PR_GET_PDEATHSIG)",
    )?;
    let b = remote.read_scratch(4)?;
    let pdeathsig = i32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
    const PR_GET_DUMPABLE: u64 = 3;
    let dumpable = remote.call(
        libc::SYS_prctl,
        [PR_GET_DUMPABLE, 0, 0, 0, 0, 0],
        "prctl(PR_GET_DUMPABLE)",
    )? as i32;
    const PR_GET_CHILD_SUBREAPER: u64 = 37;
    remote.call(
        libc::SYS_prctl,
        [PR_GET_CHILD_SUBREAPER, remote.scratch, 0, 0, 0, 0],
        "prctl(PR_GET_CHILD_SUBREAPER)",
    )?;
    let child_subreaper = remote.read_scratch(4)?.iter().any(|&b| b != 0);
    let no_new_privs = proc::status_field(status, "NoNewPrivs") == Some("1");
    Ok(ProcessState {
        sigactions,
        shared_pending,
        itimers,
        posix_timers: crate::timers::collect_posix(remote)?,
        creds,
        rlimits,
        umask,
        personality,
        comm,
        pdeathsig,
        no_new_privs,
        dumpable,
        child_subreaper,
    })
}

/// Parses `/proc/PID/limits`: a header, then one row per resource in
/// RLIMIT_* order, with a 25-column name and 20-column soft and hard values.
pub fn parse_limits(text: &str) -> std::result::Result<Vec<Rlimit>, String> {
    let value = |v: &str| -> std::result::Result<u64, String> {
        match v.trim() {
            "unlimited" => Ok(libc::RLIM_INFINITY),
            v => v.parse().map_err(|_| format!("bad limit {v:?}")),
        }
    };
    text.lines()
        .skip(1)
        .enumerate()
        .map(|(i, line)| {
            let soft = line
                .get(26..46)
                .ok_or_else(|| format!("short line {line:?}"))?;
            let hard = line
                .get(47..67)
                .ok_or_else(|| format!("short line {line:?}"))?;
            Ok(Rlimit {
                resource: i as u32,
                soft: value(soft)?,
                hard: value(hard)?,
            })
        })
        .collect()
}

pub use crate::sys::names::{mask_names, signal_name};

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    fn in_syscall(nr: i64, rax: i64) -> Registers {
        Registers {
            orig_rax: nr as u64,
            rax: rax as u64,
            rip: 0x1002,
            rdi: 0x10,
            rsi: 0x20,
            rdx: 0x30,
            r10: 0x40,
            ..Default::default()
        }
    }

    #[rstest]
    #[case::read_restarts(0, ERESTARTSYS, true, 0, 0x1000)]
    #[case::pause_restarts(34, ERESTARTNOHAND, false, 34, 0x1000)]
    #[case::live_nanosleep_uses_restart_block(
        35,
        ERESTART_RESTARTBLOCK,
        true,
        libc::SYS_restart_syscall,
        0x1000
    )]
    #[case::restored_nanosleep_sleeps_the_rest(35, ERESTART_RESTARTBLOCK, false, 35, 0x1000)]
    #[case::restored_poll_is_reissued(7, ERESTART_RESTARTBLOCK, false, 7, 0x1000)]
    #[case::finished_syscall_untouched(1, 5, false, 5, 0x1002)]
    fn interrupted_syscalls_resume_as_the_kernel_would(
        #[case] nr: i64,
        #[case] rax: i64,
        #[case] restart_block: bool,
        #[case] want_rax: i64,
        #[case] want_rip: u64,
    ) {
        let mut r = in_syscall(nr, rax);
        resume_interrupted_syscall(&mut r, restart_block);
        assert_eq!((r.rax as i64, r.rip), (want_rax, want_rip));
        assert_eq!(r.orig_rax, u64::MAX);
    }

    #[test]
    fn restored_relative_sleep_continues_from_remaining_time() {
        let mut r = in_syscall(35, ERESTART_RESTARTBLOCK);
        resume_interrupted_syscall(&mut r, false);
        assert_eq!(r.rdi, 0x20, "nanosleep(req=rem, rem)");
        let mut r = in_syscall(libc::SYS_clock_nanosleep, ERESTART_RESTARTBLOCK);
        r.rsi = 0;
        resume_interrupted_syscall(&mut r, false);
        assert_eq!(r.rdx, 0x40, "clock_nanosleep(clock, 0, req=rem, rem)");
    }

    #[test]
    fn registers_convert_both_ways() {
        let r = in_syscall(35, -516);
        assert_eq!(Registers::from(&r.to_user_regs()), r);
    }

    #[test]
    fn limits_parse_in_resource_order() {
        let text =
            "Limit                     Soft Limit           Hard Limit           Units     \n\
Max cpu time              unlimited            unlimited            seconds   \n\
Max file size             unlimited            unlimited            bytes     \n\
Max data size             unlimited            unlimited            bytes     \n\
Max stack size            8388608              unlimited            bytes     \n\
Max core file size        0                    unlimited            bytes     \n\
Max resident set          unlimited            unlimited            bytes     \n\
Max processes             95556                95556                processes \n\
Max open files            512                  4096                 files     \n";
        let l = parse_limits(text).unwrap();
        assert_eq!(l.len(), 8);
        assert_eq!(
            l[3],
            Rlimit {
                resource: 3,
                soft: 8388608,
                hard: libc::RLIM_INFINITY
            }
        );
        assert_eq!(
            l[7],
            Rlimit {
                resource: 7,
                soft: 512,
                hard: 4096
            }
        );
        assert!(parse_limits("h\nMax cpu time   bogus").is_err());
    }
}
