//! The process tree: which processes a dump takes (a tree, a session, a
//! process group), its zombies, and the sessions and process groups whose
//! leader had exited; at restore, the plan of who forks whom (every
//! process with its original PID: `clone3` with `set_tid`), the helpers
//! that recreate lost sessions and groups, the zombies, and the process
//! groups joined once every process exists.

use std::ffi::CString;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::sys::proc::{self, stat_field, stat_fields};
use crate::sys::process;
use crate::sys::ptrace::Tracee;
use crate::sys::remote::RemoteCall;

/// A process group whose leader had exited, and the session it is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LostGroup {
    pub pgid: i32,
    pub sid: i32,
}

/// A zombie in the dumped tree: restored as a zombie with the same status,
/// so its parent's later wait() sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Zombie {
    pub pid: i32,
    pub ppid: i32,
    pub pgid: i32,
    pub sid: i32,
    /// The raw wait status (`/proc/PID/stat` exit_code).
    pub wait_status: i32,
    #[serde(default)]
    pub comm: String,
}

impl Zombie {
    /// Zombie `pid`, from /proc.
    pub fn collect(pid: i32) -> Result<Zombie> {
        let f = stat_fields(pid)?;
        Ok(Zombie {
            pid,
            ppid: stat_field(&f, 4) as i32,
            pgid: stat_field(&f, 5) as i32,
            sid: stat_field(&f, 6) as i32,
            wait_status: stat_field(&f, 52) as i32,
            comm: proc::read(pid, "comm")
                .unwrap_or_default()
                .trim_end_matches('\n')
                .to_string(),
        })
    }
}

/// What the tree needs to know of a live process of the dump.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    pub pid: i32,
    pub ppid: i32,
    pub pgid: i32,
    pub sid: i32,
    /// It was a child subreaper.
    pub subreaper: bool,
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

/// The processes in scope `scope` of `id` (a tree's root, a session or a
/// group), parents before children.
pub fn in_scope(scope: Scope, id: i32) -> Result<Vec<i32>> {
    match scope {
        Scope::Tree => tree(id),
        Scope::Session => members(6, id),
        Scope::Pgid => members(5, id),
    }
}

/// The processes of the tree rooted at `root`, parents before children.
pub fn tree(root: i32) -> Result<Vec<i32>> {
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

/// Process groups of the dump whose leader has exited (not a lost session's
/// own group: its helper recreates that one).
pub fn lost_groups(images: &[Member], zombies: &[Zombie], lost_sessions: &[i32]) -> Vec<LostGroup> {
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
pub fn check_sessions(images: &[Member], zombies: &[Zombie]) -> Result<Vec<i32>> {
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
            if parent.is_some_and(|q| !q.subreaper) {
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

/// A zombie a restore child forks: (pid, wait status, own group, own session, name).
pub type ZombiePlan = (i32, i32, bool, bool, CString);

/// What one restore child does for the tree, computed before any clone.
#[derive(Debug, Clone)]
pub struct TreePlan {
    pub pid: i32,
    /// Call setsid() first: it leads its session.
    pub session_leader: bool,
    /// Indices (into the plan list) of the live children it forks.
    pub children: Vec<usize>,
    /// Processes whose parent is outside the image (orphans reparented to init
    /// or a subreaper): the root creates each through a helper that exits.
    pub orphans: Vec<usize>,
    /// Sessions whose leader had exited, with the members that entered them
    /// from this process: a helper takes the leader's PID, calls setsid(),
    /// forks them and exits, so they are reparented to this process.
    pub lost_sessions: Vec<(i32, Vec<usize>)>,
    /// Created through a helper that exits (orphans, lost-session members).
    pub reparented: bool,
    /// Process groups whose leader had exited, in this process's session: a
    /// holder with the leader's PID leads each until the restorer has joined
    /// every member to it, then is killed.
    pub lost_groups: Vec<i32>,
    /// Was a child subreaper: must be one before lost-session helpers exit.
    pub subreaper: bool,
    /// A session leader's controlling terminal: the descriptor (a pty slave
    /// the restorer holds) made the controlling terminal right after setsid().
    pub ctty_slot: Option<i32>,
    /// Zombie children it forks.
    pub zombies: Vec<ZombiePlan>,
    /// Where it reports "ok PID" or "err PID reason" to the restorer.
    pub err_fd: i32,
}

/// Plans the tree of `members` (image order, parents first) rooted at
/// `root`: who forks whom, with the zombies, lost sessions and lost groups
/// of the dump. `ctty_slot` and `err_fd` are left to the caller.
pub fn plan(
    members: &[Member],
    root: i32,
    zombies: &[Zombie],
    lost_session_leaders: &[i32],
    lost_group_leaders: &[LostGroup],
) -> Vec<TreePlan> {
    let known = |pid: i32| members.iter().any(|q| q.pid == pid);
    let sid_of = |pid: i32| members.iter().find(|q| q.pid == pid).map(|q| q.sid);
    // A member of a session whose leader exited, whose parent is not in it.
    let enters_lost =
        |q: &Member| lost_session_leaders.contains(&q.sid) && sid_of(q.ppid) != Some(q.sid);
    let mut plans = Vec::new();
    for p in members {
        let children = members
            .iter()
            .enumerate()
            .filter(|(_, c)| c.ppid == p.pid && c.pid != root && !enters_lost(c))
            .map(|(i, _)| i)
            .collect();
        let is_root = p.pid == root;
        let orphans = if is_root {
            members
                .iter()
                .enumerate()
                .filter(|(_, q)| q.pid != p.pid && !known(q.ppid) && !enters_lost(q))
                .map(|(i, _)| i)
                .collect()
        } else {
            Vec::new()
        };
        let lost_sessions = lost_session_leaders
            .iter()
            .map(|&sid| {
                let entering = members
                    .iter()
                    .enumerate()
                    .filter(|(_, q)| {
                        q.sid == sid
                            && enters_lost(q)
                            && (q.ppid == p.pid || (is_root && !known(q.ppid)))
                    })
                    .map(|(i, _)| i)
                    .collect::<Vec<_>>();
                (sid, entering)
            })
            .filter(|(_, entering)| !entering.is_empty())
            .collect();
        let reparented = p.pid != root && (!known(p.ppid) || enters_lost(p));
        let zombies = zombies
            .iter()
            .filter(|z| z.ppid == p.pid)
            .map(|z| {
                (
                    z.pid,
                    z.wait_status,
                    z.pgid == z.pid,
                    z.sid == z.pid,
                    CString::new(z.comm.as_str()).unwrap_or_default(),
                )
            })
            .collect();
        plans.push(TreePlan {
            pid: p.pid,
            session_leader: p.sid == p.pid,
            children,
            orphans,
            lost_sessions,
            reparented,
            lost_groups: lost_group_leaders
                .iter()
                .filter(|g| {
                    let forker = members.iter().position(|q| q.sid == g.sid).unwrap_or(0);
                    members[forker].pid == p.pid
                })
                .map(|g| g.pgid)
                .collect(),
            subreaper: p.subreaper,
            ctty_slot: None,
            zombies,
            err_fd: 0,
        });
    }
    plans
}

/// Joins every process to its group, leaders first. Groups led from outside
/// the image stay the restorer's (as stdio pointing outside is rebound).
/// `trampolines`: each member's syscall instruction (it is stopped, seized).
pub fn set_process_groups(
    members: &[Member],
    zombies: &[Zombie],
    lost_session_leaders: &[i32],
    lost_group_leaders: &[LostGroup],
    trampolines: &[u64],
) -> Result<()> {
    let in_image = |pgid: i32| members.iter().any(|p| p.pid == pgid);
    for leaders_first in [true, false] {
        for (i, p) in members.iter().enumerate() {
            if p.sid == p.pid || (p.pgid == p.pid) != leaders_first {
                continue; // a session leader already leads its group
            }
            // Members of a lost session joined its group from their helper.
            if lost_session_leaders.contains(&p.pgid) {
                continue;
            }
            let lost_group = lost_group_leaders.iter().any(|g| g.pgid == p.pgid);
            if !leaders_first && !in_image(p.pgid) && !lost_group {
                if zombies.iter().any(|z| z.pid == p.pgid) {
                    return Err(Error::unsupported(
                        p.pid,
                        format!("its process group {} is led by a zombie", p.pgid),
                    ));
                }
                tracing::warn!(
                    pid = p.pid,
                    pgid = p.pgid,
                    "process group led from outside the image: keeping the restorer's"
                );
                continue;
            }
            let target = if leaders_first { 0 } else { p.pgid as u64 };
            RemoteCall::new(Tracee { pid: p.pid }, trampolines[i], 0).call(
                libc::SYS_setpgid,
                [0, target, 0, 0, 0, 0],
                &format!("setpgid to {}", p.pgid),
            )?;
        }
    }
    Ok(())
}

/// Why a restore child could not be created.
pub enum CloneError {
    /// The PID stayed taken until the deadline.
    Taken(i32),
    Other(TreeError),
}

/// Why the process tree could not be recreated.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("pid {pid} is in use (by '{comm}'); stop that process or restore into a new PID namespace (--pidns)")]
    PidTaken { pid: i32, comm: String },
    #[error("this kernel has no clone3 (Linux 5.5+ needed to restore PIDs)")]
    NoClone3,
    #[error("pid {pid}: clone3 with set_tid needs CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE")]
    NoPrivilege { pid: i32 },
    /// What a restore child reported on the report pipe (its own error, as
    /// text: it crossed from another process).
    #[error("pid {pid}: {report}")]
    Child { pid: String, report: String },
    #[error("pid {pid}: the restore child died before it was set up")]
    Died { pid: i32 },
    #[error(transparent)]
    Engine(#[from] Error),
}

impl TreeError {
    pub fn exit_code(&self) -> i32 {
        match self {
            TreeError::Engine(e) => e.exit_code(),
            _ => 1,
        }
    }
}

impl CloneError {
    /// The line restore child `me` reports on the report pipe.
    pub fn report_line(&self, me: i32) -> String {
        match self {
            CloneError::Taken(pid) => format!("err {me} taken {pid}\n"),
            CloneError::Other(e) => format!("err {me} {e}\n"),
        }
    }
}

/// Forks a child with PID `pid`, retrying while the PID is taken (a process
/// killed by the dump may wait 1-3 s for init to reap it) until `deadline`.
/// The child runs `child` and never returns.
pub fn clone_with_pid(
    pid: i32,
    deadline: Instant,
    child: impl FnOnce() -> std::convert::Infallible,
) -> Result<i32, CloneError> {
    let set_tid = [pid];
    let args = process::CloneArgs {
        exit_signal: libc::SIGCHLD as u64,
        set_tid: set_tid.as_ptr() as u64,
        set_tid_size: 1,
        ..Default::default()
    };
    loop {
        // SAFETY: clone3 without CLONE_VM behaves like fork; the child only runs
        // `child`, which never returns. The caller is single-threaded.
        let r = unsafe { process::clone3(&args) };
        if r == 0 {
            #[allow(unreachable_code)] // `child` diverges: its result cannot exist
            match child() {}
        }
        if r > 0 {
            return Ok(r as i32);
        }
        let e = nix::errno::Errno::last();
        match e {
            nix::errno::Errno::EEXIST if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            nix::errno::Errno::EEXIST => return Err(CloneError::Taken(pid)),
            nix::errno::Errno::ENOSYS => return Err(CloneError::Other(TreeError::NoClone3)),
            nix::errno::Errno::EPERM => {
                return Err(CloneError::Other(TreeError::NoPrivilege { pid }))
            }
            e => {
                return Err(CloneError::Other(
                    Error::sys(pid, "clone3 with set_tid", e).into(),
                ))
            }
        }
    }
}

/// What a restore child does to set itself up (its descriptors, limits,
/// signal dispositions…) once the tree's part is done: called with its index
/// in the plan; its error is reported to the restorer (as text: it crosses
/// to another process).
pub type Setup<'a> = dyn Fn(usize) -> Result<(), Box<dyn std::error::Error>> + 'a;

/// Creates the tree of `plans` from its root (`plans[0]`), retrying each PID
/// until `deadline` while it is taken. Each restore child reports "ok PID"
/// or "err PID reason" on `report_fd` (moved to its `err_fd`) once `setup`
/// is done, and waits to be seized. Returns the root's PID.
pub fn fork(
    plans: &[TreePlan],
    report_fd: i32,
    deadline: Instant,
    setup: &Setup,
) -> Result<i32, CloneError> {
    clone_with_pid(plans[0].pid, deadline, || {
        process_main(0, plans, report_fd, deadline, setup)
    })
}

/// The body of restore child `idx`: lead its session, fork its children and
/// zombies, set itself up, report, and wait for the restorer to seize it.
fn process_main(
    idx: usize,
    plans: &[TreePlan],
    report_fd: i32,
    deadline: Instant,
    setup: &Setup,
) -> std::convert::Infallible {
    let plan = &plans[idx];
    let report = |msg: String| {
        // SAFETY: a write of our own buffer to the report pipe; under PIPE_BUF, so atomic.
        unsafe { libc::write(plan.err_fd, msg.as_ptr().cast(), msg.len()) };
    };
    // SAFETY: plain syscalls on ourselves, in the freshly cloned child.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::sigprocmask(libc::SIG_SETMASK, &all, std::ptr::null_mut());
        process::unregister_own_rseq();
        // Should our parent (another restore child, or crest) die, so do we.
        // Not for orphans: their parent is a helper that exits at once.
        if !plan.reparented {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        }
        if report_fd != plan.err_fd {
            if libc::dup3(report_fd, plan.err_fd, libc::O_CLOEXEC) < 0 {
                libc::_exit(1);
            }
            libc::close(report_fd);
        }
        if plan.session_leader && libc::setsid() < 0 {
            report(format!("err {} {}\n", plan.pid, errno_msg("setsid")));
            libc::_exit(1);
        }
        if let Some(slot) = plan.ctty_slot {
            if libc::ioctl(slot, libc::TIOCSCTTY, 0) < 0 {
                report(format!(
                    "err {} {}\n",
                    plan.pid,
                    errno_msg("making its pty its controlling terminal (TIOCSCTTY)")
                ));
                libc::_exit(1);
            }
        }
    }
    for &g in &plan.lost_groups {
        hold_lost_group(g, plan.pid, plan.err_fd, deadline);
    }
    for &c in &plan.children {
        let err_fd = plan.err_fd;
        if let Err(e) = clone_with_pid(plans[c].pid, deadline, || {
            process_main(c, plans, err_fd, deadline, setup)
        }) {
            report(e.report_line(plan.pid));
            // SAFETY: leaving without unwinding.
            unsafe { libc::_exit(1) };
        }
    }
    for &o in &plan.orphans {
        // SAFETY: the helper only clones the orphan and exits; we reap it at once.
        let helper = unsafe { libc::fork() };
        if helper == 0 {
            let err_fd = plan.err_fd;
            let code = match clone_with_pid(plans[o].pid, deadline, || {
                process_main(o, plans, err_fd, deadline, setup)
            }) {
                Ok(_) => 0,
                Err(e) => {
                    report(e.report_line(plan.pid));
                    1
                }
            };
            // SAFETY: leaving the helper without unwinding; the orphan is reparented.
            unsafe { libc::_exit(code) };
        }
        // SAFETY: reaping the helper we just forked.
        unsafe { libc::waitpid(helper, std::ptr::null_mut(), 0) };
        process::drop_pending_sigchld();
    }
    // Lost members are reparented to us when their helper exits: only if we
    // are a subreaper by then (the restorer sets the rest of our state later).
    if plan.subreaper && !plan.lost_sessions.is_empty() {
        // SAFETY: a prctl with plain values on ourselves.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) };
    }
    for (sid, members) in &plan.lost_sessions {
        let err_fd = plan.err_fd;
        let r = clone_with_pid(*sid, deadline, || {
            // SAFETY: the helper leads the lost session, forks its members
            // and leaves without unwinding; they are reparented to us.
            if unsafe { libc::setsid() } < 0 {
                report(format!(
                    "err {} {}\n",
                    plan.pid,
                    errno_msg("setsid in the session helper")
                ));
                // SAFETY: leaving the helper without unwinding.
                unsafe { libc::_exit(1) };
            }
            for &m in members {
                if let Err(e) = clone_with_pid(plans[m].pid, deadline, || {
                    process_main(m, plans, err_fd, deadline, setup)
                }) {
                    report(e.report_line(plan.pid));
                    // SAFETY: leaving the helper without unwinding.
                    unsafe { libc::_exit(1) };
                }
            }
            // SAFETY: as above.
            unsafe { libc::_exit(0) }
        });
        match r {
            // SAFETY: reaping the helper we just cloned.
            Ok(helper) => unsafe {
                libc::waitpid(helper, std::ptr::null_mut(), 0);
                process::drop_pending_sigchld();
            },
            Err(e) => {
                report(e.report_line(plan.pid));
                // SAFETY: leaving without unwinding.
                unsafe { libc::_exit(1) };
            }
        }
    }
    for (pid, status, own_group, own_session, name) in &plan.zombies {
        let (pid, status, own_group, own_session) = (*pid, *status, *own_group, *own_session);
        let r = clone_with_pid(pid, deadline, || {
            // SAFETY: the zombie-to-be only sets its name, group and session and dies as it did.
            unsafe {
                libc::prctl(libc::PR_SET_NAME, name.as_ptr());
                if own_session {
                    libc::setsid();
                } else if own_group {
                    libc::setpgid(0, 0);
                }
                let sig = status & 0x7f;
                if sig != 0 {
                    let mut one: libc::sigset_t = std::mem::zeroed();
                    libc::sigemptyset(&mut one);
                    libc::sigaddset(&mut one, sig);
                    libc::signal(sig, libc::SIG_DFL);
                    libc::prctl(libc::PR_SET_DUMPABLE, 0); // no core dump
                    libc::sigprocmask(libc::SIG_UNBLOCK, &one, std::ptr::null_mut());
                    libc::raise(sig);
                }
                libc::_exit((status >> 8) & 0xff)
            }
        });
        match r {
            // Wait (without reaping) until it is a zombie, then drop the SIGCHLD its
            // death queued for us: the dumped process had already had it.
            // SAFETY: waitid with WNOWAIT only reads the child's state into `info`;
            // sigtimedwait with a zero timeout only dequeues a pending SIGCHLD.
            Ok(z) => unsafe {
                let mut info: libc::siginfo_t = std::mem::zeroed();
                libc::waitid(
                    libc::P_PID,
                    z as libc::id_t,
                    &mut info,
                    libc::WEXITED | libc::WNOWAIT,
                );
                process::drop_pending_sigchld();
            },
            Err(e) => {
                report(e.report_line(plan.pid));
                // SAFETY: leaving without unwinding.
                unsafe { libc::_exit(1) };
            }
        }
    }
    match setup(idx) {
        Ok(()) => report(format!("ok {}\n", plan.pid)),
        Err(e) => {
            report(format!(
                "err {} {}\n",
                plan.pid,
                e.to_string().replace('\n', " ")
            ));
            // SAFETY: leaving without unwinding.
            unsafe { libc::_exit(1) };
        }
    }
    // SAFETY: closing our end of the report pipe, then waiting (all signals
    // blocked) for the restorer to seize us; it never lets this code continue.
    unsafe {
        libc::close(plan.err_fd);
        loop {
            libc::pause();
        }
    }
}

/// Creates the holder of lost process group `pgid` in our session: a process
/// with that PID leading that group, double-forked so that it is not our
/// child. It reports "ok PGID" (so the restorer kills it should the restore
/// fail), closes everything, and waits to be killed once every member joined.
fn hold_lost_group(pgid: i32, me: i32, err_fd: i32, deadline: Instant) {
    let report = |msg: String| {
        // SAFETY: a write of our own buffer to the report pipe; under PIPE_BUF, so atomic.
        unsafe { libc::write(err_fd, msg.as_ptr().cast(), msg.len()) };
    };
    // SAFETY: the intermediate process only clones the holder and exits.
    let middle = unsafe { libc::fork() };
    if middle == 0 {
        let r = clone_with_pid(pgid, deadline, || {
            // SAFETY: plain syscalls on ourselves; we never return.
            unsafe {
                libc::setpgid(0, 0);
                report(format!("ok {pgid}\n"));
                libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32);
                loop {
                    libc::pause();
                }
            }
        });
        let code = match r {
            Ok(holder) => {
                // Leave only once the group exists, so members can join it.
                while Instant::now() < deadline + Duration::from_secs(2) {
                    // SAFETY: getpgid takes a plain value.
                    if unsafe { libc::getpgid(holder) } == pgid {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                0
            }
            Err(e) => {
                report(e.report_line(me));
                1
            }
        };
        // SAFETY: leaving without unwinding; the holder is reparented.
        unsafe { libc::_exit(code) };
    }
    // SAFETY: reaping the intermediate process we just forked.
    unsafe { libc::waitpid(middle, std::ptr::null_mut(), 0) };
    process::drop_pending_sigchld();
}

fn errno_msg(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

/// The error for PID `pid` in use (naming what uses it).
pub fn pid_taken(pid: i32) -> TreeError {
    let comm = proc::read(pid, "comm")
        .map(|c| c.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    TreeError::PidTaken { pid, comm }
}
