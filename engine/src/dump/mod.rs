//! `crest dump`: a short list of steps.
//!
//! 1. **freeze** ([`freeze`]): run the libcrest callbacks, then seize every
//!    thread of every process in scope until nothing new appears (with
//!    `--pre-copy`, rounds of memory copied while they run come first);
//! 2. **collect** ([`collect`]): each process's descriptors, threads, state
//!    and memory, then what they share;
//! 3. **write**: the image's records, into a staging directory renamed into
//!    place when complete;
//! 4. **release**: kill the processes, let them run, or leave them stopped.
//!
//! The dump's state lives in a [`DumpContext`], never in statics; dropped
//! before the dump is complete it undoes everything: a failed dump leaves
//! every process exactly as it was.

mod collect;
mod freeze;

use std::path::PathBuf;
use std::time::Instant;

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag};

use crate::error::{Error, Result};
use crate::fds::OpenFiles;
use crate::image::{Header, Staging};
use crate::model::{Checkpoint, DumpStats, Inventory, ProcessImage};
use crate::net::{netlock, tcp, DumpSockets};
use crate::sys::proc::{self, is_zombie, stat_field, stat_fields};
use crate::tree;
use collect::{ProcLocks, SharedOptions};
use freeze::FrozenSet;

pub use crate::mm::precopy::{PreCopy, PreCopyOptions, Tracker};
pub use crate::tree::Scope;

/// What happens to the target after a successful dump.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AfterDump {
    /// Kill it (the default, like CRIU): the image is now the process.
    #[default]
    Kill,
    /// Let it continue as if nothing happened.
    LeaveRunning,
    /// Leave it stopped with SIGSTOP.
    Stop,
}

#[derive(Debug, Clone)]
pub struct DumpOptions {
    /// The root of the tree, or the session ID (the leader's PID).
    pub pid: i32,
    pub dir: PathBuf,
    pub after: AfterDump,
    pub scope: Scope,
    /// Carry established TCP connections whose peer is outside the dump (as
    /// CRIU's `--tcp-established`); without it they are refused.
    pub tcp_established: bool,
    /// How long libcrest processes may take in their checkpoint callbacks.
    pub callback_timeout: std::time::Duration,
    /// Save the contents of open regular files whose path matches this glob
    /// (`--save-files[=GLOB]`).
    pub save_files: Option<String>,
    /// Record open files' contents hash instead of only their identity
    /// (`--verify-files=hash`).
    pub verify_files_hash: bool,
    /// Files to make part of the image even if no process has them open
    /// (`--include-file`); restore puts them back.
    pub include_files: Vec<PathBuf>,
    /// Copy memory while the processes run first, and freeze them only to
    /// copy what they wrote since (`--pre-copy`).
    pub pre_copy: Option<PreCopyOptions>,
}

/// One dump's state, passed down instead of kept in statics: what it froze,
/// the network lock it holds, the sockets it put in repair mode, the
/// pre-copy's trackers, the libcrest handshake and the staging directory.
/// Dropped before the dump is complete, it undoes all of it, in this order:
/// the network lock first (so the window probe a socket sends when it
/// leaves repair mode reaches its peer), then repair mode (so no program
/// runs with a socket still in it), then every process; then (the fields'
/// order) the handshake tells the libcrest processes the dump failed, the
/// userfaultfds are closed without holding anything frozen, and the staging
/// directory is removed.
struct DumpContext {
    frozen: FrozenSet,
    net_lock: netlock::Session,
    repaired: tcp::Repaired,
    callbacks: crate::api::Handshake,
    pre_copy: Option<PreCopy>,
    /// The open files of the dump, as its processes are collected.
    files: OpenFiles,
    staging: Staging,
    stats: DumpStats,
}

impl DumpContext {
    fn new(dir: &std::path::Path) -> Result<DumpContext> {
        Ok(DumpContext {
            frozen: FrozenSet::default(),
            net_lock: Default::default(),
            repaired: Default::default(),
            callbacks: Default::default(),
            pre_copy: None,
            files: OpenFiles::default(),
            staging: Staging::new(dir)?,
            stats: DumpStats::default(),
        })
    }

    /// Lets every process go (with `sig`), its connections unlocked and out
    /// of repair mode.
    fn release(&mut self, sig: Option<Signal>) -> Result<()> {
        self.net_lock.release();
        self.repaired.leave_repair_all();
        self.frozen.release_all(sig)
    }
}

impl Drop for DumpContext {
    fn drop(&mut self) {
        if !self.frozen.released {
            if let Err(e) = self.release(None) {
                tracing::error!("could not resume every task after a failed dump: {e}");
            }
        }
    }
}

/// Dumps the tree rooted at `opts.pid` into `opts.dir`.
pub fn dump(opts: &DumpOptions, progress: &indicatif::ProgressBar) -> Result<DumpStats> {
    dump_tree(opts, progress).map_err(|e| match e {
        // Whatever failed, if the root died meanwhile that is the real reason.
        Error::Gone { .. } | Error::NoSuchProcess { .. } => e,
        _ if proc::is_gone(opts.pid) => Error::Gone {
            pid: opts.pid,
            during: "dump",
        },
        e => e,
    })
}

fn dump_tree(opts: &DumpOptions, progress: &indicatif::ProgressBar) -> Result<DumpStats> {
    // Where a dump's time goes, for `crest -vv dump`.
    let t0 = Instant::now();
    let phase = |done: &str| tracing::debug!(ms = t0.elapsed().as_millis() as u64, "dump: {done}");
    let root = check_root(opts)?;

    // 1. Freeze.
    let in_scope = tree::in_scope(opts.scope, opts.pid)?;
    let mut cx = DumpContext::new(&opts.dir)?;
    if let Some(o) = &opts.pre_copy {
        let (pc, stats) = PreCopy::run(&in_scope, cx.staging.path(), o, progress)?;
        cx.pre_copy = Some(pc);
        cx.stats.pre_copy = Some(stats);
    }
    // Processes using libcrest run their callbacks now, before anything is
    // frozen; dropped on failure, the handshake tells them the dump failed
    // (after the processes are released).
    progress.set_message(format!("pid {root}: checkpoint callbacks"));
    cx.callbacks = crate::api::Handshake::run(&in_scope, opts.callback_timeout)?;
    let started = Instant::now();
    let mut zombie_pids = Vec::new();
    progress.set_message(format!("pid {root}: freezing"));
    phase("callbacks run, freezing");
    freeze::freeze(opts.pid, root, opts.scope, &mut cx.frozen, &mut zombie_pids)?;
    phase("frozen");

    // 2. Collect.
    let mut proc_locks = ProcLocks::start();
    let DumpContext {
        frozen,
        net_lock,
        repaired,
        callbacks,
        pre_copy,
        files,
        staging,
        stats,
    } = &mut cx;
    plan_network_lock(opts, root, frozen, net_lock)?;
    if let Some(p) = stats.pre_copy.as_mut() {
        p.rounds.push(crate::mm::precopy::PreCopyRound {
            frozen: true,
            ..Default::default()
        });
    }
    let dump_pids: Vec<i32> = frozen.procs.iter().map(|p| p.pid).collect();
    let mut images = Vec::new();
    for fp in &mut frozen.procs {
        let mut sockets = DumpSockets {
            pids: &dump_pids,
            lock: net_lock,
            repaired,
        };
        let mut image = collect::collect_process(
            fp,
            staging.path(),
            files,
            stats,
            progress,
            pre_copy.as_mut(),
            &mut proc_locks,
            &mut sockets,
        )
        .map_err(|e| collect::died_instead(fp.pid, e))?;
        image.api = callbacks.image_of(fp.pid);
        images.push(image);
    }
    phase("processes collected");
    let shared = collect::collect_shared(
        &mut images,
        files,
        &zombie_pids,
        staging.path(),
        &SharedOptions {
            root,
            tcp_established: opts.tcp_established,
            verify_files_hash: opts.verify_files_hash,
            save_files: opts.save_files.as_deref(),
            include_files: &opts.include_files,
        },
    )?;
    phase("shared resources collected");

    // 3. Write.
    stats.frozen_us = started.elapsed().as_micros() as u64;
    let inventory = Inventory {
        root_pid: root,
        pids: images.iter().map(|p| p.pid).collect(),
        zombies: shared.zombies,
        pipes: shared.pipes,
        lost_session_leaders: shared.lost_session_leaders,
        lost_group_leaders: shared.lost_group_leaders,
        sysv_shm: shared.sysv_shm,
        saved_files: shared.saved_files,
        net_lock: net_lock.current(),
        stats: stats.clone(),
    };
    Checkpoint::write(
        staging.path(),
        &Header::current(),
        &inventory,
        files,
        &images,
    )?;
    staging.commit()?;
    phase("image written");
    let stats = stats.clone();

    // 4. Release.
    match opts.after {
        AfterDump::Kill => {
            callbacks.finish(None)?;
            kill_frozen(frozen);
            // Their connections closed in repair mode, without a FIN or RST;
            // those to peers outside stay locked until the restore.
            repaired.forget();
            net_lock.keep();
            phase("processes killed and gone");
        }
        // Written while still frozen: the callbacks' waits restart and see it.
        AfterDump::LeaveRunning => {
            callbacks.finish(Some(crate::api::CONTINUED))?;
            cx.release(None)?
        }
        AfterDump::Stop => {
            callbacks.finish(Some(crate::api::CONTINUED))?;
            cx.release(Some(Signal::SIGSTOP))?;
            wait_stopped(&images);
        }
    }
    tracing::info!(
        root,
        processes = images.len(),
        frozen_ms = stats.frozen_us / 1000,
        pages = stats.pages_written,
        "dumped"
    );
    Ok(stats)
}

/// The root of the dump (a group whose leader is gone is rooted at its
/// first member), refused when it cannot be dumped.
fn check_root(opts: &DumpOptions) -> Result<i32> {
    let root = match opts.scope {
        Scope::Pgid => *tree::in_scope(Scope::Pgid, opts.pid)?
            .first()
            .ok_or(Error::Refused {
                pid: opts.pid,
                reason: "is not a process group: no process has it as its group ID".into(),
            })?,
        _ => opts.pid,
    };
    if !PathBuf::from(format!("/proc/{root}")).exists() {
        return Err(Error::NoSuchProcess { pid: root });
    }
    if is_zombie(root) {
        return Err(Error::Refused {
            pid: root,
            reason: "is a zombie".into(),
        });
    }
    if opts.scope == Scope::Session
        && stat_fields(root).map(|f| stat_field(&f, 6)).unwrap_or(0) != root as i64
    {
        return Err(Error::Refused {
            pid: root,
            reason: "is not a session leader (--session takes the session ID)".into(),
        });
    }
    Ok(root)
}

/// Finds the connections to peers outside the dump before any socket is put
/// in repair mode: without --tcp-established they are refused here,
/// untouched (reading a queue in repair mode can fail and reset the peer);
/// with it they are planned, and locked as they are collected.
fn plan_network_lock(
    opts: &DumpOptions,
    root: i32,
    frozen: &FrozenSet,
    lock: &mut netlock::Session,
) -> Result<()> {
    let mut ends = Vec::new();
    let mut owner = Vec::new();
    for p in &frozen.procs {
        for (fd, l, r) in tcp::established_fds_of(p.pid)? {
            owner.push((p.pid, fd));
            ends.push((l, r));
        }
    }
    let outside = netlock::outside(&ends);
    if opts.tcp_established {
        lock.plan(outside);
    } else if let Some((local, peer)) = outside.first() {
        let (pid, fd) = ends
            .iter()
            .position(|e| e.0 == *local && e.1 == *peer)
            .map_or((root, -1), |i| owner[i]);
        return Err(Error::unsupported(
            pid,
            format!(
                "fd {fd} is a TCP connection {} → {} to a peer outside the dump \
                 (--tcp-established carries it)",
                crate::net::inet::addr_text(local),
                crate::net::inet::addr_text(peer)
            ),
        ));
    }
    Ok(())
}

/// Kills every frozen process and waits until it is gone (its memory freed
/// beside its own exit).
fn kill_frozen(frozen: &mut FrozenSet) {
    frozen.released = true;
    // Opened before the kill, so each names the process it was opened for.
    let pidfds: Vec<_> = frozen
        .procs
        .iter()
        .filter_map(|p| Some((p.pid, proc::pidfd_open(p.pid).ok()?)))
        .collect();
    for p in &frozen.procs {
        let _ = kill(nix::unistd::Pid::from_raw(p.pid), Signal::SIGKILL);
    }
    // Freeing a big process's memory takes the kernel about 0.1 s per
    // GiB; crest frees what it can beside the process's own exit.
    for (pid, pidfd) in &pidfds {
        if let Err(e) = proc::release_memory(pidfd) {
            tracing::debug!(pid, "process_mrelease: {e}");
        }
    }
    // As their tracer we see their deaths first; after this their parents can reap them.
    // Other threads first: a thread-group leader is reported only after them.
    for p in &frozen.procs {
        for t in p.threads.iter().rev() {
            let _ = waitpid(t.tracee.nix_pid(), Some(WaitPidFlag::__WALL));
        }
    }
}

/// Returns once the processes released with SIGSTOP are stopped (the
/// signal acts after detach), or after 2 s.
fn wait_stopped(images: &[ProcessImage]) {
    let until = Instant::now() + std::time::Duration::from_secs(2);
    for p in images {
        while stat_fields(p.pid).is_ok_and(|f| f.first().is_some_and(|s| s != "T"))
            && Instant::now() < until
        {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}
