//! Forking the tree: the restorer first creates the open files processes
//! share (each at its slot, inherited by every child), then clones the root
//! with its original PID; each restore child forks its own children
//! ([`crate::tree`]), sets itself up ([`setup`]: descriptors, cwd, limits,
//! signal dispositions, pending signals, a trampoline where the image has
//! nothing), reports, and waits to be seized.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;

use crate::error::Error;
use crate::restore::error::RestoreError;

type Result<T, E = RestoreError> = std::result::Result<T, E>;
use crate::fds;
use crate::fds::restore::FilesError;
use crate::mm::sysvshm;
use crate::model::ProcessImage;
use crate::restore::context::RestoreContext;
use crate::restore::plan::TRAMPOLINE_LEN;
use crate::sys::proc;
use crate::sys::PAGE_SIZE;
use crate::task::signals::SignalSetupError;
use crate::tree::{self, CloneError, TreeError};

/// Kills a half-restored tree: the root we created (its descendants follow
/// through PR_SET_PDEATHSIG) and every process we already seized (whose
/// pdeathsig may already be the restored one). Never a process we did not create.
pub(super) struct TreeGuard {
    pub pids: Vec<i32>,
    pub armed: bool,
}

impl Drop for TreeGuard {
    fn drop(&mut self) {
        if self.armed {
            for &pid in &self.pids {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            for &pid in &self.pids {
                let _ = waitpid(
                    Pid::from_raw(pid),
                    Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG),
                );
            }
        }
    }
}

/// The tree as forked: what the restorer holds until the processes resume.
/// The fields drop in order: the processes first (if still armed), then the
/// SysV segments created for them, then the restorer's copies of the open
/// files they share.
pub(super) struct Forked {
    pub guard: TreeGuard,
    pub sysv: sysvshm::Created,
    pub slot_fds: Vec<OwnedFd>,
}

/// Creates the shared open files and the whole tree; returns once every
/// restore child reported it is set up.
pub(super) fn fork(cx: &RestoreContext, new_pidns: bool) -> Result<Forked> {
    let image = cx.image;
    let plans = &cx.plan;
    let mut report = [0i32; 2];
    // SAFETY: pipe2 writes two fds into the array.
    if unsafe { libc::pipe2(report.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(Error::sys(0, "pipe2", nix::errno::Errno::last()).into());
    }
    // SAFETY: both fds are fresh and owned by us from here on.
    let (rd, wr) = unsafe {
        (
            OwnedFd::from_raw_fd(report[0]),
            OwnedFd::from_raw_fd(report[1]),
        )
    };
    let deadline = Instant::now() + cx.opts.pid_wait;
    let port_deadline = Instant::now() + cx.opts.port_wait;
    if !new_pidns {
        // The processes a dump just killed may still be exiting, holding their
        // ports and files; recreating sockets before they are gone fails
        // (EADDRINUSE). Wait for them as clone3 would for their PIDs.
        for p in &image.processes {
            while Instant::now() < deadline && still_exiting(p) {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    // Open files shared between processes once, here: every restore child
    // inherits them, so they keep sharing one open file description.
    let slot_fds = fds::restore::restore_in_restorer(
        &image.files,
        &plans.slots,
        &image.inventory.pipes,
        &image.dir,
        port_deadline,
    )?;
    let sysv = sysvshm::prepare(&image.dir, &image.inventory.sysv_shm)?;
    let mut forked = Forked {
        guard: TreeGuard {
            pids: Vec::new(),
            armed: true,
        },
        sysv,
        slot_fds,
    };
    let setup = |idx: usize| setup(cx, idx).map_err(Into::into);
    let root = tree::fork(&plans.tree, wr.as_raw_fd(), deadline, &setup).map_err(|e| match e {
        CloneError::Taken(pid) => tree::pid_taken(pid),
        CloneError::Other(e) => e,
    })?;
    debug_assert_eq!(root, plans.tree[0].pid);
    forked.guard.pids.push(root);
    if new_pidns {
        // We are the namespace's init: PIDs we pass to ptrace and friends are
        // the namespace's, so /proc must be too. Mounted in a mount namespace
        // of our own, after the tree was forked (it keeps the original one).
        mount_own_proc()?;
    }
    drop(wr);
    // Each process reports "ok PID" or "err PID reason", then closes its end.
    let mut text = String::new();
    use std::io::Read;
    let _ = File::from(rd).read_to_string(&mut text);
    // Every process that reported is ours to kill should anything fail now.
    for line in text.lines() {
        if let Some(pid) = line.strip_prefix("ok ").and_then(|p| p.parse().ok()) {
            if !forked.guard.pids.contains(&pid) {
                forked.guard.pids.push(pid);
            }
        }
    }
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("err ") {
            let (pid, msg) = rest.split_once(' ').unwrap_or((rest, ""));
            if let Some(pid) = msg.strip_prefix("taken ").and_then(|p| p.parse().ok()) {
                return Err(tree::pid_taken(pid).into());
            }
            return Err(TreeError::Child {
                pid: pid.to_string(),
                report: msg.to_string(),
            }
            .into());
        }
    }
    for p in &plans.tree {
        if !text.lines().any(|l| l == format!("ok {}", p.pid)) {
            return Err(TreeError::Died { pid: p.pid }.into());
        }
    }
    Ok(forked)
}

/// Whether the image's process still runs under its PID with its name (the
/// original, killed by the dump, not yet past exit): a zombie holds nothing.
fn still_exiting(p: &ProcessImage) -> bool {
    !proc::is_gone(p.pid) && proc::read(p.pid, "comm").is_ok_and(|c| c.trim_end() == p.state.comm)
}

/// Mounts a procfs of our PID namespace on /proc, in a private mount
/// namespace of our own.
fn mount_own_proc() -> Result<()> {
    use nix::mount::{mount, MsFlags};
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(|e| Error::sys(0, "unshare(CLONE_NEWNS) for the namespace's /proc", e))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| Error::sys(0, "making / private for the namespace's /proc", e))?;
    mount(
        Some("proc"),
        "/proc",
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| Error::sys(0, "mounting /proc for the namespace", e).into())
}

/// Why a restore child could not set itself up (reported to the restorer).
#[derive(Debug, thiserror::Error)]
enum SetupError {
    #[error("{what}: {source}")]
    Sys {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Files(#[from] FilesError),
    #[error(transparent)]
    Signals(#[from] SignalSetupError),
}

impl SetupError {
    fn last(what: String) -> SetupError {
        SetupError::Sys {
            what,
            source: std::io::Error::last_os_error(),
        }
    }
}

/// What restore child `idx` sets up on itself: descriptors, the descriptors
/// its mappings need, cwd, limits, signal dispositions and pending signals,
/// and the trampoline the restorer drives it through.
fn setup(cx: &RestoreContext, idx: usize) -> Result<(), SetupError> {
    let p = &cx.image.processes[idx];
    let tree = &cx.plan.tree[idx];
    let plan = &cx.plan.children[idx];
    let slots = &cx.plan.slots;
    // Close everything crest had open except stdio (which may be rebound),
    // the report pipe and the slots.
    let open: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map_err(|source| SetupError::Sys {
            what: "/proc/self/fd".into(),
            source,
        })?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    let slot_fds: Vec<i32> = slots.all().collect();
    for fd in open {
        if fd > 2 && fd != tree.err_fd && !slot_fds.contains(&fd) {
            // SAFETY: closing a descriptor crest's restorer had; the child
            // owns its copy.
            unsafe { libc::close(fd) };
        }
    }
    fds::restore::restore_in_child(&p.files, &cx.image.files, slots)?;
    // SAFETY: plain syscalls on our own process with arguments we own; this
    // is the freshly cloned child, single-threaded.
    unsafe {
        for (path, at, writable) in plan.map_files.iter().chain(std::iter::once(&plan.exe)) {
            let mode = if *writable {
                libc::O_RDWR
            } else {
                libc::O_RDONLY
            };
            let fd = libc::open(path.as_ptr(), mode | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(SetupError::last(format!("open {}", path.to_string_lossy())));
            }
            if fd != *at {
                libc::dup3(fd, *at, libc::O_CLOEXEC);
                libc::close(fd);
            }
        }
        // Shared objects not kept (mapped shared memory was reopened above).
        for fd in slot_fds {
            libc::close(fd);
        }
        if libc::chdir(plan.cwd.as_ptr()) < 0 {
            return Err(SetupError::last(format!(
                "cwd {}",
                plan.cwd.to_string_lossy()
            )));
        }
    }
    crate::task::restore_in_child(&p.state, &p.threads[0], &plan.comm)?;
    // SAFETY: a fixed mapping where the image has nothing (checked by the
    // plan, and NOREPLACE), written and protected by us.
    unsafe {
        let t = libc::mmap(
            plan.trampoline as *mut libc::c_void,
            TRAMPOLINE_LEN as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        );
        if t != plan.trampoline as *mut libc::c_void {
            return Err(SetupError::last(format!(
                "mapping the trampoline at {:#x}",
                plan.trampoline
            )));
        }
        // syscall; int3 (never reached: the restorer stops at syscall exit).
        std::ptr::copy_nonoverlapping([0x0f_u8, 0x05, 0xcc].as_ptr(), t.cast::<u8>(), 3);
        libc::mprotect(t, PAGE_SIZE as usize, libc::PROT_READ | libc::PROT_EXEC);
    }
    Ok(())
}
