//! Freezing: every thread of every process in scope seized, re-scanned
//! until nothing new appears; and releasing them, exactly as they were.
//!
//! From the freeze on, every exit path goes through [`FrozenSet`], whose
//! `Drop` puts registers back, unmaps crest's scratch pages and detaches: a
//! failed dump leaves every process exactly as it was.

use std::collections::BTreeSet;
use std::time::Instant;

use nix::sys::signal::Signal;

use crate::error::{Error, Result};
use crate::sys::proc::{
    self, is_zombie, stat_field, stat_fields, threads_of, PF_EXITING, PF_KTHREAD,
};
use crate::sys::ptrace::{resume_interrupted_syscall, Regs, Tracee};
use crate::sys::remote::RemoteCall;
use crate::sys::PAGE_SIZE;
use crate::tree::{self, Scope};

/// One seized thread, its registers and signal mask at the freeze. While
/// frozen it has every signal blocked, so a signal arriving meanwhile (a child
/// exiting…) stays pending instead of interrupting our remote calls.
pub(super) struct FrozenThread {
    pub tracee: Tracee,
    pub regs: Regs,
    pub sigmask: u64,
}

/// One process of the frozen set.
pub(super) struct FrozenProcess {
    pub pid: i32,
    /// Main thread first.
    pub threads: Vec<FrozenThread>,
    /// It was in a job-control stop before we seized it.
    pub was_stopped: bool,
    /// The syscall instruction crest's remote calls use, once found.
    pub insn: Option<u64>,
    /// crest's scratch page in it, while mapped.
    pub scratch: Option<u64>,
}

impl FrozenProcess {
    pub fn main(&self) -> Tracee {
        self.threads[0].tracee
    }

    /// Undoes our changes and detaches every thread.
    fn release(&mut self, sig: Option<Signal>) -> Result<()> {
        if let (Some(insn), Some(scratch)) = (self.insn, self.scratch.take()) {
            RemoteCall::new(self.main(), insn, 0).call(
                libc::SYS_munmap,
                [scratch, PAGE_SIZE, 0, 0, 0, 0],
                "munmap of crest's scratch page",
            )?;
        }
        let mut first_err = None;
        for t in &self.threads {
            let mut regs = t.regs;
            if self.insn.is_some() {
                // Remote calls leave a thread at a syscall-exit stop, where the kernel
                // no longer restarts the call it was interrupted in: do it here.
                resume_interrupted_syscall(&mut regs, true);
            }
            let sig = if self.was_stopped {
                Some(Signal::SIGSTOP)
            } else {
                sig
            };
            let r = t
                .tracee
                .set_regs(&regs)
                .and_then(|()| t.tracee.set_sigmask(t.sigmask))
                .and_then(|()| t.tracee.detach(sig));
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

/// Everything seized. Dropping it releases every task not yet released.
#[derive(Default)]
pub(super) struct FrozenSet {
    pub procs: Vec<FrozenProcess>,
    pub released: bool,
}

impl FrozenSet {
    pub fn release_all(&mut self, sig: Option<Signal>) -> Result<()> {
        self.released = true;
        let mut first_err = None;
        for p in &mut self.procs {
            match p.release(sig) {
                Ok(()) | Err(Error::Gone { .. }) => {}
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn tids(&self) -> BTreeSet<i32> {
        self.procs
            .iter()
            .flat_map(|p| p.threads.iter().map(|t| t.tracee.pid))
            .collect()
    }
}

impl Drop for FrozenSet {
    fn drop(&mut self) {
        if !self.released {
            if let Err(e) = self.release_all(None) {
                tracing::error!("could not resume every task after a failed dump: {e}");
            }
        }
    }
}

/// Refuses targets crest must not or cannot touch.
fn precheck(pid: i32, status: &str, ours: &BTreeSet<i32>) -> Result<()> {
    if let Some(tracer) = proc::status_field(status, "TracerPid").filter(|t| *t != "0") {
        let tracer: i32 = tracer.parse().unwrap_or(-1);
        if !ours.contains(&tracer) && tracer != nix::unistd::gettid().as_raw() {
            return Err(Error::Refused {
                pid,
                reason: format!(
                    "is traced by pid {tracer}; crest will not take over another tracer's process"
                ),
            });
        }
    }
    if pid == std::process::id() as i32 {
        return Err(Error::Refused {
            pid,
            reason: "is crest itself".into(),
        });
    }
    Ok(())
}

/// Seizes every thread of every process in scope (`id`: the tree's root, the
/// session or the group) until nothing new appears.
pub(super) fn freeze(
    id: i32,
    root: i32,
    scope: Scope,
    set: &mut FrozenSet,
    zombies: &mut Vec<i32>,
) -> Result<()> {
    loop {
        let mut new = false;
        let pids = tree::in_scope(scope, id)?;
        for pid in pids {
            if zombies.contains(&pid) {
                continue;
            }
            match freeze_process(pid, set, zombies) {
                Ok(seized) => new |= seized,
                // A process other than the root that exits while we freeze is no
                // longer part of the tree (or is now a zombie in it).
                Err(_) if pid != root && proc::is_gone(pid) => {
                    if let Some(i) = set
                        .procs
                        .iter()
                        .position(|p| p.pid == pid && p.threads.is_empty())
                    {
                        set.procs.remove(i);
                    }
                    if is_zombie(pid) && !set.procs.iter().any(|p| p.pid == pid) {
                        zombies.push(pid);
                    }
                    new = true;
                }
                Err(e) => return Err(e),
            }
        }
        if !new {
            return Ok(());
        }
    }
}

/// How long a process on its way out may take to become a zombie.
const EXIT_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Seizes every thread of `pid` not seized yet; returns whether it seized any.
fn freeze_process(pid: i32, set: &mut FrozenSet, zombies: &mut Vec<i32>) -> Result<bool> {
    let flags = stat_fields(pid).map(|f| stat_field(&f, 9))?;
    if flags & PF_KTHREAD != 0 {
        return Err(Error::Refused {
            pid,
            reason: "is a kernel thread".into(),
        });
    }
    if flags & PF_EXITING != 0 && !is_zombie(pid) {
        // On its way out (a shell's `sleep` finishing as the dump starts):
        // its memory may already be gone, and it cannot be stopped. In a
        // moment it is a zombie, which the dump records as such.
        let until = Instant::now() + EXIT_WAIT;
        // is_gone: a zombie, or reaped already.
        while !proc::is_gone(pid) {
            if Instant::now() > until {
                return Err(Error::Refused {
                    pid,
                    reason: format!("is exiting and did not finish within {EXIT_WAIT:?}"),
                });
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        if proc::is_gone(pid) && !is_zombie(pid) {
            return Err(Error::Gone {
                pid,
                during: "dump",
            });
        }
    }
    if is_zombie(pid) {
        if threads_of(pid).len() > 1 {
            return Err(Error::unsupported(
                pid,
                "its main thread exited while other threads run",
            ));
        }
        zombies.push(pid);
        return Ok(true);
    }
    let status = proc::read(pid, "status")?;
    let ours = set.tids();
    precheck(pid, &status, &ours)?;
    let was_stopped = proc::status_field(&status, "State").is_some_and(|s| s.starts_with('T'));
    let idx = match set.procs.iter().position(|p| p.pid == pid) {
        Some(i) => i,
        None => {
            set.procs.push(FrozenProcess {
                pid,
                threads: Vec::new(),
                was_stopped,
                insn: None,
                scratch: None,
            });
            set.procs.len() - 1
        }
    };
    let mut seized = false;
    for tid in threads_of(pid) {
        if ours.contains(&tid) {
            continue;
        }
        match Tracee::seize(tid) {
            Ok(tracee) => {
                let regs = tracee.regs()?;
                let sigmask = tracee.sigmask()?;
                let frozen = FrozenThread {
                    tracee,
                    regs,
                    sigmask,
                };
                let p = &mut set.procs[idx];
                if tid == pid {
                    p.threads.insert(0, frozen);
                } else {
                    p.threads.push(frozen);
                }
                tracee.set_sigmask(!0)?;
                seized = true;
            }
            // A thread that exited meanwhile is no longer part of the process.
            Err(Error::Gone { .. }) if tid != pid => {}
            Err(e) => return Err(e),
        }
    }
    Ok(seized)
}
