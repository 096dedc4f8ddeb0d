//! Per-task and per-process state other than memory and descriptors:
//! registers and FPU/AVX state ([`regs`]), signals ([`signals`]),
//! credentials ([`creds`]), rseq, the robust futex list and
//! clear_child_tid (here), scheduling ([`sched`]), resource limits
//! ([`limits`]), timers ([`timers`]), and the identity of the process (comm,
//! umask, personality, pdeathsig, dumpable, child subreaper, no_new_privs).
//!
//! Collect reads it from a seized task, mostly through remote calls
//! ([`collect_thread`], [`collect_process`]). Restore is split: the restore
//! child sets what it can on itself ([`restore_in_child`]); the restorer
//! creates the threads and sets the rest through remote calls in each
//! ([`restore`]), and the registers last ([`set_registers`]).

pub mod creds;
pub mod limits;
pub mod regs;
pub mod sched;
pub mod signals;
pub mod timers;

use std::ffi::CStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::sys::proc;
use crate::sys::ptrace::{Regs, Tracee};
use crate::sys::remote::RemoteCall;
pub use creds::Creds;
pub use limits::Rlimit;
pub use regs::Registers;
pub use sched::Sched;
pub use signals::{AltStack, SigAction, SigInfo};
pub use timers::{ITimer, PosixTimer};

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
    pub posix_timers: Vec<PosixTimer>,
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

/// Collects the state of one seized thread; `regs` are its registers as they
/// were when it was frozen (before any remote call).
pub fn collect_thread(remote: &RemoteCall, regs: &Regs, name: String) -> Result<ThreadImage> {
    let t = remote.tracee;
    let regs = Registers::from(regs);
    let xstate = t.xstate()?;
    let sigmask = t.sigmask()?;
    let pending = signals::collect_pending(remote, false)?;
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
    let b = remote.read_scratch(8)?;
    let clear_child_tid = u64::from_ne_bytes(b[..8].try_into().expect("8 bytes"));
    let altstack = signals::collect_altstack(remote)?;
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
/// rlimits and the rest of the process-wide state (`status`: the text of
/// its `/proc/PID/status`).
pub fn collect_process(remote: &RemoteCall, status: &str) -> Result<ProcessState> {
    let pid = remote.tracee.pid;
    let sigactions = signals::collect_sigactions(remote)?;
    let shared_pending = signals::collect_pending(remote, true)?;
    let itimers = timers::collect_itimers(remote)?;
    let creds = Creds::from_status(pid, status)?;
    let limits = proc::read(pid, "limits")?;
    let rlimits = limits::parse_limits(&limits).map_err(|e| Error::Refused {
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
        posix_timers: timers::collect_posix(remote)?,
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

/// What the restore child sets on itself (`comm`: its name, checked before
/// any clone): umask, personality, name, resource limits, signal handlers,
/// its main thread's (`main`) alternate stack and pending signals.
pub fn restore_in_child(
    state: &ProcessState,
    main: &ThreadImage,
    comm: &CStr,
) -> Result<(), signals::SignalSetupError> {
    // SAFETY: plain syscalls on ourselves with values we own.
    unsafe {
        libc::umask(state.umask);
        libc::personality(state.personality as libc::c_ulong);
        libc::prctl(libc::PR_SET_NAME, comm.as_ptr());
    }
    limits::apply_in_child(&state.rlimits);
    signals::restore_in_child(
        &state.sigactions,
        main.altstack,
        &main.pending,
        &state.shared_pending,
    )
}

/// Why the state of a restored process could not be set.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("pid {pid}: thread {tid} came back as {got}")]
    ThreadId { pid: i32, tid: i32, got: i32 },
    #[error(transparent)]
    Timer(#[from] timers::TimerError),
    #[error(transparent)]
    Engine(#[from] Error),
}

/// Sets the rest of the state of the restored process behind `remote` (its
/// main thread, stopped at the trampoline; its memory and descriptors in
/// place): itimers, pdeathsig, its other threads (created with their
/// original TIDs), their pending signals, POSIX timers, and in every thread
/// rseq, the robust list, clear_child_tid, name, credentials and FPU state;
/// then dumpable and child subreaper. Returns its threads, main thread first.
pub fn restore(
    remote: &RemoteCall,
    threads: &[ThreadImage],
    state: &ProcessState,
) -> Result<Vec<Tracee>, TaskError> {
    let (t, pid, scratch) = (remote.tracee, remote.pid(), remote.scratch);
    let call = |nr: i64, args: [u64; 6], what: &str| remote.call(nr, args, what);
    timers::restore_itimers(remote, &state.itimers)?;
    const PR_SET_PDEATHSIG: u64 = 1;
    call(
        libc::SYS_prctl,
        [PR_SET_PDEATHSIG, state.pdeathsig as u64, 0, 0, 0, 0],
        "prctl(PR_SET_PDEATHSIG)",
    )?;

    // Threads: created by remote clone3 in the main thread with their original
    // TIDs (before credentials drop, since set_tid needs privilege).
    let mut tracees = vec![t];
    for th in &threads[1..] {
        const THREAD_FLAGS: u64 = (libc::CLONE_VM
            | libc::CLONE_FS
            | libc::CLONE_FILES
            | libc::CLONE_SIGHAND
            | libc::CLONE_THREAD
            | libc::CLONE_SYSVSEM) as u64;
        let args_at = scratch + 2048;
        let tid_at = args_at + 256;
        let mut args = [0u64; 11];
        args[0] = THREAD_FLAGS;
        args[8] = tid_at;
        args[9] = 1;
        let bytes: Vec<u8> = args.iter().flat_map(|v| v.to_ne_bytes()).collect();
        remote.write_scratch(2048, &bytes)?;
        remote.write_scratch(2048 + 256, &th.tid.to_ne_bytes())?;
        let tid = remote.clone_thread(args_at, 88)?;
        if tid != th.tid {
            return Err(TaskError::ThreadId {
                pid,
                tid: th.tid,
                got: tid,
            });
        }
        tracees.push(Tracee { pid: tid });
    }
    // Signals queued for one thread: each thread queues its own.
    for (th, tt) in threads.iter().zip(&tracees).skip(1) {
        signals::restore_thread_pending(&remote.on(*tt), pid, &th.pending)?;
    }
    // POSIX timers once every thread they may notify exists.
    timers::restore_posix(remote, &state.posix_timers)?;
    state.creds.check(pid)?;
    for (th, tt) in threads.iter().zip(&tracees) {
        let thread = remote.on(*tt);
        let tcall = |nr: i64, args: [u64; 6], what: &str| thread.call(nr, args, what);
        if let Some(r) = &th.rseq {
            tcall(
                libc::SYS_rseq,
                [r.pointer, r.size as u64, 0, r.signature as u64, 0, 0],
                "rseq register",
            )?;
        }
        if let Some(rl) = &th.robust_list {
            tcall(
                libc::SYS_set_robust_list,
                [rl.head, rl.len, 0, 0, 0, 0],
                "set_robust_list",
            )?;
        }
        tcall(
            libc::SYS_set_tid_address,
            [th.clear_child_tid, 0, 0, 0, 0, 0],
            "set_tid_address",
        )?;
        if th.tid != pid {
            if let Some(a) = &th.altstack {
                signals::restore_thread_altstack(&thread, a)?;
            }
            let mut name = th.name.as_bytes().to_vec();
            name.truncate(15);
            name.push(0);
            let at = thread.write_scratch(0, &name)?;
            tcall(
                libc::SYS_prctl,
                [libc::PR_SET_NAME as u64, at, 0, 0, 0, 0],
                "prctl(PR_SET_NAME)",
            )?;
        }
        // Credentials are per thread in the kernel: set them in each.
        state.creds.restore(&thread, state.no_new_privs)?;
        tt.set_xstate(&th.xstate)?;
    }
    // After the credentials, which reset it.
    call(
        libc::SYS_prctl,
        [
            libc::PR_SET_DUMPABLE as u64,
            state.dumpable as u64,
            0,
            0,
            0,
            0,
        ],
        "prctl(PR_SET_DUMPABLE)",
    )?;
    if state.child_subreaper {
        call(
            libc::SYS_prctl,
            [libc::PR_SET_CHILD_SUBREAPER as u64, 1, 0, 0, 0, 0],
            "prctl(PR_SET_CHILD_SUBREAPER)",
        )?;
    }
    Ok(tracees)
}

/// Gives every thread its scheduling and its own registers and signal mask
/// (masks last: a pending signal they unblock must not interrupt our
/// syscalls). The main thread's last system call (`last`, from the
/// trampoline at `remote`) removes the trampoline it runs from; at its exit
/// stop it gets its registers and never returns into the trampoline.
pub fn set_registers(
    remote: &RemoteCall,
    images: &[ThreadImage],
    threads: &[Tracee],
    last: (i64, [u64; 6], &str),
) -> Result<()> {
    for (th, tt) in images.iter().zip(threads) {
        if let Some(sched) = &th.sched {
            sched.apply(tt.pid)?;
        }
    }
    for (th, tt) in images.iter().zip(threads).skip(1) {
        let mut regs = th.regs;
        regs.resume_interrupted_syscall(false);
        tt.set_prstatus(&regs.to_user_regs())?;
        tt.set_sigmask(th.sigmask)?;
    }
    let t = threads[0];
    let mut regs = images[0].regs;
    regs.resume_interrupted_syscall(false);
    let base = t.regs()?;
    let (nr, args, what) = last;
    let r = remote.on(t).leaving_regs(nr, args, &base)?;
    if r != 0 {
        return Err(Error::sys(
            t.pid,
            format!("remote {what}"),
            nix::errno::Errno::from_raw(-r as i32),
        ));
    }
    t.set_prstatus(&regs.to_user_regs())?;
    t.set_sigmask(images[0].sigmask)
}
