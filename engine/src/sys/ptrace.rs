//! ptrace: seizing a task, its register sets, its signal state, and its
//! memory through `/proc/PID/mem`. Running system calls inside it is
//! [`crate::sys::remote`].

use nix::errno::Errno;
use nix::sys::ptrace;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::error::{Error, Result};

pub type Regs = libc::user_regs_struct;

const NT_PRSTATUS: libc::c_int = 1;
const NT_X86_XSTATE: libc::c_int = 0x202;
const PTRACE_GET_RSEQ_CONFIGURATION: libc::c_uint = 0x420f;
/// Large enough for every XSAVE layout x86 CPUs have today (AMX included).
const XSTATE_MAX: usize = 16 * 1024;

/// `struct ptrace_rseq_configuration`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct RseqConfig {
    pub rseq_abi_pointer: u64,
    pub rseq_abi_size: u32,
    pub signature: u32,
    pub flags: u32,
    pub pad: u32,
}

static RSEQ_PTRACE_MISSING: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// A task we trace. Purely a handle: detaching is the caller's decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tracee {
    pub pid: i32,
}

impl Tracee {
    pub fn nix_pid(self) -> Pid {
        Pid::from_raw(self.pid)
    }

    /// An error of a ptrace request: a task that vanished is [`Error::Gone`].
    pub(crate) fn fail(self, what: &str, e: Errno) -> Error {
        if e == Errno::ESRCH {
            Error::Gone {
                pid: self.pid,
                during: "dump",
            }
        } else {
            Error::sys(self.pid, what.to_string(), e)
        }
    }

    /// `PTRACE_SEIZE` then `PTRACE_INTERRUPT`, and wait for the stop.
    pub fn seize(pid: i32) -> Result<Tracee> {
        let t = Tracee { pid };
        ptrace::seize(t.nix_pid(), ptrace::Options::PTRACE_O_TRACESYSGOOD).map_err(
            |e| match e {
                Errno::EPERM => Error::Refused {
                    pid,
                    reason:
                        "cannot be traced (already traced by another process, or not permitted)"
                            .into(),
                },
                e => t.fail("PTRACE_SEIZE", e),
            },
        )?;
        if let Err(e) = ptrace::interrupt(t.nix_pid()) {
            let _ = ptrace::detach(t.nix_pid(), None);
            return Err(t.fail("PTRACE_INTERRUPT", e));
        }
        t.wait_stop().inspect_err(|_| {
            let _ = ptrace::detach(t.nix_pid(), None);
        })?;
        Ok(t)
    }

    /// Seizes a restore child (which waits in pause() with every signal
    /// blocked) with the options restore needs: EXITKILL so the half-built
    /// process dies with crest, TRACECLONE so the threads it creates are ours.
    pub fn seize_for_restore(pid: i32) -> Result<Tracee> {
        let t = Tracee { pid };
        let opts = ptrace::Options::PTRACE_O_TRACESYSGOOD
            | ptrace::Options::PTRACE_O_EXITKILL
            | ptrace::Options::PTRACE_O_TRACECLONE;
        ptrace::seize(t.nix_pid(), opts).map_err(|e| t.fail("PTRACE_SEIZE", e))?;
        ptrace::interrupt(t.nix_pid()).map_err(|e| t.fail("PTRACE_INTERRUPT", e))?;
        t.wait_stop()?;
        Ok(t)
    }

    /// Waits until the task is in a ptrace stop of any kind.
    pub fn wait_stop(self) -> Result<WaitStatus> {
        loop {
            let status = waitpid(self.nix_pid(), Some(WaitPidFlag::__WALL))
                .map_err(|e| self.fail("waitpid", e))?;
            match status {
                WaitStatus::Exited(..) | WaitStatus::Signaled(..) => {
                    return Err(Error::Gone {
                        pid: self.pid,
                        during: "dump",
                    })
                }
                WaitStatus::Stopped(_, sig) if sig != Signal::SIGTRAP && sig != Signal::SIGSTOP => {
                    // A signal arrived while we were stopping the task: it stays
                    // queued in the kernel only if we re-inject it, so do that and
                    // wait again for our stop.
                    ptrace::cont(self.nix_pid(), Some(sig))
                        .map_err(|e| self.fail("PTRACE_CONT", e))?;
                    ptrace::interrupt(self.nix_pid())
                        .map_err(|e| self.fail("PTRACE_INTERRUPT", e))?;
                }
                s => return Ok(s),
            }
        }
    }

    pub fn regs(self) -> Result<Regs> {
        ptrace::getregs(self.nix_pid()).map_err(|e| self.fail("PTRACE_GETREGS", e))
    }

    pub fn set_regs(self, regs: &Regs) -> Result<()> {
        ptrace::setregs(self.nix_pid(), *regs).map_err(|e| self.fail("PTRACE_SETREGS", e))
    }

    /// The task's XSAVE area (FPU, SSE, AVX…), as many bytes as the kernel fills.
    pub fn xstate(self) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; XSTATE_MAX];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: PTRACE_GETREGSET writes at most iov_len bytes into iov_base, a live buffer.
        let r = unsafe { libc::ptrace(libc::PTRACE_GETREGSET, self.pid, NT_X86_XSTATE, &mut iov) };
        if r < 0 {
            return Err(self.fail("PTRACE_GETREGSET NT_X86_XSTATE", Errno::last()));
        }
        buf.truncate(iov.iov_len);
        Ok(buf)
    }

    pub fn set_xstate(self, xstate: &[u8]) -> Result<()> {
        let mut buf = xstate.to_vec();
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: PTRACE_SETREGSET reads iov_len bytes from iov_base, a live buffer.
        let r = unsafe { libc::ptrace(libc::PTRACE_SETREGSET, self.pid, NT_X86_XSTATE, &mut iov) };
        if r < 0 {
            return Err(self.fail("PTRACE_SETREGSET NT_X86_XSTATE", Errno::last()));
        }
        Ok(())
    }

    /// Sets the general registers through the regset interface, which (unlike
    /// PTRACE_SETREGS on some kernels) also takes fs_base/gs_base verbatim.
    pub fn set_prstatus(self, regs: &Regs) -> Result<()> {
        let mut r = *regs;
        let mut iov = libc::iovec {
            iov_base: (&mut r as *mut Regs).cast(),
            iov_len: std::mem::size_of::<Regs>(),
        };
        // SAFETY: iov points at a live user_regs_struct of iov_len bytes.
        let rc = unsafe { libc::ptrace(libc::PTRACE_SETREGSET, self.pid, NT_PRSTATUS, &mut iov) };
        if rc < 0 {
            return Err(self.fail("PTRACE_SETREGSET NT_PRSTATUS", Errno::last()));
        }
        Ok(())
    }

    pub fn sigmask(self) -> Result<u64> {
        let mut mask = 0u64;
        // SAFETY: PTRACE_GETSIGMASK writes 8 bytes (the size we pass) into `mask`.
        let r = unsafe { libc::ptrace(libc::PTRACE_GETSIGMASK, self.pid, 8usize, &mut mask) };
        if r < 0 {
            return Err(self.fail("PTRACE_GETSIGMASK", Errno::last()));
        }
        Ok(mask)
    }

    pub fn set_sigmask(self, mask: u64) -> Result<()> {
        let m = mask;
        // SAFETY: PTRACE_SETSIGMASK reads 8 bytes from `m`.
        let r = unsafe { libc::ptrace(libc::PTRACE_SETSIGMASK, self.pid, 8usize, &m) };
        if r < 0 {
            return Err(self.fail("PTRACE_SETSIGMASK", Errno::last()));
        }
        Ok(())
    }

    /// Pending signals with their siginfo, from the per-thread queue or (with
    /// `shared`) the process-wide one, without dequeuing them.
    pub fn pending_siginfos(self, shared: bool) -> Result<Vec<[u8; 128]>> {
        #[repr(C)]
        struct PeekArgs {
            off: u64,
            flags: u32,
            nr: i32,
        }
        let mut out = Vec::new();
        loop {
            let mut buf = [[0u8; 128]; 32];
            let args = PeekArgs {
                off: out.len() as u64,
                flags: u32::from(shared), // PTRACE_PEEKSIGINFO_SHARED
                nr: buf.len() as i32,
            };
            // SAFETY: the kernel writes at most `nr` siginfo structs (128 bytes each) into buf.
            let n = unsafe {
                libc::ptrace(libc::PTRACE_PEEKSIGINFO, self.pid, &args, buf.as_mut_ptr())
            };
            if n < 0 {
                return Err(self.fail("PTRACE_PEEKSIGINFO", Errno::last()));
            }
            out.extend_from_slice(&buf[..n as usize]);
            if (n as usize) < buf.len() {
                return Ok(out);
            }
        }
    }

    /// The task's rseq registration, or `None` when the kernel lacks
    /// PTRACE_GET_RSEQ_CONFIGURATION (before 5.13) or the task has none.
    pub fn rseq(self) -> Result<Option<RseqConfig>> {
        let mut conf = RseqConfig::default();
        // SAFETY: the kernel writes at most `addr` bytes (our struct's size) into `conf`.
        let r = unsafe {
            libc::ptrace(
                PTRACE_GET_RSEQ_CONFIGURATION,
                self.pid,
                std::mem::size_of::<RseqConfig>(),
                &mut conf,
            )
        };
        if r < 0 {
            let e = Errno::last();
            return if e == Errno::EIO {
                RSEQ_PTRACE_MISSING.store(true, std::sync::atomic::Ordering::Relaxed);
                Ok(None)
            } else {
                Err(self.fail("PTRACE_GET_RSEQ_CONFIGURATION", e))
            };
        }
        Ok((conf.rseq_abi_pointer != 0).then_some(conf))
    }

    /// Whether a previous [`Tracee::rseq`] found the kernel unable to report rseq
    /// registrations (before 5.13), so `None` there means "unknown".
    pub fn rseq_unknown() -> bool {
        RSEQ_PTRACE_MISSING.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Lets the stopped task run on its own (PTRACE_CONT), with no signal.
    pub fn resume(self) -> Result<()> {
        ptrace::cont(self.nix_pid(), None).map_err(|e| self.fail("PTRACE_CONT", e))
    }

    /// Stops a task that runs (PTRACE_INTERRUPT) and waits for the stop: ours,
    /// or a signal's that came first (left undelivered: the next resume does
    /// not pass it on, and our stop then follows).
    pub fn interrupt(self) -> Result<()> {
        ptrace::interrupt(self.nix_pid()).map_err(|e| self.fail("PTRACE_INTERRUPT", e))?;
        match waitpid(self.nix_pid(), Some(WaitPidFlag::__WALL))
            .map_err(|e| self.fail("waitpid", e))?
        {
            WaitStatus::Exited(..) | WaitStatus::Signaled(..) => Err(Error::Gone {
                pid: self.pid,
                during: "dump",
            }),
            _ => Ok(()),
        }
    }

    /// For a task running on its own: the signal it stopped with, if it
    /// stopped; an error if it died. Does not wait. A job-control stop (an
    /// outside SIGSTOP) is let go, as in a remote system call.
    pub fn poll_signal_stop(self) -> Result<Option<Signal>> {
        let flags = WaitPidFlag::__WALL | WaitPidFlag::WNOHANG;
        match waitpid(self.nix_pid(), Some(flags)).map_err(|e| self.fail("waitpid", e))? {
            WaitStatus::StillAlive => Ok(None),
            WaitStatus::PtraceEvent(_, _, libc::PTRACE_EVENT_STOP) => {
                self.resume()?;
                Ok(None)
            }
            WaitStatus::Exited(..) | WaitStatus::Signaled(..) => Err(Error::Gone {
                pid: self.pid,
                during: "dump",
            }),
            WaitStatus::Stopped(_, sig) => Ok(Some(sig)),
            other => Err(Error::Refused {
                pid: self.pid,
                reason: format!("unexpected stop {other:?} while crest's code ran in it"),
            }),
        }
    }

    pub fn detach(self, sig: Option<Signal>) -> Result<()> {
        ptrace::detach(self.nix_pid(), sig).map_err(|e| self.fail("PTRACE_DETACH", e))
    }
}

// Kernel-internal return codes a task interrupted inside a syscall shows in rax.
pub const ERESTARTSYS: i64 = -512;
pub const ERESTARTNOINTR: i64 = -513;
pub const ERESTARTNOHAND: i64 = -514;
pub const ERESTART_RESTARTBLOCK: i64 = -516;

/// How a syscall interrupted by the freeze continues. `restart_block` says
/// whether the task still has its kernel restart block (the live task after a
/// dump) or not (a restored task, which must re-issue the call itself).
pub fn resume_interrupted_syscall(regs: &mut Regs, restart_block: bool) {
    let nr = regs.orig_rax as i64;
    if nr < 0 {
        return;
    }
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

/// Where a thread's rseq area is registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RseqArea {
    pub pointer: u64,
    pub size: u32,
    pub signature: u32,
}

impl Tracee {
    /// The rseq registration of this thread (its thread pointer: `fs_base`).
    /// `None` also where the kernel cannot say (before 5.13) and the thread runs
    /// another libc than crest ([`Tracee::rseq_unknown`] tells those apart).
    pub fn rseq_area(self, fs_base: u64) -> Result<Option<RseqArea>> {
        Ok(match self.rseq()? {
            Some(c) => Some(RseqArea {
                pointer: c.rseq_abi_pointer,
                size: c.rseq_abi_size,
                signature: c.signature,
            }),
            None if Tracee::rseq_unknown() => glibc_rseq(self.pid, fs_base)?,
            None => None,
        })
    }
}

/// Finds a thread's rseq registration on kernels that cannot report it to a
/// tracer (before 5.13), the way glibc (2.35+) lays it out: the area sits at
/// `__rseq_offset` from the thread pointer, and its `cpu_id` is non-negative
/// once the kernel accepted the registration. Only when the target runs the
/// same libc as crest (so the offset is the same); otherwise nothing is claimed.
fn glibc_rseq(tid: i32, fs_base: u64) -> Result<Option<RseqArea>> {
    const RSEQ_SIG: u32 = 0x5305_3053;
    // SAFETY: dlsym only looks glibc's exported constants up; we read them.
    let (offset, size) = unsafe {
        let offset = libc::dlsym(libc::RTLD_DEFAULT, c"__rseq_offset".as_ptr()).cast::<isize>();
        let size = libc::dlsym(libc::RTLD_DEFAULT, c"__rseq_size".as_ptr()).cast::<u32>();
        if offset.is_null() || size.is_null() || *size == 0 {
            return Ok(None);
        }
        (*offset, *size)
    };
    let libc_of = |pid: i32| -> Option<String> {
        let maps = crate::sys::proc::maps(pid).ok()?;
        maps.into_iter()
            .map(|m| m.name)
            .find(|n| n.contains("/libc.so"))
    };
    if fs_base == 0 || libc_of(tid) != libc_of(std::process::id() as i32) {
        return Ok(None);
    }
    let area = (fs_base as i64 + offset as i64) as u64;
    let mut head = [0u8; 8];
    if read_mem(tid, area, &mut head).is_err() {
        return Ok(None);
    }
    let cpu_id = i32::from_ne_bytes([head[4], head[5], head[6], head[7]]);
    Ok((cpu_id >= 0).then_some(RseqArea {
        pointer: area,
        size: size.max(32),
        signature: RSEQ_SIG,
    }))
}

/// Reads `len` bytes at `addr` of `pid` through `/proc/PID/mem`, which a tracer
/// may read even where the mapping is not readable (PROT_NONE).
pub fn read_mem(pid: i32, addr: u64, buf: &mut [u8]) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let path = format!("/proc/{pid}/mem");
    let f = std::fs::File::open(&path).map_err(|e| mem_error(pid, &path, addr, e))?;
    f.read_exact_at(buf, addr)
        .map_err(|e| mem_error(pid, &path, addr, e))
}

/// Writes `data` at `addr` of `pid` through `/proc/PID/mem` (works on read-only
/// mappings for a tracer).
pub fn write_mem(pid: i32, addr: u64, data: &[u8]) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let path = format!("/proc/{pid}/mem");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .map_err(|e| mem_error(pid, &path, addr, e))?;
    f.write_all_at(data, addr)
        .map_err(|e| mem_error(pid, &path, addr, e))
}

/// A vanished process is an expected event, not an I/O error.
pub(crate) fn mem_error(pid: i32, path: &str, addr: u64, e: std::io::Error) -> Error {
    let gone = e.raw_os_error() == Some(libc::ESRCH)
        || (e.kind() == std::io::ErrorKind::NotFound && crate::sys::proc::is_gone(pid));
    if gone {
        Error::Gone {
            pid,
            during: "dump",
        }
    } else {
        Error::io(format!("{path} at {addr:#x}"), e)
    }
}
