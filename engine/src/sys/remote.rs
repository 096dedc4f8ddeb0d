//! Remote system calls: a stopped task runs one system call of crest's
//! choosing and stops again, its registers put back afterwards.
//!
//! A [`RemoteCall`] is everything such a call needs: the traced task, the
//! address of a `syscall` instruction in its address space (one found in the
//! vDSO when dumping, [`find_syscall_insn`]; the restore trampoline when
//! restoring) and a scratch page of the target's for arguments and results.
//! It points the task's `rip` at the instruction, sets `rax` and the argument
//! registers, and steps it through the syscall-entry and syscall-exit stops
//! with `PTRACE_SYSCALL`. No code is injected and no signal is involved, so
//! the task's signal state is never touched.

use nix::errno::Errno;
use nix::sys::ptrace;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::error::{Error, Result};
use crate::sys::proc::MapsEntry;
use crate::sys::ptrace::{read_mem, write_mem, Regs, Tracee};

/// One thread of a stopped target, ready to run system calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteCall {
    pub tracee: Tracee,
    /// A `syscall` instruction in the target.
    pub insn: u64,
    /// A page of the target's that calls write their results to and read
    /// their arguments from (0 while there is none).
    pub scratch: u64,
}

impl RemoteCall {
    pub fn new(tracee: Tracee, insn: u64, scratch: u64) -> RemoteCall {
        RemoteCall {
            tracee,
            insn,
            scratch,
        }
    }

    pub fn pid(&self) -> i32 {
        self.tracee.pid
    }

    /// The same instruction and scratch page, from another thread of the process.
    pub fn on(&self, tracee: Tracee) -> RemoteCall {
        RemoteCall { tracee, ..*self }
    }

    /// Runs system call `nr` and returns its raw result (negative errno on
    /// failure). The task's registers are restored afterwards.
    pub fn raw(&self, nr: i64, args: [u64; 6]) -> Result<i64> {
        let saved = self.tracee.regs()?;
        let result = self.leaving_regs(nr, args, &saved);
        self.tracee.set_regs(&saved)?;
        result
    }

    /// A remote system call whose negative result becomes an error naming `what`.
    pub fn call(&self, nr: i64, args: [u64; 6], what: &str) -> Result<u64> {
        let r = self.raw(nr, args)?;
        if (-4095..0).contains(&r) {
            return Err(Error::sys(
                self.tracee.pid,
                format!("remote {what}"),
                Errno::from_raw(-r as i32),
            ));
        }
        Ok(r as u64)
    }

    /// Like [`RemoteCall::raw`], from registers `base`, but leaves the task
    /// at the syscall-exit stop without restoring registers (for the last
    /// call of a restore, and for stopping crest's code in a target).
    pub fn leaving_regs(&self, nr: i64, args: [u64; 6], base: &Regs) -> Result<i64> {
        let t = self.tracee;
        let mut regs = *base;
        regs.rip = self.insn;
        regs.rax = nr as u64;
        // -1: not inside a syscall, so the kernel does no restart fix-up on resume.
        regs.orig_rax = u64::MAX;
        regs.rdi = args[0];
        regs.rsi = args[1];
        regs.rdx = args[2];
        regs.r10 = args[3];
        regs.r8 = args[4];
        regs.r9 = args[5];
        t.set_regs(&regs)?;
        for phase in ["entry", "exit"] {
            loop {
                ptrace::syscall(t.nix_pid(), None).map_err(|e| t.fail("PTRACE_SYSCALL", e))?;
                match waitpid(t.nix_pid(), Some(WaitPidFlag::__WALL))
                    .map_err(|e| t.fail("waitpid", e))?
                {
                    WaitStatus::PtraceSyscall(_) => break,
                    // A job-control stop of a stopped process is reported once to a
                    // seizing tracer; resuming again runs our syscall.
                    WaitStatus::PtraceEvent(_, _, libc::PTRACE_EVENT_STOP) => continue,
                    WaitStatus::Exited(..) | WaitStatus::Signaled(..) => {
                        return Err(Error::Gone {
                            pid: t.pid,
                            during: "a remote system call",
                        })
                    }
                    other => {
                        return Err(Error::Refused {
                            pid: t.pid,
                            reason: format!(
                            "unexpected stop {other:?} at syscall {phase} of remote syscall {nr}"
                        ),
                        })
                    }
                }
            }
        }
        Ok(t.regs()?.rax as i64)
    }

    /// Creates a thread in the task's process with a remote `clone3` whose
    /// arguments are at `args` (in the task's memory), and returns its TID once
    /// it is in its first stop (auto-attached through PTRACE_O_TRACECLONE).
    pub fn clone_thread(&self, args: u64, size: u64) -> Result<i32> {
        let t = self.tracee;
        let saved = t.regs()?;
        let mut regs = saved;
        regs.rip = self.insn;
        regs.rax = libc::SYS_clone3 as u64;
        regs.orig_rax = u64::MAX;
        regs.rdi = args;
        regs.rsi = size;
        t.set_regs(&regs)?;
        let mut new_tid = None;
        let mut syscall_stops = 0;
        loop {
            ptrace::syscall(t.nix_pid(), None).map_err(|e| t.fail("PTRACE_SYSCALL", e))?;
            match waitpid(t.nix_pid(), Some(WaitPidFlag::__WALL))
                .map_err(|e| t.fail("waitpid", e))?
            {
                WaitStatus::PtraceSyscall(_) => {
                    syscall_stops += 1;
                    if syscall_stops == 2 {
                        break; // entry, then exit
                    }
                }
                WaitStatus::PtraceEvent(_, _, libc::PTRACE_EVENT_CLONE) => {
                    new_tid = Some(
                        ptrace::getevent(t.nix_pid())
                            .map_err(|e| t.fail("PTRACE_GETEVENTMSG", e))?
                            as i32,
                    );
                }
                other => {
                    return Err(Error::Refused {
                        pid: t.pid,
                        reason: format!("unexpected stop {other:?} in a remote clone3"),
                    })
                }
            }
        }
        let r = t.regs()?.rax as i64;
        t.set_regs(&saved)?;
        if r < 0 {
            return Err(Error::sys(
                t.pid,
                "remote clone3 of a thread",
                Errno::from_raw(-r as i32),
            ));
        }
        let tid = new_tid.unwrap_or(r as i32);
        waitpid(Pid::from_raw(tid), Some(WaitPidFlag::__WALL))
            .map_err(|e| Error::sys(tid, "waitpid for a new thread", e))?;
        Ok(tid)
    }

    /// The first `len` bytes of the scratch page.
    pub fn read_scratch(&self, len: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        read_mem(self.tracee.pid, self.scratch, &mut buf)?;
        Ok(buf)
    }

    /// Writes `data` at `offset` in the scratch page; returns its address.
    pub fn write_scratch(&self, offset: u64, data: &[u8]) -> Result<u64> {
        let at = self.scratch + offset;
        write_mem(self.tracee.pid, at, data)?;
        Ok(at)
    }
}

/// Finds a `syscall` instruction (0f 05) in the target's vDSO.
pub fn find_syscall_insn(pid: i32, maps: &[MapsEntry]) -> Result<u64> {
    let vdso = maps
        .iter()
        .find(|m| m.name == "[vdso]")
        .ok_or_else(|| Error::Refused {
            pid,
            reason: "has no vDSO, so crest cannot run system calls in it".into(),
        })?;
    let mut code = vec![0u8; vdso.len() as usize];
    read_mem(pid, vdso.start, &mut code)?;
    code.windows(2)
        .position(|w| w == [0x0f, 0x05])
        .map(|i| vdso.start + i as u64)
        .ok_or_else(|| Error::Refused {
            pid,
            reason: "no syscall instruction found in its vDSO".into(),
        })
}
