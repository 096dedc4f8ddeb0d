//! ptrace: seizing a task, its register sets, and running system calls inside it.
//!
//! A remote system call points the stopped task's `rip` at a `syscall`
//! instruction that exists in its address space (one found in the vDSO when
//! dumping; a one-page trampoline when restoring), sets `rax` and the argument
//! registers, and steps it through the syscall-entry and syscall-exit stops
//! with `PTRACE_SYSCALL`. No code is injected and no signal is involved, so the
//! task's signal state is never touched.

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

    fn err(self, what: &str, e: Errno) -> Error {
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
                e => t.err("PTRACE_SEIZE", e),
            },
        )?;
        if let Err(e) = ptrace::interrupt(t.nix_pid()) {
            let _ = ptrace::detach(t.nix_pid(), None);
            return Err(t.err("PTRACE_INTERRUPT", e));
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
        ptrace::seize(t.nix_pid(), opts).map_err(|e| t.err("PTRACE_SEIZE", e))?;
        ptrace::interrupt(t.nix_pid()).map_err(|e| t.err("PTRACE_INTERRUPT", e))?;
        t.wait_stop()?;
        Ok(t)
    }

    /// Waits until the task is in a ptrace stop of any kind.
    pub fn wait_stop(self) -> Result<WaitStatus> {
        loop {
            let status = waitpid(self.nix_pid(), Some(WaitPidFlag::__WALL))
                .map_err(|e| self.err("waitpid", e))?;
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
                        .map_err(|e| self.err("PTRACE_CONT", e))?;
                    ptrace::interrupt(self.nix_pid())
                        .map_err(|e| self.err("PTRACE_INTERRUPT", e))?;
                }
                s => return Ok(s),
            }
        }
    }

    pub fn regs(self) -> Result<Regs> {
        ptrace::getregs(self.nix_pid()).map_err(|e| self.err("PTRACE_GETREGS", e))
    }

    pub fn set_regs(self, regs: &Regs) -> Result<()> {
        ptrace::setregs(self.nix_pid(), *regs).map_err(|e| self.err("PTRACE_SETREGS", e))
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
            return Err(self.err("PTRACE_GETREGSET NT_X86_XSTATE", Errno::last()));
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
            return Err(self.err("PTRACE_SETREGSET NT_X86_XSTATE", Errno::last()));
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
            return Err(self.err("PTRACE_SETREGSET NT_PRSTATUS", Errno::last()));
        }
        Ok(())
    }

    pub fn sigmask(self) -> Result<u64> {
        let mut mask = 0u64;
        // SAFETY: PTRACE_GETSIGMASK writes 8 bytes (the size we pass) into `mask`.
        let r = unsafe { libc::ptrace(libc::PTRACE_GETSIGMASK, self.pid, 8usize, &mut mask) };
        if r < 0 {
            return Err(self.err("PTRACE_GETSIGMASK", Errno::last()));
        }
        Ok(mask)
    }

    pub fn set_sigmask(self, mask: u64) -> Result<()> {
        let m = mask;
        // SAFETY: PTRACE_SETSIGMASK reads 8 bytes from `m`.
        let r = unsafe { libc::ptrace(libc::PTRACE_SETSIGMASK, self.pid, 8usize, &m) };
        if r < 0 {
            return Err(self.err("PTRACE_SETSIGMASK", Errno::last()));
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
                return Err(self.err("PTRACE_PEEKSIGINFO", Errno::last()));
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
                Err(self.err("PTRACE_GET_RSEQ_CONFIGURATION", e))
            };
        }
        Ok((conf.rseq_abi_pointer != 0).then_some(conf))
    }

    /// Whether a previous [`Tracee::rseq`] found the kernel unable to report rseq
    /// registrations (before 5.13), so `None` there means "unknown".
    pub fn rseq_unknown() -> bool {
        RSEQ_PTRACE_MISSING.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Runs one system call inside the task with the `syscall` instruction at
    /// `insn`, and returns its raw result (negative errno on failure). The
    /// task's registers are restored afterwards.
    pub fn remote_syscall(self, insn: u64, nr: i64, args: [u64; 6]) -> Result<i64> {
        let saved = self.regs()?;
        let result = self.syscall_with_regs(insn, nr, args, &saved);
        self.set_regs(&saved)?;
        result
    }

    /// Like [`Tracee::remote_syscall`] but leaves the task at the syscall-exit
    /// stop without restoring registers (for the last call of a restore).
    pub fn syscall_with_regs(self, insn: u64, nr: i64, args: [u64; 6], base: &Regs) -> Result<i64> {
        let mut regs = *base;
        regs.rip = insn;
        regs.rax = nr as u64;
        // -1: not inside a syscall, so the kernel does no restart fix-up on resume.
        regs.orig_rax = u64::MAX;
        regs.rdi = args[0];
        regs.rsi = args[1];
        regs.rdx = args[2];
        regs.r10 = args[3];
        regs.r8 = args[4];
        regs.r9 = args[5];
        self.set_regs(&regs)?;
        for phase in ["entry", "exit"] {
            loop {
                ptrace::syscall(self.nix_pid(), None).map_err(|e| self.err("PTRACE_SYSCALL", e))?;
                match waitpid(self.nix_pid(), Some(WaitPidFlag::__WALL))
                    .map_err(|e| self.err("waitpid", e))?
                {
                    WaitStatus::PtraceSyscall(_) => break,
                    // A job-control stop of a stopped process is reported once to a
                    // seizing tracer; resuming again runs our syscall.
                    WaitStatus::PtraceEvent(_, _, libc::PTRACE_EVENT_STOP) => continue,
                    WaitStatus::Exited(..) | WaitStatus::Signaled(..) => {
                        return Err(Error::Gone {
                            pid: self.pid,
                            during: "a remote system call",
                        })
                    }
                    other => {
                        return Err(Error::Refused {
                            pid: self.pid,
                            reason: format!(
                            "unexpected stop {other:?} at syscall {phase} of remote syscall {nr}"
                        ),
                        })
                    }
                }
            }
        }
        Ok(self.regs()?.rax as i64)
    }

    /// A remote syscall whose negative result becomes an error naming `what`.
    pub fn remote_ok(self, insn: u64, nr: i64, args: [u64; 6], what: &str) -> Result<u64> {
        let r = self.remote_syscall(insn, nr, args)?;
        if (-4095..0).contains(&r) {
            return Err(Error::sys(
                self.pid,
                format!("remote {what}"),
                Errno::from_raw(-r as i32),
            ));
        }
        Ok(r as u64)
    }

    /// Creates a thread in the task's process with a remote `clone3` whose
    /// arguments are at `args` (in the task's memory), and returns its TID once
    /// it is in its first stop (auto-attached through PTRACE_O_TRACECLONE).
    pub fn remote_clone_thread(self, insn: u64, args: u64, size: u64) -> Result<i32> {
        let saved = self.regs()?;
        let mut regs = saved;
        regs.rip = insn;
        regs.rax = libc::SYS_clone3 as u64;
        regs.orig_rax = u64::MAX;
        regs.rdi = args;
        regs.rsi = size;
        self.set_regs(&regs)?;
        let mut new_tid = None;
        let mut syscall_stops = 0;
        loop {
            ptrace::syscall(self.nix_pid(), None).map_err(|e| self.err("PTRACE_SYSCALL", e))?;
            match waitpid(self.nix_pid(), Some(WaitPidFlag::__WALL))
                .map_err(|e| self.err("waitpid", e))?
            {
                WaitStatus::PtraceSyscall(_) => {
                    syscall_stops += 1;
                    if syscall_stops == 2 {
                        break; // entry, then exit
                    }
                }
                WaitStatus::PtraceEvent(_, _, libc::PTRACE_EVENT_CLONE) => {
                    new_tid = Some(
                        ptrace::getevent(self.nix_pid())
                            .map_err(|e| self.err("PTRACE_GETEVENTMSG", e))?
                            as i32,
                    );
                }
                other => {
                    return Err(Error::Refused {
                        pid: self.pid,
                        reason: format!("unexpected stop {other:?} in a remote clone3"),
                    })
                }
            }
        }
        let r = self.regs()?.rax as i64;
        self.set_regs(&saved)?;
        if r < 0 {
            return Err(Error::sys(
                self.pid,
                "remote clone3 of a thread",
                Errno::from_raw(-r as i32),
            ));
        }
        let tid = new_tid.unwrap_or(r as i32);
        waitpid(Pid::from_raw(tid), Some(WaitPidFlag::__WALL))
            .map_err(|e| Error::sys(tid, "waitpid for a new thread", e))?;
        Ok(tid)
    }

    /// Lets the stopped task run on its own (PTRACE_CONT), with no signal.
    pub fn resume(self) -> Result<()> {
        ptrace::cont(self.nix_pid(), None).map_err(|e| self.err("PTRACE_CONT", e))
    }

    /// Stops a task that runs (PTRACE_INTERRUPT) and waits for the stop: ours,
    /// or a signal's that came first (left undelivered: the next resume does
    /// not pass it on, and our stop then follows).
    pub fn interrupt(self) -> Result<()> {
        ptrace::interrupt(self.nix_pid()).map_err(|e| self.err("PTRACE_INTERRUPT", e))?;
        match waitpid(self.nix_pid(), Some(WaitPidFlag::__WALL))
            .map_err(|e| self.err("waitpid", e))?
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
        match waitpid(self.nix_pid(), Some(flags)).map_err(|e| self.err("waitpid", e))? {
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
        ptrace::detach(self.nix_pid(), sig).map_err(|e| self.err("PTRACE_DETACH", e))
    }
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
        || (e.kind() == std::io::ErrorKind::NotFound && crate::proc::is_gone(pid));
    if gone {
        Error::Gone {
            pid,
            during: "dump",
        }
    } else {
        Error::io(format!("{path} at {addr:#x}"), e)
    }
}
