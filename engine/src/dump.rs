//! `crest dump`: freeze a process tree, collect its state, write the image,
//! then kill it, let it run, or leave it stopped.
//!
//! Freezing seizes every thread of every process in scope and re-scans until
//! no new process or thread appears. From then on every exit path goes through
//! [`FrozenSet`], whose `Drop` puts registers back, unmaps our scratch pages
//! and detaches: a failed dump leaves every process exactly as it was.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Instant;

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag};

use crate::error::{Error, Result};
use crate::image::{
    DumpStats, Header, Inventory, LostGroup, MetaWriter, RecordKind, Staging, Zombie,
};
use crate::sys::proc;
use crate::sys::proc::{is_zombie, stat_field, stat_fields, threads_of, PF_EXITING, PF_KTHREAD};
use crate::sys::ptrace::{Regs, Tracee};
use crate::sys::remote::{find_syscall_insn, RemoteCall};
use crate::sys::PAGE_SIZE;
use crate::task::{self, Registers};
use crate::{files, mm, ProcessImage};

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

/// Which processes a dump takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The process and all its descendants.
    Tree,
    /// Every process of the session led by `pid` (BLCR's `--session`),
    /// including orphans reparented to init or a subreaper.
    Session,
    /// Every process of the process group `pid` (BLCR's `--pgid`), its
    /// leader (when alive) and its members' descendants in the group first.
    Pgid,
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
    pub pre_copy: Option<crate::precopy::PreCopyOptions>,
}

/// One seized thread, its registers and signal mask at the freeze. While
/// frozen it has every signal blocked, so a signal arriving meanwhile (a child
/// exiting…) stays pending instead of interrupting our remote calls.
struct FrozenThread {
    tracee: Tracee,
    regs: Regs,
    sigmask: u64,
}

/// One process of the frozen set.
struct FrozenProcess {
    pid: i32,
    /// Main thread first.
    threads: Vec<FrozenThread>,
    /// It was in a job-control stop before we seized it.
    was_stopped: bool,
    insn: Option<u64>,
    scratch: Option<u64>,
}

impl FrozenProcess {
    fn main(&self) -> Tracee {
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
            let mut regs = Registers::from(&t.regs);
            if self.insn.is_some() {
                // Remote calls leave a thread at a syscall-exit stop, where the kernel
                // no longer restarts the call it was interrupted in: do it here.
                task::resume_interrupted_syscall(&mut regs, true);
            }
            let sig = if self.was_stopped {
                Some(Signal::SIGSTOP)
            } else {
                sig
            };
            let r = t
                .tracee
                .set_regs(&regs.to_user_regs())
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
struct FrozenSet {
    procs: Vec<FrozenProcess>,
    released: bool,
}

impl FrozenSet {
    fn release_all(&mut self, sig: Option<Signal>) -> Result<()> {
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
    net_lock: crate::netlock::Session,
    repaired: crate::tcp::Repaired,
    callbacks: crate::api::Handshake,
    pre_copy: Option<crate::precopy::PreCopy>,
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

/// The processes of the tree rooted at `root`, parents before children.
fn tree(root: i32) -> Result<Vec<i32>> {
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let pid = out[i];
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
                .collect::<Vec<_>>()
        });
        for tid in tasks.unwrap_or_default() {
            let children = proc::read(pid, &format!("task/{tid}/children")).unwrap_or_default();
            out.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<i32>().ok()),
            );
        }
        i += 1;
    }
    Ok(out)
}

/// The processes of session (`field` 6) or process group (`field` 5) `id`:
/// the leader and its descendants first, then each process whose parent is
/// outside the session or group (orphans, a shell's pipeline) with its own.
fn members(field: usize, id: i32) -> Result<Vec<i32>> {
    let mut members: Vec<i32> = std::fs::read_dir("/proc")
        .map_err(|e| Error::io("/proc", e))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| stat_fields(pid).is_ok_and(|f| stat_field(&f, field) == id as i64))
        .collect();
    members.sort_unstable();
    let mut out: Vec<i32> = Vec::new();
    let ppid = |pid: i32| {
        stat_fields(pid)
            .map(|f| stat_field(&f, 4) as i32)
            .unwrap_or(0)
    };
    let roots = std::iter::once(id).chain(
        members
            .iter()
            .copied()
            .filter(|&p| p != id && !members.contains(&ppid(p))),
    );
    for root in roots.collect::<Vec<_>>() {
        if !members.contains(&root) {
            continue;
        }
        for pid in tree(root)? {
            if members.contains(&pid) && !out.contains(&pid) {
                out.push(pid);
            }
        }
    }
    Ok(out)
}

/// Seizes every thread of every process in scope (`id`: the tree's root, the
/// session or the group) until nothing new appears.
fn freeze(
    id: i32,
    root: i32,
    scope: Scope,
    set: &mut FrozenSet,
    zombies: &mut Vec<i32>,
) -> Result<()> {
    loop {
        let mut new = false;
        let pids = match scope {
            Scope::Tree => tree(id)?,
            Scope::Session => members(6, id)?,
            Scope::Pgid => members(5, id)?,
        };
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
    // A group whose leader is gone is rooted at its first member.
    let root = match opts.scope {
        Scope::Pgid => *members(5, opts.pid)?.first().ok_or(Error::Refused {
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
    // Processes using libcrest run their callbacks now, before anything is
    // frozen; dropped on failure, the handshake tells them the dump failed
    // (after `set` has released them).
    let in_scope = match opts.scope {
        Scope::Tree => tree(opts.pid)?,
        Scope::Session => members(6, opts.pid)?,
        Scope::Pgid => members(5, opts.pid)?,
    };
    let mut cx = DumpContext::new(&opts.dir)?;
    if let Some(o) = &opts.pre_copy {
        cx.pre_copy = Some(crate::precopy::PreCopy::run(
            &in_scope,
            cx.staging.path(),
            o,
            &mut cx.stats,
            progress,
        )?);
    }
    progress.set_message(format!("pid {root}: checkpoint callbacks"));
    cx.callbacks = crate::api::Handshake::run(&in_scope, opts.callback_timeout)?;
    let started = Instant::now();
    let mut zombie_pids = Vec::new();
    progress.set_message(format!("pid {root}: freezing"));
    phase("callbacks run, freezing");
    freeze(opts.pid, root, opts.scope, &mut cx.frozen, &mut zombie_pids)?;
    phase("frozen");
    let mut proc_locks = ProcLocks::start();
    let DumpContext {
        frozen: set,
        net_lock,
        repaired,
        callbacks,
        pre_copy,
        staging,
        stats,
    } = &mut cx;
    let dump_pids: Vec<i32> = set.procs.iter().map(|p| p.pid).collect();
    // Connections to peers outside the dump are found before any socket is
    // put in repair mode: without --tcp-established they are refused here,
    // untouched (reading a queue in repair mode can fail and reset the
    // peer); with it they are locked as they are collected.
    let mut ends = Vec::new();
    let mut owner = Vec::new();
    for p in &set.procs {
        for (fd, l, r) in crate::tcp::established_fds_of(p.pid)? {
            owner.push((p.pid, fd));
            ends.push((l, r));
        }
    }
    let outside = crate::netlock::outside(&ends);
    if opts.tcp_established {
        net_lock.plan(outside);
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
                crate::tcp::addr_text(local),
                crate::tcp::addr_text(peer)
            ),
        ));
    }

    if let Some(p) = stats.pre_copy.as_mut() {
        p.rounds.push(crate::image::PreCopyRound {
            frozen: true,
            ..Default::default()
        });
    }
    let mut images = Vec::new();
    for fp in &mut set.procs {
        let mut sockets = crate::sockets::DumpSockets {
            pids: &dump_pids,
            lock: net_lock,
            repaired,
        };
        let mut image = collect_process(
            fp,
            staging.path(),
            stats,
            progress,
            pre_copy.as_mut(),
            &mut proc_locks,
            &mut sockets,
        )
        .map_err(|e| died_instead(fp.pid, e))?;
        image.api = callbacks.image_of(fp.pid);
        images.push(image);
    }
    phase("processes collected");
    crate::tty::resolve(&mut images)?;
    let mut shared_files = Vec::new();
    let pipes = {
        let mut procs: Vec<(i32, &mut files::FilesImage)> =
            images.iter_mut().map(|p| (p.pid, &mut p.files)).collect();
        let pipes = crate::pipes::resolve(&mut procs)?;
        files::rebind_outside_stdio(&mut procs, opts.tcp_established);
        files::find_shared(&mut procs, &mut shared_files);
        pipes
    };
    save_shared_memory(&images, staging.path(), &mut shared_files)?;
    crate::memfd::collect(&mut images, staging.path(), &mut shared_files)?;
    let sysv_shm = crate::sysvshm::collect(&images, staging.path())?;
    if opts.verify_files_hash {
        files::record_hashes(
            images
                .iter_mut()
                .flat_map(|p| {
                    let pid = p.pid;
                    p.files.fds.iter_mut().map(move |f| (pid, &mut f.kind))
                })
                .chain(shared_files.iter_mut().map(|s| (root, &mut s.file))),
        )?;
    }
    let mut saved_files = match &opts.save_files {
        Some(glob) => crate::savefiles::save(&images, &shared_files, glob, staging.path())?,
        None => Vec::new(),
    };
    crate::savefiles::include(&opts.include_files, staging.path(), &mut saved_files)?;
    // The first process and fd holding shared file `id`, for messages.
    let holder = |id: u32| {
        images
            .iter()
            .find_map(|p| {
                p.files
                    .fds
                    .iter()
                    .find(|f| f.kind == files::FdKind::Shared { id })
                    .map(|f| (p.pid, f.fd))
            })
            .unwrap_or((root, -1))
    };
    for sf in &shared_files {
        match &sf.file {
            files::FdKind::UnixPair(end) => {
                let peer = shared_files.iter().find_map(|o| match &o.file {
                    files::FdKind::UnixPair(e) if e.inode == end.peer => Some(e),
                    _ => None,
                });
                if peer.is_some_and(|p| !p.name.is_empty() && !end.name.is_empty()) {
                    let (pid, fd) = holder(sf.id);
                    return Err(Error::unsupported(
                        pid,
                        format!(
                            "fd {fd} is a unix socket connected to {}, both ends bound to a name",
                            crate::sockets::unix_name_text(&end.name)
                        ),
                    ));
                }
                if peer.is_none() {
                    let (pid, fd) = holder(sf.id);
                    return Err(Error::unsupported(
                        pid,
                        format!("fd {fd} is a unix socket connected to a process outside the dump"),
                    ));
                }
            }
            files::FdKind::TcpConn(c) if !opts.tcp_established => {
                let peer_here = shared_files
                    .iter()
                    .any(|o| matches!(&o.file, files::FdKind::TcpConn(p) if p.is_peer_of(c)));
                if !peer_here {
                    let (pid, fd) = holder(sf.id);
                    return Err(Error::unsupported(
                        pid,
                        format!(
                            "fd {fd} is a TCP connection {} to a peer outside the dump \
                             (--tcp-established carries it)",
                            c.describe()
                        ),
                    ));
                }
            }
            _ => {}
        }
    }
    let mut zombies = Vec::new();
    for &pid in &zombie_pids {
        let f = stat_fields(pid)?;
        zombies.push(Zombie {
            pid,
            ppid: stat_field(&f, 4) as i32,
            pgid: stat_field(&f, 5) as i32,
            sid: stat_field(&f, 6) as i32,
            wait_status: stat_field(&f, 52) as i32,
            comm: proc::read(pid, "comm")
                .unwrap_or_default()
                .trim_end_matches('\n')
                .to_string(),
        });
    }
    let lost_session_leaders = check_sessions(&images, &zombies)?;
    let lost_group_leaders = lost_groups(&images, &zombies, &lost_session_leaders);

    stats.frozen_us = started.elapsed().as_micros() as u64;
    let mut meta = MetaWriter::new(&Header::current());
    meta.record(
        RecordKind::Inventory,
        &Inventory {
            root_pid: root,
            pids: images.iter().map(|p| p.pid).collect(),
            zombies,
            shared_files,
            pipes,
            lost_session_leaders,
            lost_group_leaders,
            sysv_shm,
            saved_files,
            net_lock: net_lock.current(),
            stats: stats.clone(),
        },
    );
    for image in &images {
        meta.record(RecordKind::Process, image);
    }
    phase("shared resources collected");
    meta.write_to(staging.path())?;
    staging.commit()?;
    phase("image written");
    let stats = stats.clone();

    match opts.after {
        AfterDump::Kill => {
            callbacks.finish(None)?;
            set.released = true;
            // Opened before the kill, so each names the process it was opened for.
            let pidfds: Vec<_> = set
                .procs
                .iter()
                .filter_map(|p| Some((p.pid, proc::pidfd_open(p.pid).ok()?)))
                .collect();
            for p in &set.procs {
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
            for p in &set.procs {
                for t in p.threads.iter().rev() {
                    let _ = waitpid(t.tracee.nix_pid(), Some(WaitPidFlag::__WALL));
                }
            }
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
            // Return only once they are stopped: the signal acts after detach.
            let until = Instant::now() + std::time::Duration::from_secs(2);
            for p in &images {
                while stat_fields(p.pid).is_ok_and(|f| f.first().is_some_and(|s| s != "T"))
                    && Instant::now() < until
                {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
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

/// Saves each shared anonymous memory object (and each unlinked file mapped
/// shared) once, whoever maps it, into `shmem-INODE.img`, and lists it among
/// the shared files.
fn save_shared_memory(
    images: &[ProcessImage],
    dir: &std::path::Path,
    shared: &mut Vec<files::SharedFile>,
) -> Result<()> {
    let mut seen: Vec<u64> = Vec::new();
    for p in images {
        for v in &p.mm.vmas {
            let mm::Backing::SharedAnon {
                inode, ref path, ..
            } = v.backing
            else {
                continue;
            };
            if seen.contains(&inode) {
                continue;
            }
            seen.push(inode);
            // An unlinked file the mapping came from may also be open as a
            // descriptor: restored apart, the two would no longer share pages.
            if let Some(path) = path {
                let open_too = images.iter().find(|q| {
                    q.files.fds.iter().any(|f| {
                        matches!(&f.kind, files::FdKind::Unlinked { path: fp, .. } if fp == path)
                    })
                });
                if let Some(q) = open_too {
                    return Err(Error::unsupported(
                        q.pid,
                        format!("{path} (deleted) is both mapped shared and open: this sharing"),
                    ));
                }
            }
            // map_files gives the object itself, not just this process's window.
            let src = format!("/proc/{}/map_files/{:x}-{:x}", p.pid, v.start, v.end);
            let f = std::fs::File::open(&src).map_err(|e| Error::io(&src, e))?;
            // The object's size: as far as any process maps it, or the file's
            // length when that is longer (an unlinked file mapped in part).
            let file_len = if path.is_some() {
                f.metadata().map_err(|e| Error::io(&src, e))?.len()
            } else {
                0
            };
            let size = images
                .iter()
                .flat_map(|q| q.mm.vmas.iter())
                .filter_map(|w| match w.backing {
                    mm::Backing::SharedAnon {
                        inode: i, offset, ..
                    } if i == inode => Some(offset + w.len()),
                    _ => None,
                })
                .max()
                .unwrap_or(0)
                .max(file_len);
            let mut data = vec![0u8; size as usize];
            // A file may end before the last mapped page: the rest reads as zeros.
            let got = read_up_to(&f, &mut data).map_err(|e| Error::io(&src, e))?;
            if got < size as usize && path.is_none() {
                return Err(Error::io(
                    &src,
                    std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
                ));
            }
            let path_img = dir.join(format!("shmem-{inode}.img"));
            use std::io::Write;
            crate::image::create_private(&path_img)?
                .write_all(&data)
                .map_err(|e| Error::io(&path_img, e))?;
            let id = shared.len() as u32;
            shared.push(files::SharedFile {
                id,
                file: files::FdKind::Shmem {
                    inode,
                    size,
                    crc32c: crc32c::crc32c(&data),
                    path: path.clone(),
                },
            });
        }
    }
    Ok(())
}

/// Reads from offset 0 until `buf` is full or the file ends; returns the bytes read.
fn read_up_to(f: &std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// An error met while collecting `pid`. If `pid` died meanwhile (it can be
/// killed while frozen), that is the cause to report, whichever call noticed
/// it first: a /proc read, pagemap, ptrace or a remote vmsplice.
fn died_instead(pid: i32, e: Error) -> Error {
    if matches!(e, Error::Gone { .. } | Error::Unsupported { .. }) {
        return e;
    }
    // PF_EXITING is set as the exit begins, before the memory goes, and
    // stays on a zombie; a reaped process has no stat at all.
    let exiting = stat_fields(pid).map_or(true, |f| stat_field(&f, 9) & PF_EXITING != 0);
    if exiting {
        Error::Gone {
            pid,
            during: "dump",
        }
    } else {
        e
    }
}

/// `/proc/locks`, read once per dump by a thread started at the freeze:
/// reading it waits for an RCU grace period (10–20 ms here), which then
/// passes while the first process is collected.
struct ProcLocks {
    reader: Option<std::thread::JoinHandle<std::io::Result<String>>>,
    text: String,
}

impl ProcLocks {
    fn start() -> ProcLocks {
        ProcLocks {
            reader: Some(std::thread::spawn(|| {
                std::fs::read_to_string("/proc/locks")
            })),
            text: String::new(),
        }
    }

    fn text(&mut self) -> &str {
        if let Some(reader) = self.reader.take() {
            match reader.join() {
                Ok(Ok(text)) => self.text = text,
                Ok(Err(e)) => tracing::warn!(
                    "cannot read /proc/locks ({e}): locks held without a descriptor are not checked"
                ),
                Err(_) => panic!("the reader of /proc/locks panicked"),
            }
        }
        &self.text
    }
}

/// A line of `/proc/locks` for a lock `pid` holds: POSIX and flock locks by
/// owner pid, OFD locks (pid -1) by the inode of one of its open files.
/// A lock in /proc/locks that this process owns but that no descriptor's
/// fdinfo showed (a flock kept alive by a mapping after its fd was closed…).
/// `locks` is the text of /proc/locks ([`ProcLocks`]).
fn unreachable_lock(
    pid: i32,
    files: &files::FilesImage,
    collected: &[crate::locks::FileLock],
    locks: &str,
) -> Option<String> {
    let inodes: Vec<u64> = files
        .fds
        .iter()
        .filter(|f| collected.iter().any(|l| l.fd == f.fd))
        .filter_map(|f| match &f.kind {
            files::FdKind::Regular { identity, .. } => Some(identity.inode),
            _ => None,
        })
        .collect();
    locks.lines().find_map(|line| {
        let w: Vec<&str> = line.split_whitespace().collect();
        // "1: POSIX  ADVISORY  WRITE 1234 08:01:5678 0 EOF"; blocked waiters add "->".
        let w: Vec<&str> = w.into_iter().filter(|x| *x != "->").collect();
        let owner: i32 = w.get(4)?.parse().ok()?;
        let inode: u64 = w.get(5)?.rsplit(':').next()?.parse().ok()?;
        (owner == pid && !inodes.contains(&inode))
            .then(|| format!("{} {}", w.get(1).unwrap_or(&"?"), w.get(3).unwrap_or(&"?")))
    })
}

/// Process groups of the dump whose leader has exited (not a lost session's
/// own group: its helper recreates that one).
fn lost_groups(
    images: &[ProcessImage],
    zombies: &[Zombie],
    lost_sessions: &[i32],
) -> Vec<LostGroup> {
    let in_dump =
        |pid: i32| images.iter().any(|p| p.pid == pid) || zombies.iter().any(|z| z.pid == pid);
    let mut lost: Vec<LostGroup> = Vec::new();
    for p in images {
        let gone = stat_fields(p.pgid).map_or(true, |f| stat_field(&f, 5) != p.pgid as i64);
        if !in_dump(p.pgid)
            && !lost_sessions.contains(&p.pgid)
            && gone
            && !lost.iter().any(|g| g.pgid == p.pgid)
        {
            lost.push(LostGroup {
                pgid: p.pgid,
                sid: p.sid,
            });
        }
    }
    lost
}

/// Whether the leader of session `sid` has exited: no process has that PID,
/// or the PID was reused by a process of another session.
fn session_leader_gone(sid: i32) -> bool {
    stat_fields(sid).map_or(true, |f| stat_field(&f, 6) != sid as i64)
}

/// Restore recreates sessions by having each session leader call setsid()
/// before it forks its children: every process must be in its own session, its
/// parent's, or (orphans) the root's, or one whose leader is outside the dump
/// (then it joins the restorer's session, as stdio is rebound to the restorer's),
/// or one whose leader has exited. Returns those lost leaders: a helper takes
/// each one's PID at restore, calls setsid() and forks the members that entered
/// the session from its parent; they must all have one parent (which is then a
/// subreaper: that is how they were reparented to it) or none in the dump.
fn check_sessions(images: &[ProcessImage], zombies: &[Zombie]) -> Result<Vec<i32>> {
    let sid_of = |pid: i32| images.iter().find(|p| p.pid == pid).map(|p| p.sid);
    let in_dump =
        |pid: i32| images.iter().any(|p| p.pid == pid) || zombies.iter().any(|z| z.pid == pid);
    let mut lost: Vec<i32> = Vec::new();
    for p in images {
        let parent_sid = sid_of(p.ppid);
        if p.sid != p.pid
            && parent_sid != Some(p.sid)
            && !in_dump(p.sid)
            && session_leader_gone(p.sid)
        {
            let entry_parents: Vec<i32> = images
                .iter()
                .filter(|q| q.sid == p.sid && sid_of(q.ppid) != Some(p.sid))
                .map(|q| if in_dump(q.ppid) { q.ppid } else { 0 })
                .collect();
            if entry_parents.iter().any(|&pp| pp != entry_parents[0]) {
                return Err(Error::unsupported(
                    p.pid,
                    format!(
                        "is in session {} whose leader exited, with members under different parents",
                        p.sid
                    ),
                ));
            }
            let parent = images.iter().find(|q| q.pid == p.ppid);
            if parent.is_some_and(|q| !q.state.child_subreaper) {
                return Err(Error::unsupported(
                    p.pid,
                    format!(
                        "is in session {} whose leader exited, under parent {} that is not a subreaper",
                        p.sid, p.ppid
                    ),
                ));
            }
            if !lost.contains(&p.sid) {
                lost.push(p.sid);
            }
            continue;
        }
        // Orphans are forked (through a helper) by the root, so they get its session.
        let root_sid = images.first().map(|r| r.sid);
        let ok = p.sid == p.pid
            || parent_sid == Some(p.sid)
            || (parent_sid.is_none() && (!in_dump(p.sid) || root_sid == Some(p.sid)));
        if !ok {
            return Err(Error::unsupported(
                p.pid,
                format!(
                    "is in session {} while its parent {} is in session {:?}: this session layout",
                    p.sid, p.ppid, parent_sid
                ),
            ));
        }
    }
    Ok(lost)
}

fn collect_process(
    fp: &mut FrozenProcess,
    dir: &std::path::Path,
    stats: &mut DumpStats,
    progress: &indicatif::ProgressBar,
    pre_copy: Option<&mut crate::precopy::PreCopy>,
    proc_locks: &mut ProcLocks,
    sockets: &mut crate::sockets::DumpSockets,
) -> Result<ProcessImage> {
    let pid = fp.pid;
    let t0 = Instant::now();
    let step =
        |done: &str| tracing::debug!(pid, us = t0.elapsed().as_micros() as u64, "collect: {done}");
    let status = proc::read(pid, "status")?;
    let maps = proc::maps(pid)?;
    let files = files::collect(pid, sockets)?;
    step("maps and files");
    let mut locks = Vec::new();
    for f in &files.fds {
        let info = proc::read(pid, &format!("fdinfo/{}", f.fd)).unwrap_or_default();
        locks.extend(
            crate::locks::parse_fdinfo(f.fd, &info).map_err(|why| Error::unsupported(pid, why))?,
        );
    }
    if files.root != "/" {
        return Err(Error::unsupported(
            pid,
            format!("root directory {} (chroot)", files.root),
        ));
    }

    let insn = find_syscall_insn(pid, &maps)?;
    fp.insn = Some(insn);
    let main = fp.main();
    let scratch = RemoteCall::new(main, insn, 0).call(
        libc::SYS_mmap,
        [
            0,
            PAGE_SIZE,
            (libc::PROT_READ | libc::PROT_WRITE) as u64,
            (libc::MAP_SHARED | libc::MAP_ANONYMOUS) as u64,
            u64::MAX,
            0,
        ],
        "mmap of a scratch page",
    )?;
    fp.scratch = Some(scratch);
    // smaps (for VmFlags) walks every page table entry: 30 ms per GiB. It is
    // read beside the remote calls below, which leave the mappings as they
    // are. It is started after the scratch page is mapped (a mapping waits
    // for the walk), and it lists that page as a mapping of its own (a
    // shared mapping never merges with a neighbour), which is not in `maps`.
    let smaps_reader = std::thread::spawn(move || proc::read(pid, "smaps"));
    let mut threads = Vec::new();
    for t in &fp.threads {
        let name = proc::read(pid, &format!("task/{}/comm", t.tracee.pid))?
            .trim_end_matches('\n')
            .to_string();
        let remote = RemoteCall::new(t.tracee, insn, scratch);
        let mut thread = task::collect_thread(&remote, &t.regs, name)?;
        thread.sigmask = t.sigmask;
        threads.push(thread);
    }
    let remote = RemoteCall::new(main, insn, scratch);
    step("threads");
    let state = task::collect_process(&remote, &status)?;
    step("process state");
    let brk = remote.call(libc::SYS_brk, [0; 6], "brk(0)")?;
    // Before the memory, the longest part: a refusal comes early.
    if let Some(lock) = unreachable_lock(pid, &files, &locks, proc_locks.text()) {
        return Err(Error::unsupported(
            pid,
            format!("holds a file lock ({lock}) not reachable through an open descriptor"),
        ));
    }
    let smaps = smaps_reader
        .join()
        .unwrap_or_else(|_| panic!("the reader of /proc/{pid}/smaps panicked"))?;
    let vmflags = proc::parse_smaps_vmflags(&smaps);
    let vmas = mm::collect_vmas(pid, &maps, &vmflags)?;
    step("vmas");
    let mem_started = Instant::now();
    progress.set_message(format!("pid {pid}: memory"));
    let pre_copied = match pre_copy {
        Some(p) => p.final_round(pid, &vmas, &vmflags, stats)?,
        None => None,
    };
    let chunks = match pre_copied {
        Some(chunks) => chunks,
        None => mm::collect_pages(pid, &vmas, dir, stats, Some(&remote))?,
    };
    stats.memory_us += mem_started.elapsed().as_micros() as u64;
    step("memory");
    remote.call(
        libc::SYS_munmap,
        [scratch, PAGE_SIZE, 0, 0, 0, 0],
        "munmap of crest's scratch page",
    )?;
    fp.scratch = None;
    step("scratch unmapped");

    let f = stat_fields(pid)?;
    let mut fields =
        mm::parse_stat_mm_fields(&proc::read(pid, "stat")?).ok_or_else(|| Error::Refused {
            pid,
            reason: format!("cannot parse /proc/{pid}/stat"),
        })?;
    fields.brk = brk;
    let auxv_path = format!("/proc/{pid}/auxv");
    let auxv = mm::parse_auxv(&std::fs::read(&auxv_path).map_err(|e| Error::io(&auxv_path, e))?);
    let exe = proc::readlink(pid, "exe")?.to_string_lossy().into_owned();
    if exe.ends_with(" (deleted)") {
        return Err(Error::unsupported(
            pid,
            format!("its executable {exe} was deleted"),
        ));
    }
    step("done");

    Ok(ProcessImage {
        pid,
        ppid: stat_field(&f, 4) as i32,
        pgid: stat_field(&f, 5) as i32,
        sid: stat_field(&f, 6) as i32,
        stopped: fp.was_stopped,
        threads,
        state,
        mm: mm::MmImage {
            vmas,
            fields,
            auxv,
            exe,
            chunks,
        },
        files,
        api: None,
        locks,
        ctty: (stat_field(&f, 6) == pid as i64)
            .then(|| crate::tty::pts_index_of_tty_nr(stat_field(&f, 7)))
            .flatten(),
    })
}
