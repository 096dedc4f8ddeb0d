//! `crest restore`: recreate a process from an image.
//!
//! 1. Read and validate everything first (metadata and every page checksum),
//!    so a bad image fails before any process exists.
//! 2. `clone3` a child with the original PID. The child sets up what it can on
//!    itself — descriptors, cwd, limits, signal dispositions, pending signals —
//!    maps a two-page trampoline (a `syscall` instruction and a scratch page)
//!    where the image has nothing, and stops under ptrace.
//! 3. Through remote syscalls at the trampoline we unmap the child's own
//!    memory, move its vDSO to the old address, map every VMA, copy the pages
//!    in, restore mm fields, rseq, robust list, timers and credentials; the last
//!    syscall unmaps the trampoline itself, and at its exit stop the child gets
//!    its original registers and is released.
//!
//! Any failure after the clone kills the child: no half-restored process is
//! ever left behind.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;

use crate::error::{Error, Result};
use crate::files::{self, FdKind};
use crate::image::Image;
use crate::mm::{self, Backing};
use crate::sys::proc;
use crate::sys::ptrace::Tracee;
use crate::sys::remote::RemoteCall;
use crate::sys::PAGE_SIZE;
use crate::task;
use crate::ProcessImage;

#[derive(Debug, Clone)]
pub struct RestoreOptions {
    pub dir: PathBuf,
    /// Return once the process runs instead of waiting for it.
    pub detach: bool,
    /// Leave the restored process stopped (SIGSTOP).
    pub stop: bool,
    /// How long to wait for the original PID to become free.
    pub pid_wait: Duration,
    /// Restore even if an open file changed since the dump (logged, not refused).
    pub allow_changed_files: bool,
    /// Restore into a new PID namespace, under an init of crest's own, so
    /// that PIDs taken here do not block the restore.
    pub pidns: bool,
    /// Give back the files saved with `--save-files` this way.
    pub restore_files: Option<crate::savefiles::RestoreFiles>,
    /// `--relocate OLD=NEW`: paths under OLD are opened under NEW.
    pub relocate: Vec<(String, String)>,
    /// How long to wait for a listening port to become free: connections the
    /// process had closed may hold it in TIME_WAIT for up to 60 s.
    pub port_wait: Duration,
}

/// What `restore` leaves behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restored {
    /// The process runs and is our child.
    Child { pid: i32 },
    /// The process runs, detached from us (reparented to init or a subreaper).
    Detached { pid: i32 },
    /// The process runs in a new PID namespace under `init`, crest's child,
    /// which exits with the root's status (as `crest restore` does) once the
    /// namespace is empty. `pid` is the root's PID as seen from here; inside
    /// the namespace it has its original one.
    InPidns { pid: i32, init: i32, detached: bool },
}

/// The page file, mapped read-only, with every chunk checked against its checksum.
struct Pages {
    /// One mapping per page file (`PageChunk::file`); `None` for an empty one.
    maps: Vec<Option<(*mut libc::c_void, usize)>>,
}

impl Pages {
    fn open(dir: &Path, p: &ProcessImage) -> Result<Pages> {
        let files =
            p.mm.chunks
                .iter()
                .map(|c| c.file as usize + 1)
                .max()
                .unwrap_or(1);
        let mut pages = Pages { maps: Vec::new() };
        let mut lens = Vec::new();
        for file in 0..files {
            let path = Image::pages_file_path(dir, p.pid, file as u8);
            let f = File::open(&path).map_err(|e| Error::io(&path, e))?;
            let len = f.metadata().map_err(|e| Error::io(&path, e))?.len();
            lens.push(len);
            if len == 0 {
                pages.maps.push(None);
                continue;
            }
            // SAFETY: a private read-only mapping of a file we opened; unmapped in Drop.
            let addr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len as usize,
                    libc::PROT_READ,
                    // Not MAP_POPULATE: zero pages are holes in the file, and
                    // faulting a tmpfs hole allocates a page. The chunks are
                    // populated below instead.
                    libc::MAP_PRIVATE,
                    f.as_raw_fd(),
                    0,
                )
            };
            if addr == libc::MAP_FAILED {
                return Err(Error::io(&path, std::io::Error::last_os_error()));
            }
            pages.maps.push(Some((addr, len as usize)));
        }
        let bad = |c: &mm::PageChunk, reason: String| {
            Error::bad_image(Image::pages_file_path(dir, p.pid, c.file), reason)
        };
        let lookup = mm::VmaLookup::new(&p.mm.vmas);
        for c in &p.mm.chunks {
            let len = lens[c.file as usize];
            if c.offset.checked_add(c.len).is_none_or(|end| end > len) {
                return Err(bad(
                    c,
                    format!(
                        "truncated: chunk at offset {} ({} bytes) runs past the end ({len} bytes)",
                        c.offset, c.len
                    ),
                ));
            }
            let inside = lookup.containing(c.vaddr, c.len).is_some();
            if !inside || c.len % PAGE_SIZE != 0 || c.vaddr % PAGE_SIZE != 0 {
                return Err(bad(
                    c,
                    format!(
                        "chunk {:#x}+{:#x} does not lie inside one mapping",
                        c.vaddr, c.len
                    ),
                ));
            }
        }
        // Checksummed here, then copied: map each chunk in one call rather
        // than fault it in page by page. Two threads share the work.
        let check = |items: &[(&[u8], &mm::PageChunk)]| -> Result<()> {
            for &(data, c) in items {
                // SAFETY: madvise on our own read-only mapping; it only
                // faults pages in. Best effort: older kernels lack it.
                unsafe {
                    libc::madvise(
                        data.as_ptr() as *mut libc::c_void,
                        data.len(),
                        libc::MADV_POPULATE_READ,
                    )
                };
                if crc32c::crc32c(data) != c.crc32c {
                    return Err(bad(
                        c,
                        format!(
                            "checksum mismatch in the chunk at offset {} (memory {:#x})",
                            c.offset, c.vaddr
                        ),
                    ));
                }
            }
            Ok(())
        };
        let items: Vec<(&[u8], &mm::PageChunk)> =
            p.mm.chunks.iter().map(|c| (pages.slice(c), c)).collect();
        let total: u64 = lens.iter().sum();
        if total >= 32 << 20 && std::thread::available_parallelism().is_ok_and(|n| n.get() > 1) {
            let (a, b) = items.split_at(items.len() / 2);
            std::thread::scope(|s| {
                let other = s.spawn(|| check(b));
                let one = check(a);
                one.and(other.join().expect("checksum thread panicked"))
            })?;
        } else {
            check(&items)?;
        }
        drop(items);
        Ok(pages)
    }

    /// The saved bytes of chunk `c`.
    fn slice(&self, c: &mm::PageChunk) -> &[u8] {
        match self.maps.get(c.file as usize).copied().flatten() {
            // SAFETY: bounds were checked against the file length in `open`.
            Some((addr, _)) => unsafe {
                std::slice::from_raw_parts(addr.cast::<u8>().add(c.offset as usize), c.len as usize)
            },
            None => &[],
        }
    }
}

impl Drop for Pages {
    fn drop(&mut self) {
        for (addr, len) in self.maps.iter().flatten() {
            // SAFETY: unmapping exactly the mappings made in `open`.
            unsafe { libc::munmap(*addr, *len) };
        }
    }
}

/// Restores the image in `opts.dir`.
pub fn restore(opts: &RestoreOptions, progress: &indicatif::ProgressBar) -> Result<Restored> {
    let mut image = Image::read(&opts.dir)?;
    crate::savefiles::put_back_included(&image.dir, &image.inventory.saved_files)?;
    crate::savefiles::relocate(
        &opts.relocate,
        &mut image.processes,
        &mut image.inventory.shared_files,
    );
    if let Some(how) = opts.restore_files {
        let inv = &mut image.inventory;
        crate::savefiles::apply(
            &image.dir,
            &inv.saved_files,
            how,
            &mut image.processes,
            &mut inv.shared_files,
        )?;
    }
    let image = image;
    let root = image.inventory.root_pid;
    let mut pages = Vec::new();
    for p in &image.processes {
        if p.threads.first().map(|t| t.tid) != Some(p.pid) {
            return Err(Error::bad_image(
                image.dir.join(crate::image::META_FILE),
                format!("pid {}: the main thread is not first", p.pid),
            ));
        }
        match files::verify_unchanged(p.pid, &p.files, &image.inventory.shared_files) {
            Err(Error::Restore(why)) if opts.allow_changed_files => {
                tracing::warn!("{why} (restoring anyway: --allow-changed-files)")
            }
            r => r?,
        }
        progress.set_message(format!("pid {}: checking pages", p.pid));
        pages.push(Pages::open(&image.dir, p)?);
    }
    let plans = plan_tree(&image)?;
    if opts.pidns {
        return restore_in_pidns(&image, &plans, &pages, opts, progress);
    }
    if !opts.detach {
        restore_tree(&image, &plans, &pages, opts, progress, false)?;
        return Ok(Restored::Child { pid: root });
    }
    // Detached: an intermediate process restores and exits, so the restored
    // tree is reparented to init (or the nearest subreaper).
    let (rd, wr) = nix::unistd::pipe().map_err(|e| Error::sys(0, "pipe", e))?;
    // SAFETY: crest is single-threaded here; the child only runs the restore and exits.
    match unsafe { nix::unistd::fork() }.map_err(|e| Error::sys(0, "fork", e))? {
        nix::unistd::ForkResult::Child => {
            drop(rd);
            let msg = match restore_tree(&image, &plans, &pages, opts, progress, false) {
                Ok(()) => "ok".to_string(),
                Err(e) => format!("err {} {e}", e.exit_code()),
            };
            let _ = nix::unistd::write(&wr, msg.as_bytes());
            // SAFETY: _exit skips atexit handlers and destructors the parent owns.
            unsafe { libc::_exit(0) }
        }
        nix::unistd::ForkResult::Parent { child } => {
            drop(wr);
            let mut msg = String::new();
            use std::io::Read;
            let _ = File::from(rd).read_to_string(&mut msg);
            let _ = waitpid(child, None);
            if msg == "ok" {
                return Ok(Restored::Detached { pid: root });
            }
            let rest = msg.strip_prefix("err ").unwrap_or("1 restore helper died");
            let (code, text) = rest.split_once(' ').unwrap_or(("1", rest));
            Err(if code == "3" {
                Error::Unsupported {
                    pid: root,
                    what: text
                        .trim_start_matches(&format!("pid {root}: "))
                        .trim_end_matches(": not supported yet")
                        .to_string(),
                }
            } else {
                Error::Restore(text.to_string())
            })
        }
    }
}

/// Everything one restore child needs, computed before any clone.
struct ChildPlan {
    pid: i32,
    /// Call setsid() first: it leads its session.
    session_leader: bool,
    /// Indices (into the plan list) of the live children it forks.
    children: Vec<usize>,
    /// Processes whose parent is outside the image (orphans reparented to init
    /// or a subreaper): the root creates each through a helper that exits.
    orphans: Vec<usize>,
    /// Sessions whose leader had exited, with the members that entered them
    /// from this process: a helper takes the leader's PID, calls setsid(),
    /// forks them and exits, so they are reparented to this process.
    lost_sessions: Vec<(i32, Vec<usize>)>,
    /// Created through a helper that exits (orphans, lost-session members).
    reparented: bool,
    /// Process groups whose leader had exited, in this process's session: a
    /// holder with the leader's PID leads each until the restorer has joined
    /// every member to it, then is killed.
    lost_groups: Vec<i32>,
    /// Was a child subreaper: must be one before lost-session helpers exit.
    subreaper: bool,
    /// A session leader's controlling terminal: the shared slot of a slave
    /// of that pty, made the controlling terminal right after setsid().
    ctty_slot: Option<i32>,
    /// Zombie children it forks: (pid, wait status, own group, own session, name).
    zombies: Vec<(i32, i32, bool, bool, CString)>,
    fds: Vec<files::FdImage>,
    /// Files to keep open for mmap, the fd each goes to, and whether for writing.
    map_files: Vec<(CString, i32, bool)>,
    exe: (CString, i32, bool),
    err_fd: i32,
    cwd: CString,
    umask: u32,
    personality: u32,
    comm: CString,
    rlimits: Vec<task::Rlimit>,
    sigactions: Vec<task::SigAction>,
    altstack: Option<task::AltStack>,
    thread_pending: Vec<task::SigInfo>,
    shared_pending: Vec<task::SigInfo>,
    trampoline: u64,
    /// Shared open files sit at `shared_base + id` in every restore child,
    /// inherited from the restorer, until each process places its own.
    shared_base: i32,
    shared_count: i32,
}

const TRAMPOLINE_LEN: u64 = 2 * PAGE_SIZE;

/// Plans every process of the image, in image order (parents first).
fn plan_tree(image: &Image) -> Result<Vec<ChildPlan>> {
    let base = shared_base(image);
    warn_unraisable_limits(image);
    let own_maps = proc::maps(std::process::id() as i32)?;
    let known = |pid: i32| image.processes.iter().any(|q| q.pid == pid);
    let sid_of = |pid: i32| image.processes.iter().find(|q| q.pid == pid).map(|q| q.sid);
    // A member of a session whose leader exited, whose parent is not in it.
    let enters_lost = |q: &ProcessImage| {
        image.inventory.lost_session_leaders.contains(&q.sid) && sid_of(q.ppid) != Some(q.sid)
    };
    let mut plans = Vec::new();
    for p in &image.processes {
        let thread = &p.threads[0];
        let (file_fds, exe_fd) = helper_fds(p, &image.inventory.shared_files, base)?;
        let cstr = |s: &str, what: &str| {
            CString::new(s).map_err(|_| Error::Restore(format!("pid {}: bad {what} {s:?}", p.pid)))
        };
        let map_files = file_fds
            .iter()
            .map(|(path, fd, writable)| Ok((cstr(path, "path")?, *fd, *writable)))
            .collect::<Result<Vec<_>>>()?;
        let mut taken: Vec<(u64, u64)> = own_maps.iter().map(|m| (m.start, m.end)).collect();
        taken.extend(p.mm.vmas.iter().map(|v| (v.start, v.end)));
        let trampoline = mm::find_gap(&taken, TRAMPOLINE_LEN, 0x10_0000).ok_or_else(|| {
            Error::Restore(format!(
                "pid {}: no free address range for the restore trampoline",
                p.pid
            ))
        })?;
        let children = image
            .processes
            .iter()
            .enumerate()
            .filter(|(_, c)| {
                c.ppid == p.pid && c.pid != image.inventory.root_pid && !enters_lost(c)
            })
            .map(|(i, _)| i)
            .collect();
        let is_root = p.pid == image.inventory.root_pid;
        let orphans = if is_root {
            image
                .processes
                .iter()
                .enumerate()
                .filter(|(_, q)| q.pid != p.pid && !known(q.ppid) && !enters_lost(q))
                .map(|(i, _)| i)
                .collect()
        } else {
            Vec::new()
        };
        let lost_sessions = image
            .inventory
            .lost_session_leaders
            .iter()
            .map(|&sid| {
                let members = image
                    .processes
                    .iter()
                    .enumerate()
                    .filter(|(_, q)| {
                        q.sid == sid
                            && enters_lost(q)
                            && (q.ppid == p.pid || (is_root && !known(q.ppid)))
                    })
                    .map(|(i, _)| i)
                    .collect::<Vec<_>>();
                (sid, members)
            })
            .filter(|(_, members)| !members.is_empty())
            .collect();
        let reparented = p.pid != image.inventory.root_pid && (!known(p.ppid) || enters_lost(p));
        let zombies = image
            .inventory
            .zombies
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
        plans.push(ChildPlan {
            pid: p.pid,
            session_leader: p.sid == p.pid,
            children,
            orphans,
            lost_sessions,
            reparented,
            lost_groups: image
                .inventory
                .lost_group_leaders
                .iter()
                .filter(|g| {
                    let forker = image
                        .processes
                        .iter()
                        .position(|q| q.sid == g.sid)
                        .unwrap_or(0);
                    image.processes[forker].pid == p.pid
                })
                .map(|g| g.pgid)
                .collect(),
            subreaper: p.state.child_subreaper,
            ctty_slot: p.ctty.and_then(|index| {
                image
                    .inventory
                    .shared_files
                    .iter()
                    .find_map(|sf| match &sf.file {
                        FdKind::Pty(e) if !e.master && e.index == index => {
                            Some(base + sf.id as i32)
                        }
                        _ => None,
                    })
            }),
            zombies,
            fds: p.files.fds.clone(),
            map_files,
            exe: (cstr(&p.mm.exe, "exe")?, exe_fd, false),
            err_fd: exe_fd + 1,
            cwd: cstr(&p.files.cwd, "cwd")?,
            umask: p.state.umask,
            personality: p.state.personality,
            comm: cstr(&p.state.comm, "comm")?,
            rlimits: p.state.rlimits.clone(),
            sigactions: p.state.sigactions.clone(),
            altstack: thread.altstack,
            thread_pending: thread.pending.clone(),
            shared_pending: p.state.shared_pending.clone(),
            trampoline,
            shared_base: 0,
            shared_count: image.inventory.shared_files.len() as i32,
        });
    }
    for p in &mut plans {
        debug_assert!(p.err_fd < base);
        p.shared_base = base;
    }
    Ok(plans)
}

/// Says which hard rlimits the restore cannot give back: raising a hard limit
/// above crest's own needs CAP_SYS_RESOURCE (root here may lack it); the
/// restored process then keeps crest's hard limit, its soft limit capped to it.
fn warn_unraisable_limits(image: &Image) {
    for p in &image.processes {
        for l in &p.state.rlimits {
            let mut have = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: getrlimit writes into a struct we own.
            unsafe { libc::getrlimit(l.resource as _, &mut have) };
            if l.hard > have.rlim_max {
                tracing::warn!(
                    pid = p.pid,
                    resource = l.resource,
                    "hard rlimit {} is above crest's own {}: restored as {} unless crest holds CAP_SYS_RESOURCE",
                    l.hard,
                    have.rlim_max,
                    have.rlim_max
                );
            }
        }
    }
}

/// Kills a half-restored tree: the root we created (its descendants follow
/// through PR_SET_PDEATHSIG) and every process we already seized (whose
/// pdeathsig may already be the restored one). Never a process we did not create.
struct TreeGuard {
    pids: Vec<i32>,
    armed: bool,
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

/// Creates the whole tree (each process forks its own children), then rebuilds
/// every process through ptrace and releases them all together.
/// Restores the tree under a new PID namespace: crest's child becomes its
/// init (PID 1), restores the tree there (the root is its child, every
/// process gets its original PID inside), reports, and then reaps until the
/// namespace is empty, exiting with the root's status.
fn restore_in_pidns(
    image: &Image,
    plans: &[ChildPlan],
    pages: &[Pages],
    opts: &RestoreOptions,
    progress: &indicatif::ProgressBar,
) -> Result<Restored> {
    let root = image.inventory.root_pid;
    let (rd, wr) = nix::unistd::pipe().map_err(|e| Error::sys(0, "pipe", e))?;
    let args = CloneArgs {
        flags: libc::CLONE_NEWPID as u64,
        exit_signal: libc::SIGCHLD as u64,
        ..Default::default()
    };
    // SAFETY: clone3 without CLONE_VM behaves like fork; the child runs the
    // restore and the namespace's init loop and never returns.
    let init = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if init < 0 {
        let e = nix::errno::Errno::last();
        return Err(Error::Restore(format!(
            "cannot create a PID namespace (clone3 CLONE_NEWPID): {e}"
        )));
    }
    if init == 0 {
        drop(rd);
        let msg = match restore_tree(image, plans, pages, opts, progress, true) {
            Ok(()) => "ok".to_string(),
            Err(e) => format!("err {} {e}", e.exit_code()),
        };
        let _ = nix::unistd::write(&wr, msg.as_bytes());
        pidns_init(root, msg == "ok");
    }
    drop(wr);
    let init = init as i32;
    let mut msg = String::new();
    use std::io::Read;
    let _ = File::from(rd).read_to_string(&mut msg);
    if msg != "ok" {
        let _ = waitpid(nix::unistd::Pid::from_raw(init), None);
        let rest = msg
            .strip_prefix("err ")
            .unwrap_or("1 the namespace's init died");
        let (_, text) = rest.split_once(' ').unwrap_or(("1", rest));
        return Err(Error::Restore(format!("in a new PID namespace: {text}")));
    }
    // The root as seen from here: init's child whose innermost PID is root.
    let pid = std::fs::read_dir("/proc")
        .map_err(|e| Error::io("/proc", e))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .find(|&pid| {
            let status = proc::read(pid, "status").unwrap_or_default();
            proc::status_field(&status, "PPid") == Some(init.to_string().as_str())
                && proc::status_field(&status, "NSpid").and_then(|v| v.split_whitespace().last())
                    == Some(root.to_string().as_str())
        })
        .ok_or_else(|| {
            Error::Restore(format!(
                "pid {root}: restored in a new PID namespace, but not found under its init {init}"
            ))
        })?;
    Ok(Restored::InPidns {
        pid,
        init,
        detached: opts.detach,
    })
}

/// The namespace's init once the tree runs: hold nothing of the tree's
/// (descriptors would keep pipes and files open), reap every process, and
/// exit with the root's status when the namespace is empty.
fn pidns_init(root: i32, restored: bool) -> ! {
    // SAFETY: plain syscalls on ourselves; this process never returns.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            for fd in 0..3 {
                libc::dup2(null, fd);
            }
        }
        libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
        if !restored {
            libc::_exit(1);
        }
        let mut code = 0;
        loop {
            let mut status = 0;
            let pid = libc::waitpid(-1, &mut status, 0);
            if pid < 0 {
                if nix::errno::Errno::last() == nix::errno::Errno::EINTR {
                    continue;
                }
                libc::_exit(code);
            }
            if pid == root {
                code = if libc::WIFEXITED(status) {
                    libc::WEXITSTATUS(status)
                } else {
                    128 + libc::WTERMSIG(status)
                };
            }
        }
    }
}

fn restore_tree(
    image: &Image,
    plans: &[ChildPlan],
    pages: &[Pages],
    opts: &RestoreOptions,
    progress: &indicatif::ProgressBar,
    new_pidns: bool,
) -> Result<()> {
    let mut report = [0i32; 2];
    // SAFETY: pipe2 writes two fds into the array.
    if unsafe { libc::pipe2(report.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(Error::sys(0, "pipe2", nix::errno::Errno::last()));
    }
    // SAFETY: both fds are fresh and owned by us from here on.
    let (rd, wr) = unsafe {
        (
            OwnedFd::from_raw_fd(report[0]),
            OwnedFd::from_raw_fd(report[1]),
        )
    };
    let deadline = Instant::now() + opts.pid_wait;
    let port_deadline = Instant::now() + opts.port_wait;
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
    // Reserve every shared slot first, so that the pipes, sockets and
    // connections created below never get a slot's number: placing a shared
    // file there would close one of them under its owner (a job with many
    // shared files, like an MPI tree, reaches that far).
    for sf in &image.inventory.shared_files {
        reserve_slot(plans[0].shared_base + sf.id as i32)?;
    }
    let pipes = crate::pipes::create(&image.inventory.pipes)?;
    let unix_ends: Vec<crate::sockets::UnixEnd> =
        shared_of_kind(&image.inventory.shared_files, |k| match k {
            FdKind::UnixPair(e) => Some(e.clone()),
            _ => None,
        });
    let sockets = crate::sockets::create(&unix_ends)?;
    let mut sysv = crate::sysvshm::prepare(&image.dir, &image.inventory.sysv_shm)?;
    // Pty masters before any slave is opened (opening a slave needs its master).
    let mut ptys = Vec::new();
    for sf in &image.inventory.shared_files {
        if let FdKind::Pty(end) = &sf.file {
            if end.master {
                ptys.push((end.index, crate::tty::create(end)?));
            }
        }
    }
    let mut shared_fds = Vec::new();
    let is_conn = |sf: &&files::SharedFile| matches!(sf.file, FdKind::TcpConn(_) | FdKind::Udp(_));
    for sf in image
        .inventory
        .shared_files
        .iter()
        .filter(|sf| !is_conn(sf))
    {
        let at = plans[0].shared_base + sf.id as i32;
        shared_fds.push(open_shared(
            &image.dir,
            sf,
            at,
            &pipes,
            &sockets,
            &ptys,
            port_deadline,
        )?);
    }
    // TCP connections after the listeners: a listener binds its port normally,
    // an accepted connection on the same port then binds it in repair mode.
    // UDP sockets after them all: their queues are refilled from the senders'
    // addresses, which may be another socket's.
    let conns: Vec<crate::tcp::TcpConn> =
        shared_of_kind(&image.inventory.shared_files, |k| match k {
            FdKind::TcpConn(c) => Some(c.clone()),
            _ => None,
        });
    let mut conns = crate::tcp::create(&conns)?;
    let udp: Vec<crate::udp::UdpSock> =
        shared_of_kind(&image.inventory.shared_files, |k| match k {
            FdKind::Udp(u) => Some(u.clone()),
            _ => None,
        });
    conns.extend(crate::udp::create(&udp)?);
    for sf in image.inventory.shared_files.iter().filter(is_conn) {
        let at = plans[0].shared_base + sf.id as i32;
        shared_fds.push(open_shared(
            &image.dir,
            sf,
            at,
            &pipes,
            &conns,
            &ptys,
            port_deadline,
        )?);
    }
    drop(conns);
    drop(ptys);
    // Every end now sits at its shared slot.
    drop(pipes);
    drop(sockets);
    let mut guard = TreeGuard {
        pids: Vec::new(),
        armed: true,
    };
    let root = clone_with_pid(plans[0].pid, deadline, || {
        process_main(0, plans, wr.as_raw_fd(), deadline)
    })
    .map_err(|e| match e {
        CloneError::Taken(pid) => pid_taken(pid),
        CloneError::Other(e) => e,
    })?;
    debug_assert_eq!(root, plans[0].pid);
    guard.pids.push(root);
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
            if !guard.pids.contains(&pid) {
                guard.pids.push(pid);
            }
        }
    }
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("err ") {
            let (pid, msg) = rest.split_once(' ').unwrap_or((rest, ""));
            if let Some(pid) = msg.strip_prefix("taken ").and_then(|p| p.parse().ok()) {
                return Err(pid_taken(pid));
            }
            return Err(Error::Restore(format!("pid {pid}: {msg}")));
        }
    }
    for p in plans {
        if !text.lines().any(|l| l == format!("ok {}", p.pid)) {
            return Err(Error::Restore(format!(
                "pid {}: the restore child died before it was set up",
                p.pid
            )));
        }
    }

    let mut built = Vec::new();
    for (i, p) in image.processes.iter().enumerate() {
        progress.set_message(format!("pid {}: memory", p.pid));
        let t = Tracee::seize_for_restore(p.pid)?;
        guard.pids.push(p.pid);
        built.push(rebuild(t, image, p, &pages[i], plans[i].trampoline)?);
    }
    crate::sysvshm::finish(&image.inventory.sysv_shm)?;
    // Seals last: every process has mapped its memfds (a write seal forbids
    // writable shared mappings).
    for sf in &image.inventory.shared_files {
        if let FdKind::Memfd(m) = &sf.file {
            crate::memfd::seal(plans[0].shared_base + sf.id as i32, m)?;
        }
    }
    set_process_groups(image, plans)?;
    for g in &image.inventory.lost_group_leaders {
        if guard.pids.contains(&g.pgid) {
            // SAFETY: kill has no memory effects; the holder is ours (it reported).
            unsafe { libc::kill(g.pgid, libc::SIGKILL) };
        }
    }
    for (i, p) in image.processes.iter().enumerate() {
        finish(p, &built[i], plans[i].trampoline)?;
    }
    // libcrest processes learn they were restarted before they run.
    crate::api::restarted(&image.processes)?;
    guard.armed = false;
    sysv.armed = false;
    for (i, p) in image.processes.iter().enumerate() {
        for (n, t) in built[i].iter().enumerate() {
            let sig = (n == 0 && (opts.stop || p.stopped)).then_some(Signal::SIGSTOP);
            t.detach(sig)?;
        }
    }
    // Connections to peers outside the dump are back: let their traffic through.
    if let Some(lock) = &image.inventory.net_lock {
        if let Err(e) = crate::netlock::unlock(lock) {
            tracing::error!(
                "{e}: connections {} stay blocked; remove it with `crest unlock {}`",
                lock.connections.join(", "),
                image.dir.display()
            );
        }
    }
    Ok(())
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
    .map_err(|e| Error::sys(0, "mounting /proc for the namespace", e))
}

/// Holds fd `at` with a close-on-exec /dev/null until [`open_shared`] puts
/// the shared file there (dup3 replaces it atomically).
fn reserve_slot(at: i32) -> Result<()> {
    raise_nofile_for(at);
    // SAFETY: open of a constant path; dup3 and close on fds we own.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
        if null < 0 || libc::dup3(null, at, libc::O_CLOEXEC) < 0 {
            let e = std::io::Error::last_os_error();
            if null >= 0 {
                libc::close(null);
            }
            return Err(Error::Restore(format!(
                "cannot reserve fd {at} for a shared file: {e}"
            )));
        }
        libc::close(null);
    }
    Ok(())
}

/// Raises our own soft fd limit when `at` is beyond it (the hard limit allowing).
fn raise_nofile_for(at: i32) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on ourselves with a struct we own.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        if lim.rlim_cur <= at as u64 && lim.rlim_max > at as u64 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Opens (or, for a pipe end, duplicates) a shared file at exactly `at`,
/// raising our own soft fd limit if needed.
fn open_shared(
    dir: &Path,
    sf: &files::SharedFile,
    at: i32,
    pipes: &[(u64, OwnedFd, OwnedFd)],
    sockets: &[(u64, OwnedFd)],
    ptys: &[(u32, OwnedFd)],
    port_deadline: Instant,
) -> Result<OwnedFd> {
    let (fd, status_flags) = match &sf.file {
        FdKind::Pty(end) if end.master => {
            let (_, m) = ptys.iter().find(|(i, _)| *i == end.index).ok_or_else(|| {
                Error::Restore(format!("pty {}: its master was not created", end.index))
            })?;
            // SAFETY: dup of an fd we own; the copy is owned below.
            let fd = unsafe { libc::fcntl(m.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
            if fd < 0 {
                return Err(Error::Restore(format!(
                    "pty {}: dup: {}",
                    end.index,
                    std::io::Error::last_os_error()
                )));
            }
            (fd, Some(end.flags))
        }
        FdKind::Pty(end) => (
            crate::tty::open_slave_for_restore(end.index)?.into_raw_fd(),
            Some(end.flags),
        ),
        FdKind::Shmem {
            inode,
            size,
            crc32c,
            path,
        } => (
            create_shmem(dir, *inode, *size, *crc32c, path.as_deref())?,
            None,
        ),
        FdKind::TcpListen(l) => (
            crate::sockets::restore_listen(l, port_deadline)?,
            Some(l.flags),
        ),
        FdKind::UnixListen(l) => (crate::sockets::restore_unix_listen(l)?, Some(l.flags)),
        FdKind::Memfd(m) => (
            crate::memfd::create(dir, m)?.into_raw_fd(),
            Some(m.flags & !libc::O_ACCMODE),
        ),
        FdKind::UnixPair(crate::sockets::UnixEnd { inode, flags, .. })
        | FdKind::TcpConn(crate::tcp::TcpConn { inode, flags, .. })
        | FdKind::Udp(crate::udp::UdpSock { inode, flags, .. }) => {
            let (_, sock) = sockets.iter().find(|(i, _)| i == inode).ok_or_else(|| {
                Error::Restore(format!(
                    "shared file {}: socket {inode} was not created",
                    sf.id
                ))
            })?;
            // SAFETY: dup of an fd we own; the copy is owned below.
            let fd = unsafe { libc::fcntl(sock.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
            if fd < 0 {
                return Err(Error::Restore(format!(
                    "socket {inode}: dup: {}",
                    std::io::Error::last_os_error()
                )));
            }
            (fd, Some(*flags))
        }
        FdKind::Pipe {
            inode,
            write,
            flags,
            ..
        } => {
            let (_, r, w) = pipes.iter().find(|(i, _, _)| i == inode).ok_or_else(|| {
                Error::Restore(format!(
                    "shared file {}: pipe {inode} is missing from the image",
                    sf.id
                ))
            })?;
            let end = if *write { w } else { r };
            // SAFETY: dup of an fd we own; the copy is owned below.
            let fd = unsafe { libc::fcntl(end.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
            if fd < 0 {
                return Err(Error::Restore(format!(
                    "pipe {inode}: dup: {}",
                    std::io::Error::last_os_error()
                )));
            }
            (fd, Some(*flags))
        }
        other => {
            let probe = files::FdImage {
                fd: at,
                cloexec: false,
                kind: other.clone(),
            };
            let fd = files::open_for_restore(&probe)
                .map_err(Error::Restore)?
                .ok_or_else(|| {
                    Error::Restore(format!(
                        "shared file {} is neither a file nor a device",
                        sf.id
                    ))
                })?;
            (fd, None)
        }
    };
    raise_nofile_for(at);
    // SAFETY: dup3, fcntl and close on fds we own.
    unsafe {
        if libc::dup3(fd, at, libc::O_CLOEXEC) < 0 {
            let e = std::io::Error::last_os_error();
            libc::close(fd);
            return Err(Error::Restore(format!(
                "shared file {}: cannot place it at fd {at}: {e}",
                sf.id
            )));
        }
        libc::close(fd);
        if let Some(flags) = status_flags {
            // Status flags belong to the open file description, shared by every holder.
            libc::fcntl(at, libc::F_SETFL, flags);
        }
        Ok(OwnedFd::from_raw_fd(at))
    }
}

/// Recreates a shared anonymous memory object from `shmem-INODE.img`: an
/// anonymous shared mapping filled with its contents, reopened through
/// map_files so every process can map the same object (shown as
/// "/dev/zero (deleted)", as before).
fn create_shmem(
    dir: &Path,
    inode: u64,
    size: u64,
    crc: u32,
    original: Option<&str>,
) -> Result<i32> {
    let path = dir.join(format!("shmem-{inode}.img"));
    let data = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
    if data.len() as u64 != size {
        return Err(Error::bad_image(
            &path,
            format!("truncated: {} bytes, {size} expected", data.len()),
        ));
    }
    if crc32c::crc32c(&data) != crc {
        return Err(Error::bad_image(&path, "checksum mismatch"));
    }
    if let Some(file) = original {
        return create_unlinked_shared(file, inode, &data);
    }
    let len = (size as usize).max(PAGE_SIZE as usize);
    // SAFETY: a fresh shared anonymous mapping of `len` bytes that we fill,
    // reopen through map_files and unmap again.
    unsafe {
        let m = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if m == libc::MAP_FAILED {
            return Err(Error::Restore(format!(
                "shared memory {inode}: mmap of {size} bytes: {}",
                std::io::Error::last_os_error()
            )));
        }
        std::ptr::copy_nonoverlapping(data.as_ptr(), m.cast::<u8>(), data.len());
        let link = CString::new(format!(
            "/proc/self/map_files/{:x}-{:x}",
            m as usize,
            m as usize + len
        ))
        .expect("no NUL");
        let fd = libc::open(link.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
        let e = std::io::Error::last_os_error();
        libc::munmap(m, len);
        if fd < 0 {
            return Err(Error::Restore(format!(
                "shared memory {inode}: reopening it: {e}"
            )));
        }
        Ok(fd)
    }
}

/// Recreates an unlinked file that was mapped shared: written under its old
/// name when that is free (so /proc shows the same "PATH (deleted)"), else
/// beside it, and unlinked again; the returned fd keeps it alive.
fn create_unlinked_shared(file: &str, inode: u64, data: &[u8]) -> Result<i32> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let create = |p: &str| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(p)
    };
    let beside = format!("{file}.crest-{inode}");
    let (name, mut f) = match create(file) {
        Ok(f) => (file.to_string(), f),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => (
            beside.clone(),
            create(&beside).map_err(|e| {
                Error::Restore(format!("shared memory {inode}: recreating {beside}: {e}"))
            })?,
        ),
        Err(e) => {
            return Err(Error::Restore(format!(
                "shared memory {inode}: recreating {file}: {e}"
            )))
        }
    };
    let written = f.write_all(data);
    let _ = std::fs::remove_file(&name);
    written.map_err(|e| Error::Restore(format!("shared memory {inode}: writing {name}: {e}")))?;
    Ok(std::os::fd::IntoRawFd::into_raw_fd(f))
}

fn pid_taken(pid: i32) -> Error {
    let comm = proc::read(pid, "comm")
        .map(|c| c.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    Error::Restore(format!(
        "pid {pid} is in use (by '{comm}'); stop that process or restore into a new PID namespace (--pidns)"
    ))
}

/// Joins every process to its group, leaders first. Groups led from outside
/// the image stay the restorer's (as stdio pointing outside is rebound).
fn set_process_groups(image: &Image, plans: &[ChildPlan]) -> Result<()> {
    let in_image = |pgid: i32| image.processes.iter().any(|p| p.pid == pgid);
    for leaders_first in [true, false] {
        for (i, p) in image.processes.iter().enumerate() {
            if p.sid == p.pid || (p.pgid == p.pid) != leaders_first {
                continue; // a session leader already leads its group
            }
            // Members of a lost session joined its group from their helper.
            if image.inventory.lost_session_leaders.contains(&p.pgid) {
                continue;
            }
            let lost_group = image
                .inventory
                .lost_group_leaders
                .iter()
                .any(|g| g.pgid == p.pgid);
            if !leaders_first && !in_image(p.pgid) && !lost_group {
                if image.inventory.zombies.iter().any(|z| z.pid == p.pgid) {
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
            RemoteCall::new(Tracee { pid: p.pid }, plans[i].trampoline, 0).call(
                libc::SYS_setpgid,
                [0, target, 0, 0, 0, 0],
                &format!("setpgid to {}", p.pgid),
            )?;
        }
    }
    Ok(())
}

enum CloneError {
    /// The PID stayed taken until the deadline.
    Taken(i32),
    Other(Error),
}

impl CloneError {
    /// The line restore child `me` reports on the report pipe.
    fn report_line(&self, me: i32) -> String {
        match self {
            CloneError::Taken(pid) => format!("err {me} taken {pid}\n"),
            CloneError::Other(e) => format!("err {me} {e}\n"),
        }
    }
}

/// Forks a child with PID `pid`, retrying while the PID is taken (a process
/// killed by the dump may wait 1-3 s for init to reap it) until `deadline`.
/// The child runs `child` and never returns.
fn clone_with_pid(
    pid: i32,
    deadline: Instant,
    child: impl FnOnce() -> std::convert::Infallible,
) -> std::result::Result<i32, CloneError> {
    let set_tid = [pid];
    let args = CloneArgs {
        exit_signal: libc::SIGCHLD as u64,
        set_tid: set_tid.as_ptr() as u64,
        set_tid_size: 1,
        ..Default::default()
    };
    loop {
        // SAFETY: clone3 without CLONE_VM behaves like fork; the child only runs
        // `child`, which never returns. The caller is single-threaded.
        let r = unsafe {
            libc::syscall(
                libc::SYS_clone3,
                &args as *const CloneArgs,
                std::mem::size_of::<CloneArgs>(),
            )
        };
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
            nix::errno::Errno::ENOSYS => {
                return Err(CloneError::Other(Error::Restore(
                    "this kernel has no clone3 (Linux 5.5+ needed to restore PIDs)".into(),
                )))
            }
            nix::errno::Errno::EPERM => {
                return Err(CloneError::Other(Error::Restore(format!(
                    "pid {pid}: clone3 with set_tid needs CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE"
                ))))
            }
            e => return Err(CloneError::Other(Error::sys(pid, "clone3 with set_tid", e))),
        }
    }
}

/// The body of restore child `idx`: lead its session, fork its children and
/// zombies, set itself up, report, and wait for the restorer to seize it.
fn process_main(
    idx: usize,
    plans: &[ChildPlan],
    report_fd: i32,
    deadline: Instant,
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
        unregister_own_rseq();
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
            process_main(c, plans, err_fd, deadline)
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
                process_main(o, plans, err_fd, deadline)
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
        drop_pending_sigchld();
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
                    process_main(m, plans, err_fd, deadline)
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
                drop_pending_sigchld();
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
                drop_pending_sigchld();
            },
            Err(e) => {
                report(e.report_line(plan.pid));
                // SAFETY: leaving without unwinding.
                unsafe { libc::_exit(1) };
            }
        }
    }
    match child_setup(plan) {
        Ok(()) => report(format!("ok {}\n", plan.pid)),
        Err(msg) => {
            report(format!("err {} {}\n", plan.pid, msg.replace('\n', " ")));
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
    drop_pending_sigchld();
}

/// Drops the SIGCHLD a helper's or a zombie's death queued for us (all our
/// signals are blocked): the dumped process had not had it.
fn drop_pending_sigchld() {
    // SAFETY: sigtimedwait with a zero timeout only dequeues a pending SIGCHLD.
    unsafe {
        let mut chld: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut chld);
        libc::sigaddset(&mut chld, libc::SIGCHLD);
        let zero = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        libc::sigtimedwait(&chld, std::ptr::null_mut(), &zero);
    }
}

/// The descriptors the restore child keeps open for the restorer: one per
/// mapped file or shared memory object (in order of first appearance), then
/// the executable. They sit just above the process's own highest fd and are
/// closed before it resumes. A shared memory object is reopened from the slot
/// the restorer put it in (`/proc/self/fd/SLOT`).
fn helper_fds(
    p: &ProcessImage,
    shared: &[files::SharedFile],
    shared_base: i32,
) -> Result<HelperFds> {
    let base = p.files.fds.iter().map(|f| f.fd).max().unwrap_or(2).max(2) + 1;
    let mut out: Vec<(String, i32, bool)> = Vec::new();
    for v in &p.mm.vmas {
        let (source, writable) = match &v.backing {
            Backing::File {
                path,
                shared,
                may_write,
                ..
            } => (path.clone(), *shared && *may_write),
            Backing::SharedAnon { inode, .. } => (shmem_source(shared, shared_base, *inode)?, true),
            Backing::Memfd {
                inode,
                shared: is_shared,
                may_write,
                ..
            } => (
                memfd_source(shared, shared_base, *inode)?,
                *is_shared && *may_write,
            ),
            _ => continue,
        };
        match out.iter_mut().find(|(q, _, _)| *q == source) {
            Some(entry) => entry.2 |= writable,
            None => out.push((source, base + out.len() as i32, writable)),
        }
    }
    let exe = base + out.len() as i32;
    Ok((out, exe))
}

/// Helper descriptors: (source path, fd, opened for writing) per source, and the exe's fd.
type HelperFds = (Vec<(String, i32, bool)>, i32);

/// Where a restore child reopens shared memory object `inode` from.
fn shmem_source(shared: &[files::SharedFile], shared_base: i32, inode: u64) -> Result<String> {
    let sf = shared
        .iter()
        .find(|s| matches!(s.file, FdKind::Shmem { inode: i, .. } if i == inode))
        .ok_or_else(|| {
            Error::Restore(format!(
                "shared memory object {inode} is missing from the image"
            ))
        })?;
    Ok(format!("/proc/self/fd/{}", shared_base + sf.id as i32))
}

/// Where a restore child reopens memfd `inode` from (to map it).
fn memfd_source(shared: &[files::SharedFile], shared_base: i32, inode: u64) -> Result<String> {
    let sf = shared
        .iter()
        .find(|s| matches!(&s.file, FdKind::Memfd(m) if m.inode == inode))
        .ok_or_else(|| Error::Restore(format!("memfd {inode} is missing from the image")))?;
    Ok(format!("/proc/self/fd/{}", shared_base + sf.id as i32))
}

/// The first fd number free in every restore child above its own descriptors,
/// helper descriptors and report pipe: where shared files are inherited.
fn shared_base(image: &Image) -> i32 {
    image
        .processes
        .iter()
        .map(|p| {
            let max_fd = p.files.fds.iter().map(|f| f.fd).max().unwrap_or(2).max(2);
            let mut sources: Vec<String> = Vec::new();
            for v in &p.mm.vmas {
                let key = match &v.backing {
                    Backing::File { path, .. } => path.clone(),
                    Backing::SharedAnon { inode, .. } => format!("shmem {inode}"),
                    Backing::Memfd { inode, .. } => format!("memfd {inode}"),
                    _ => continue,
                };
                if !sources.contains(&key) {
                    sources.push(key);
                }
            }
            // fds, helper fds, the exe, the report pipe
            max_fd + 1 + sources.len() as i32 + 2
        })
        .max()
        .unwrap_or(8)
}

#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

fn errno_msg(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

/// Drops glibc's rseq registration of this (restore child) thread: its area is
/// in crest's memory, which the restorer unmaps, and the kernel would fault
/// writing to it. Done here rather than through ptrace because kernels before
/// 5.13 cannot report it to a tracer. glibc 2.35+ exports where it is.
fn unregister_own_rseq() {
    const RSEQ_SIG: u32 = 0x5305_3053;
    const RSEQ_FLAG_UNREGISTER: i32 = 1;
    // SAFETY: dlsym only looks symbols up; the values read are glibc's own
    // exported constants, and rseq(2) with the registered area and flag 1 only
    // unregisters it.
    unsafe {
        let offset = libc::dlsym(libc::RTLD_DEFAULT, c"__rseq_offset".as_ptr()).cast::<isize>();
        let size = libc::dlsym(libc::RTLD_DEFAULT, c"__rseq_size".as_ptr()).cast::<u32>();
        if offset.is_null() || size.is_null() || *size == 0 {
            return;
        }
        let tp: u64;
        std::arch::asm!("mov {}, fs:0", out(reg) tp);
        let area = (tp as isize + *offset) as u64;
        // glibc registers 32 bytes even when __rseq_size says less.
        let len = (*size).max(32);
        libc::syscall(libc::SYS_rseq, area, len, RSEQ_FLAG_UNREGISTER, RSEQ_SIG);
    }
}

/// What a restore child sets up on itself: descriptors, cwd, limits, signal
/// dispositions and pending signals, and the trampoline the restorer drives it through.
fn child_setup(plan: &ChildPlan) -> std::result::Result<(), String> {
    // SAFETY: every call below is a plain syscall on our own process with
    // arguments we own; this is the freshly cloned child, single-threaded.
    unsafe {
        // Close everything crest had open except stdio (which may be rebound).
        let open: Vec<i32> = std::fs::read_dir("/proc/self/fd")
            .map_err(|e| format!("/proc/self/fd: {e}"))?
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        let shared = plan.shared_base..plan.shared_base + plan.shared_count;
        for fd in open {
            if fd > 2 && fd != plan.err_fd && !shared.contains(&fd) {
                libc::close(fd);
            }
        }
        for f in &plan.fds {
            match &f.kind {
                FdKind::Dup { of } => {
                    if libc::dup2(*of, f.fd) < 0 {
                        return Err(errno_msg(&format!("fd {}: dup of fd {of}", f.fd)));
                    }
                }
                FdKind::Shared { id } => {
                    if libc::dup2(plan.shared_base + *id as i32, f.fd) < 0 {
                        return Err(errno_msg(&format!("fd {}: shared file {id}", f.fd)));
                    }
                }
                FdKind::Inherited { .. } => {
                    if libc::fcntl(f.fd, libc::F_GETFD) < 0 {
                        // Our own stdio is closed: give it /dev/null rather than nothing.
                        let n = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
                        if n >= 0 && n != f.fd {
                            libc::dup2(n, f.fd);
                            libc::close(n);
                        }
                    }
                }
                FdKind::Epoll { .. } => {
                    // Built below, once every fd it watches is in place. Hold the
                    // number meanwhile so nothing else is opened there.
                    let n = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY);
                    if n != f.fd {
                        libc::dup2(n, f.fd);
                        libc::close(n);
                    }
                }
                _ => {
                    let fd = files::open_for_restore(f)?
                        .ok_or_else(|| format!("fd {}: nothing to open", f.fd))?;
                    if fd != f.fd {
                        if libc::dup2(fd, f.fd) < 0 {
                            return Err(errno_msg(&format!("fd {}: dup2", f.fd)));
                        }
                        libc::close(fd);
                    }
                }
            }
            libc::fcntl(
                f.fd,
                libc::F_SETFD,
                if f.cloexec { libc::FD_CLOEXEC } else { 0 },
            );
        }
        for fd in 0..=2 {
            if !plan.fds.iter().any(|f| f.fd == fd) {
                libc::close(fd);
            }
        }
        // Every epoll instance first, then the watches: an epoll may watch
        // another (libevent and UCX nest them), which must be in place.
        for f in &plan.fds {
            if let FdKind::Epoll { flags, .. } = &f.kind {
                let ep = libc::epoll_create1(libc::EPOLL_CLOEXEC);
                if ep < 0 {
                    return Err(errno_msg(&format!("fd {}: epoll_create1", f.fd)));
                }
                libc::dup2(ep, f.fd);
                libc::close(ep);
                libc::fcntl(f.fd, libc::F_SETFL, *flags);
                libc::fcntl(
                    f.fd,
                    libc::F_SETFD,
                    if f.cloexec { libc::FD_CLOEXEC } else { 0 },
                );
            }
        }
        for f in &plan.fds {
            if let FdKind::Epoll { watches, .. } = &f.kind {
                for w in watches {
                    let mut ev = libc::epoll_event {
                        events: w.events,
                        u64: w.data,
                    };
                    if libc::epoll_ctl(f.fd, libc::EPOLL_CTL_ADD, w.fd, &mut ev) < 0 {
                        return Err(errno_msg(&format!(
                            "fd {}: epoll watch of fd {}",
                            f.fd, w.fd
                        )));
                    }
                }
            }
        }

        for (path, at, writable) in plan.map_files.iter().chain(std::iter::once(&plan.exe)) {
            let mode = if *writable {
                libc::O_RDWR
            } else {
                libc::O_RDONLY
            };
            let fd = libc::open(path.as_ptr(), mode | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(errno_msg(&format!("open {}", path.to_string_lossy())));
            }
            if fd != *at {
                libc::dup3(fd, *at, libc::O_CLOEXEC);
                libc::close(fd);
            }
        }
        // Shared objects not kept (mapped shared memory was reopened above).
        for fd in shared {
            libc::close(fd);
        }
        if libc::chdir(plan.cwd.as_ptr()) < 0 {
            return Err(errno_msg(&format!("cwd {}", plan.cwd.to_string_lossy())));
        }
        libc::umask(plan.umask);
        libc::personality(plan.personality as libc::c_ulong);
        libc::prctl(libc::PR_SET_NAME, plan.comm.as_ptr());
        for l in &plan.rlimits {
            let want = libc::rlimit {
                rlim_cur: l.soft,
                rlim_max: l.hard,
            };
            if libc::setrlimit(l.resource as _, &want) < 0 {
                // Raising a hard limit needs CAP_SYS_RESOURCE: keep ours, cap the soft one.
                let mut have = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                libc::getrlimit(l.resource as _, &mut have);
                let capped = libc::rlimit {
                    rlim_cur: l.soft.min(have.rlim_max),
                    rlim_max: have.rlim_max,
                };
                libc::setrlimit(l.resource as _, &capped);
            }
        }
        for signo in 1..=64 {
            if signo == libc::SIGKILL || signo == libc::SIGSTOP {
                continue;
            }
            let act = plan.sigactions.iter().find(|a| a.signo == signo);
            let k: [u64; 4] = act
                .map(|a| [a.handler, a.flags, a.restorer, a.mask])
                .unwrap_or([0; 4]);
            if libc::syscall(libc::SYS_rt_sigaction, signo, k.as_ptr(), 0usize, 8usize) < 0 {
                return Err(errno_msg(&format!(
                    "sigaction {}",
                    task::signal_name(signo)
                )));
            }
        }
        let ss = match plan.altstack {
            Some(a) => libc::stack_t {
                ss_sp: a.sp as *mut libc::c_void,
                ss_flags: a.flags & !libc::SS_ONSTACK,
                ss_size: a.size as usize,
            },
            None => libc::stack_t {
                ss_sp: std::ptr::null_mut(),
                ss_flags: libc::SS_DISABLE,
                ss_size: 0,
            },
        };
        if libc::sigaltstack(&ss, std::ptr::null_mut()) < 0 {
            return Err(errno_msg("sigaltstack"));
        }
        let me = libc::getpid();
        for (info, shared) in plan
            .thread_pending
            .iter()
            .map(|i| (i, false))
            .chain(plan.shared_pending.iter().map(|i| (i, true)))
        {
            let r = if shared {
                libc::syscall(libc::SYS_rt_sigqueueinfo, me, info.signo(), info.0.as_ptr())
            } else {
                libc::syscall(
                    libc::SYS_rt_tgsigqueueinfo,
                    me,
                    me,
                    info.signo(),
                    info.0.as_ptr(),
                )
            };
            if r < 0 {
                return Err(errno_msg(&format!(
                    "queueing pending {}",
                    task::signal_name(info.signo())
                )));
            }
        }
        let t = libc::mmap(
            plan.trampoline as *mut libc::c_void,
            TRAMPOLINE_LEN as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        );
        if t != plan.trampoline as *mut libc::c_void {
            return Err(errno_msg(&format!(
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

/// Rebuilds the seized restore child `t` into the process of the image, all
/// but the final registers; returns its threads, main thread first.
fn rebuild(
    t: Tracee,
    image: &Image,
    p: &ProcessImage,
    pages: &Pages,
    insn: u64,
) -> Result<Vec<Tracee>> {
    let pid = t.pid;
    let scratch = insn + PAGE_SIZE;
    let remote = RemoteCall::new(t, insn, scratch);
    let call = |nr: i64, args: [u64; 6], what: &str| remote.call(nr, args, what);
    let image_shared = &image.inventory.shared_files;
    let shared_base = shared_base(image);
    let (file_fds, exe_fd) = helper_fds(p, image_shared, shared_base)?;

    // Our rseq area lives in memory we are about to unmap.
    if let Some(r) = t.rseq()? {
        call(
            libc::SYS_rseq,
            [
                r.rseq_abi_pointer,
                r.rseq_abi_size as u64,
                1,
                r.signature as u64,
                0,
                0,
            ],
            "rseq unregister",
        )?;
    }
    let own = proc::maps(pid)?;
    for m in &own {
        if (m.start >= insn && m.end <= insn + TRAMPOLINE_LEN) || m.is_special() {
            continue;
        }
        call(libc::SYS_munmap, [m.start, m.len(), 0, 0, 0, 0], "munmap")?;
    }
    move_specials(p, &own, &remote)?;

    // SysV shm: one shmat per attachment, at its first VMA; the rest of it
    // (split off by mprotect) gets its protection after.
    let sizes: Vec<(i32, u64)> = image
        .inventory
        .sysv_shm
        .iter()
        .map(|s| (s.id, s.size))
        .collect();
    let attachments = crate::sysvshm::attachments(p, &sizes).map_err(|e| {
        Error::bad_image(
            image.dir.join(crate::image::META_FILE),
            format!("pid {pid}: {e}"),
        )
    })?;
    for group in &attachments {
        let vmas: Vec<&mm::Vma> = group.iter().map(|&i| &p.mm.vmas[i]).collect();
        let Backing::SysvShm { shmid, .. } = vmas[0].backing else {
            continue;
        };
        let (shmflg, prot) = crate::sysvshm::attach_flags(&vmas);
        let got = call(
            libc::SYS_shmat,
            [shmid as u64, vmas[0].start, shmflg as u64, 0, 0, 0],
            &format!("shmat of SysV shm segment {shmid} at {:#x}", vmas[0].start),
        )?;
        if got != vmas[0].start {
            return Err(Error::Restore(format!(
                "pid {pid}: SysV shm segment {shmid} attached at {got:#x}, not {:#x}",
                vmas[0].start
            )));
        }
        for v in vmas.iter().filter(|v| v.prot != prot) {
            call(
                libc::SYS_mprotect,
                [v.start, v.len(), v.prot as u64, 0, 0, 0],
                "mprotect of a SysV shm attachment",
            )?;
        }
    }

    for v in &p.mm.vmas {
        let prot = if needs_write_window(p, v) {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            v.prot
        };
        let mut flags = libc::MAP_PRIVATE | libc::MAP_FIXED;
        if v.growsdown {
            flags |= libc::MAP_GROWSDOWN;
        }
        if v.noreserve {
            flags |= libc::MAP_NORESERVE;
        }
        let (fd, off) = match &v.backing {
            Backing::Special { .. } | Backing::SysvShm { .. } => continue,
            Backing::Anon => {
                flags |= libc::MAP_ANONYMOUS;
                (u64::MAX, 0)
            }
            Backing::File {
                path,
                offset,
                shared,
                ..
            } => {
                let fd = file_fds
                    .iter()
                    .find(|(p, _, _)| p == path)
                    .map(|(_, fd, _)| *fd)
                    .expect("every mapped file has a helper fd");
                if *shared {
                    flags = (flags & !libc::MAP_PRIVATE) | libc::MAP_SHARED;
                }
                (fd as u64, *offset)
            }
            Backing::Memfd {
                inode,
                offset,
                shared,
                ..
            } => {
                let source = memfd_source(image_shared, shared_base, *inode)?;
                let fd = file_fds
                    .iter()
                    .find(|(p, _, _)| *p == source)
                    .map(|(_, fd, _)| *fd)
                    .expect("every mapped memfd has a helper fd");
                if *shared {
                    flags = (flags & !libc::MAP_PRIVATE) | libc::MAP_SHARED;
                }
                (fd as u64, *offset)
            }
            Backing::SharedAnon { inode, offset, .. } => {
                let source = shmem_source(image_shared, shared_base, *inode)?;
                let fd = file_fds
                    .iter()
                    .find(|(p, _, _)| *p == source)
                    .map(|(_, fd, _)| *fd)
                    .expect("every shared object has a helper fd");
                flags = (flags & !libc::MAP_PRIVATE) | libc::MAP_SHARED;
                (fd as u64, *offset)
            }
        };
        let got = call(
            libc::SYS_mmap,
            [v.start, v.len(), prot as u64, flags as u64, fd, off],
            &format!("mmap {:#x}-{:#x}", v.start, v.end),
        )?;
        if got != v.start {
            return Err(Error::Restore(format!(
                "pid {pid}: mapping {:#x} landed at {got:#x}",
                v.start
            )));
        }
    }

    write_pages(&remote, p, pages)?;

    for v in
        p.mm.vmas
            .iter()
            .filter(|v| needs_write_window(p, v) && v.prot != libc::PROT_READ | libc::PROT_WRITE)
    {
        call(
            libc::SYS_mprotect,
            [v.start, v.len(), v.prot as u64, 0, 0, 0],
            "mprotect",
        )?;
    }

    for v in &p.mm.vmas {
        for flag in &v.advice {
            match mm::ADVICE_FLAGS.iter().find(|(f, _)| f == flag) {
                Some((_, Some(advice))) => {
                    call(
                        libc::SYS_madvise,
                        [v.start, v.len(), *advice as u64, 0, 0, 0],
                        &format!("madvise {flag}"),
                    )?;
                }
                Some((_, None)) => {
                    call(libc::SYS_mlock2, [v.start, v.len(), 0, 0, 0, 0], "mlock")?;
                }
                None => {}
            }
        }
    }

    // mm fields, auxv and /proc/PID/exe in one PR_SET_MM_MAP.
    let auxv_addr = scratch + 512;
    let auxv: Vec<u8> = p.mm.auxv.iter().flat_map(|v| v.to_ne_bytes()).collect();
    if auxv.len() > 2048 {
        return Err(Error::bad_image(
            Image::pages_path(Path::new(""), pid),
            "auxv is larger than the kernel's",
        ));
    }
    crate::sys::ptrace::write_mem(pid, auxv_addr, &auxv)?;
    // The child's exe is crest's own. When the target is crest too (a benchmark
    // re-executing itself), the kernel refuses to replace an exe that is still
    // mapped (EBUSY), and there is nothing to replace: leave it (-1).
    let same_exe =
        std::fs::read_link("/proc/self/exe").is_ok_and(|e| e.as_os_str() == p.mm.exe.as_str());
    let exe_fd_for_prctl = if same_exe { u32::MAX } else { exe_fd as u32 };
    crate::sys::ptrace::write_mem(
        pid,
        scratch,
        &mm::prctl_mm_map(&p.mm.fields, auxv_addr, p.mm.auxv.len(), exe_fd_for_prctl),
    )?;
    const PR_SET_MM: u64 = 35;
    const PR_SET_MM_MAP: u64 = 14;
    call(
        libc::SYS_prctl,
        [PR_SET_MM, PR_SET_MM_MAP, scratch, 104, 0, 0],
        "prctl(PR_SET_MM_MAP)",
    )?;
    for fd in file_fds.iter().map(|(_, fd, _)| *fd).chain([exe_fd]) {
        call(libc::SYS_close, [fd as u64, 0, 0, 0, 0, 0], "close")?;
    }
    // Only now: closing any descriptor of a file drops our POSIX locks on it.
    crate::locks::restore(&remote, &p.locks)?;

    for it in &p.state.itimers {
        // A periodic timer caught the instant it fired reads 0 left (its signal
        // is among the pending ones); a value of 0 would disarm it: re-arm it
        // for one more interval.
        let value = if it.value_us == 0 {
            it.interval_us
        } else {
            it.value_us
        };
        let v = [
            it.interval_us / 1_000_000,
            it.interval_us % 1_000_000,
            value / 1_000_000,
            value % 1_000_000,
        ];
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_ne_bytes()).collect();
        crate::sys::ptrace::write_mem(pid, scratch, &bytes)?;
        call(
            libc::SYS_setitimer,
            [it.which as u64, scratch, 0, 0, 0, 0],
            "setitimer",
        )?;
    }
    const PR_SET_PDEATHSIG: u64 = 1;
    call(
        libc::SYS_prctl,
        [PR_SET_PDEATHSIG, p.state.pdeathsig as u64, 0, 0, 0, 0],
        "prctl(PR_SET_PDEATHSIG)",
    )?;

    // Threads: created by remote clone3 in the main thread with their original
    // TIDs (before credentials drop, since set_tid needs privilege).
    let mut threads = vec![t];
    for th in &p.threads[1..] {
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
        crate::sys::ptrace::write_mem(pid, args_at, &bytes)?;
        crate::sys::ptrace::write_mem(pid, tid_at, &th.tid.to_ne_bytes())?;
        let tid = remote.clone_thread(args_at, 88)?;
        if tid != th.tid {
            return Err(Error::Restore(format!(
                "pid {pid}: thread {} came back as {tid}",
                th.tid
            )));
        }
        threads.push(Tracee { pid: tid });
    }
    // Signals queued for one thread: each thread queues its own (the kernel lets
    // only the receiving thread itself send a siginfo with si_code >= 0).
    for (th, tt) in p.threads.iter().zip(&threads).skip(1) {
        for info in &th.pending {
            crate::sys::ptrace::write_mem(pid, scratch, &info.0)?;
            remote.on(*tt).call(
                libc::SYS_rt_tgsigqueueinfo,
                [
                    pid as u64,
                    tt.pid as u64,
                    info.signo() as u64,
                    scratch,
                    0,
                    0,
                ],
                "rt_tgsigqueueinfo",
            )?;
        }
    }
    // POSIX timers once every thread they may notify exists.
    crate::timers::restore_posix(&remote, &p.state.posix_timers)?;
    let c = &p.state.creds;
    let last_cap: u64 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(40);
    let groups: Vec<u8> = c.groups.iter().flat_map(|g| g.to_ne_bytes()).collect();
    if groups.len() > 2048 {
        return Err(Error::unsupported(
            pid,
            format!("{} supplementary groups", c.groups.len()),
        ));
    }
    for (th, tt) in p.threads.iter().zip(&threads) {
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
                let ss: Vec<u8> = [a.sp, (a.flags & !libc::SS_ONSTACK) as u32 as u64, a.size]
                    .iter()
                    .flat_map(|v| v.to_ne_bytes())
                    .collect();
                crate::sys::ptrace::write_mem(pid, scratch, &ss)?;
                tcall(
                    libc::SYS_sigaltstack,
                    [scratch, 0, 0, 0, 0, 0],
                    "sigaltstack",
                )?;
            }
            let mut name = th.name.as_bytes().to_vec();
            name.truncate(15);
            name.push(0);
            crate::sys::ptrace::write_mem(pid, scratch, &name)?;
            tcall(
                libc::SYS_prctl,
                [libc::PR_SET_NAME as u64, scratch, 0, 0, 0, 0],
                "prctl(PR_SET_NAME)",
            )?;
        }
        // Credentials are per thread in the kernel: set them in each.
        // The bounding set first (dropping needs CAP_SETPCAP, which we still have).
        for cap in 0..=last_cap {
            if c.cap_bnd & (1u64 << cap) == 0 {
                tcall(
                    libc::SYS_prctl,
                    [libc::PR_CAPBSET_DROP as u64, cap, 0, 0, 0, 0],
                    "prctl(PR_CAPBSET_DROP)",
                )?;
            }
        }
        // Keep capabilities across the uid change when a non-root process had some.
        let keep = c.uids[1] != 0 && c.cap_prm != 0;
        if keep {
            tcall(
                libc::SYS_prctl,
                [libc::PR_SET_KEEPCAPS as u64, 1, 0, 0, 0, 0],
                "prctl(PR_SET_KEEPCAPS)",
            )?;
        }
        crate::sys::ptrace::write_mem(pid, scratch, &groups)?;
        tcall(
            libc::SYS_setgroups,
            [c.groups.len() as u64, scratch, 0, 0, 0, 0],
            "setgroups",
        )?;
        // Groups first: once the uids drop, setting gids is no longer allowed.
        // (Real, effective, saved; the filesystem id follows the effective one.)
        for (nr, ids, what) in [
            (libc::SYS_setresgid, c.gids, "setresgid"),
            (libc::SYS_setresuid, c.uids, "setresuid"),
        ] {
            let [real, effective, saved, _fs] = ids.map(u64::from);
            tcall(nr, [real, effective, saved, 0, 0, 0], what)?;
        }
        // capset: header {version 3, pid 0}, then {effective, permitted, inheritable} x2.
        let mut caps: Vec<u8> = Vec::new();
        caps.extend_from_slice(&0x2008_0522u32.to_ne_bytes());
        caps.extend_from_slice(&0i32.to_ne_bytes());
        for half in [0u32, 32] {
            for v in [c.cap_eff, c.cap_prm, c.cap_inh] {
                caps.extend_from_slice(&((v >> half) as u32).to_ne_bytes());
            }
        }
        crate::sys::ptrace::write_mem(pid, scratch, &caps)?;
        tcall(
            libc::SYS_capset,
            [scratch, scratch + 8, 0, 0, 0, 0],
            "capset",
        )?;
        for cap in 0..=last_cap {
            if c.cap_amb & (1u64 << cap) != 0 {
                tcall(
                    libc::SYS_prctl,
                    [
                        libc::PR_CAP_AMBIENT as u64,
                        libc::PR_CAP_AMBIENT_RAISE as u64,
                        cap,
                        0,
                        0,
                        0,
                    ],
                    "prctl(PR_CAP_AMBIENT_RAISE)",
                )?;
            }
        }
        if keep {
            tcall(
                libc::SYS_prctl,
                [libc::PR_SET_KEEPCAPS as u64, 0, 0, 0, 0, 0],
                "prctl(PR_SET_KEEPCAPS)",
            )?;
        }
        if p.state.no_new_privs {
            tcall(
                libc::SYS_prctl,
                [libc::PR_SET_NO_NEW_PRIVS as u64, 1, 0, 0, 0, 0],
                "prctl(PR_SET_NO_NEW_PRIVS)",
            )?;
        }
        tt.set_xstate(&th.xstate)?;
    }
    // After the credentials, which reset it.
    call(
        libc::SYS_prctl,
        [
            libc::PR_SET_DUMPABLE as u64,
            p.state.dumpable as u64,
            0,
            0,
            0,
            0,
        ],
        "prctl(PR_SET_DUMPABLE)",
    )?;
    if p.state.child_subreaper {
        call(
            libc::SYS_prctl,
            [libc::PR_SET_CHILD_SUBREAPER as u64, 1, 0, 0, 0, 0],
            "prctl(PR_SET_CHILD_SUBREAPER)",
        )?;
    }
    Ok(threads)
}

/// Gives every thread its own registers. The main thread's last syscall removes
/// the trampoline it runs from; at its exit stop it gets its registers and
/// never returns into the trampoline.
fn finish(p: &ProcessImage, threads: &[Tracee], insn: u64) -> Result<()> {
    for (th, tt) in p.threads.iter().zip(threads) {
        if let Some(sched) = &th.sched {
            sched.apply(tt.pid)?;
        }
    }
    // Masks last: a pending signal they unblock must not interrupt our syscalls.
    for (th, tt) in p.threads.iter().zip(threads).skip(1) {
        let mut regs = th.regs;
        task::resume_interrupted_syscall(&mut regs, false);
        tt.set_prstatus(&regs.to_user_regs())?;
        tt.set_sigmask(th.sigmask)?;
    }
    let t = threads[0];
    let mut regs = p.threads[0].regs;
    task::resume_interrupted_syscall(&mut regs, false);
    let base = t.regs()?;
    let r = RemoteCall::new(t, insn, 0).leaving_regs(
        libc::SYS_munmap,
        [insn, TRAMPOLINE_LEN, 0, 0, 0, 0],
        &base,
    )?;
    if r != 0 {
        return Err(Error::sys(
            t.pid,
            "remote munmap of the trampoline",
            nix::errno::Errno::from_raw(-r as i32),
        ));
    }
    t.set_prstatus(&regs.to_user_regs())?;
    t.set_sigmask(p.threads[0].sigmask)
}

/// Whether a mapping is mapped writable while its pages are copied in, then
/// protected: file mappings with copy-on-write pages, so that they keep the
/// boundaries they had (mapped read-only at once, the kernel would merge them
/// with a neighbouring read-only mapping of the same file). Anonymous ones get
/// their final protection at once and are written through /proc/PID/mem,
/// which keeps a huge PROT_NONE reservation from being charged to overcommit.
fn needs_write_window(p: &ProcessImage, v: &mm::Vma) -> bool {
    matches!(
        v.backing,
        Backing::File { shared: false, .. } | Backing::Memfd { shared: false, .. }
    ) && v.prot & libc::PROT_WRITE == 0
        && p.mm
            .chunks
            .iter()
            .any(|c| c.vaddr >= v.start && c.vaddr < v.end)
}

/// Moves the child's vDSO and vvar areas to where the dumped process had them.
/// Same kernel: same sizes, so a move is enough. Another layout is refused.
fn move_specials(p: &ProcessImage, own: &[proc::MapsEntry], remote: &RemoteCall) -> Result<()> {
    let pid = remote.pid();
    let call = |nr: i64, args: [u64; 6], what: &str| remote.call(nr, args, what);
    let wanted: Vec<_> =
        p.mm.vmas
            .iter()
            .filter_map(|v| match &v.backing {
                Backing::Special { name } => Some((name.as_str(), v.start, v.len())),
                _ => None,
            })
            .collect();
    let have: Vec<_> = own
        .iter()
        .filter(|m| m.is_special() && m.name != "[vsyscall]")
        .map(|m| (m.name.as_str(), m.start, m.len()))
        .collect();
    let layout = |v: &[(&str, u64, u64)]| {
        v.iter()
            .map(|(n, _, l)| format!("{n} {}K", l / 1024))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut sorted_w: Vec<_> = wanted.iter().map(|(n, _, l)| (*n, *l)).collect();
    let mut sorted_h: Vec<_> = have.iter().map(|(n, _, l)| (*n, *l)).collect();
    sorted_w.sort();
    sorted_h.sort();
    if sorted_w != sorted_h {
        return Err(Error::unsupported(
            pid,
            format!("vDSO layout differs from the dump's kernel (image: {}; here: {}): cross-kernel vDSO", layout(&wanted), layout(&have)),
        ));
    }
    // Two moves: first out of the way of every final address, then into place.
    let mut taken: Vec<(u64, u64)> = own.iter().map(|m| (m.start, m.end)).collect();
    taken.extend(p.mm.vmas.iter().map(|v| (v.start, v.end)));
    let total: u64 = have.iter().map(|h| h.2).sum();
    let mut tmp = mm::find_gap(&taken, total, 0x1000_0000)
        .ok_or_else(|| Error::Restore(format!("pid {pid}: no room to move the vDSO")))?;
    let mut parked = Vec::new();
    for (name, start, len) in &have {
        let flags = (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64;
        call(
            libc::SYS_mremap,
            [*start, *len, *len, flags, tmp, 0],
            &format!("mremap {name}"),
        )?;
        parked.push((*name, tmp, *len));
        tmp += len;
    }
    for (name, at, len) in parked {
        let (_, dest, _) = wanted
            .iter()
            .find(|w| w.0 == name)
            .expect("same names checked above");
        let flags = (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64;
        call(
            libc::SYS_mremap,
            [at, len, len, flags, *dest, 0],
            &format!("mremap {name}"),
        )?;
    }
    Ok(())
}

/// Copies every saved chunk into the child: writable anonymous memory with
/// UFFDIO_COPY where the kernel lets crest (no zeroing, no fault per page),
/// the rest of the writable memory with process_vm_writev in batches of up
/// to 1024 iovecs, each on two threads.
fn write_pages(remote: &RemoteCall, p: &ProcessImage, pages: &Pages) -> Result<()> {
    let pid = remote.pid();
    let lookup = mm::VmaLookup::new(&p.mm.vmas);
    let writable = |addr: u64| {
        lookup
            .containing(addr, 1)
            .is_some_and(|v| v.prot & libc::PROT_WRITE != 0 || needs_write_window(p, v))
    };
    let (direct, forced): (Vec<&mm::PageChunk>, Vec<&mm::PageChunk>) =
        p.mm.chunks.iter().partition(|c| writable(c.vaddr));
    let anon_vma = |addr: u64| {
        lookup
            .containing(addr, 1)
            .filter(|v| matches!(v.backing, Backing::Anon) && v.prot & libc::PROT_WRITE != 0)
    };
    let piece = |c: &&mm::PageChunk| (pages.slice(c), c.vaddr);
    let (anon, other): (Vec<&mm::PageChunk>, Vec<&mm::PageChunk>) = direct
        .into_iter()
        .partition(|c| anon_vma(c.vaddr).is_some());
    let anon_bytes: u64 = anon.iter().map(|c| c.len).sum();
    let mut direct: Vec<(&[u8], u64)> = other.iter().map(piece).collect();
    let anon: Vec<(&[u8], u64)> = anon.iter().map(piece).collect();
    if anon_bytes >= UFFD_COPY_FROM {
        let mut vmas: Vec<(u64, u64)> = anon
            .iter()
            .filter_map(|(_, a)| anon_vma(*a).map(|v| (v.start, v.end)))
            .collect();
        vmas.dedup();
        direct.extend(copy_by_uffd(remote, &vmas, anon)?);
    } else {
        direct.extend(anon);
    }
    in_two(&direct, |h| write_direct(pid, h))?;
    // Read-only and PROT_NONE mappings: a tracer may write them through /proc/PID/mem.
    for c in forced {
        crate::sys::ptrace::write_mem(pid, c.vaddr, pages.slice(c))?;
    }
    Ok(())
}

/// Below this much anonymous memory, making a userfaultfd costs more than
/// it saves.
const UFFD_COPY_FROM: u64 = 8 << 20;

/// Fills `pieces` (in the anonymous mappings `vmas`, fresh and unpopulated)
/// with UFFDIO_COPY on two threads. Returns what it did not copy: all of it
/// when the kernel does not give crest a userfaultfd, the rest of a piece
/// the copy stopped in. The userfaultfd is closed (every range
/// unregistered) before this returns, so what is left can be written
/// normally.
fn copy_by_uffd<'a>(
    remote: &RemoteCall,
    vmas: &[(u64, u64)],
    pieces: Vec<(&'a [u8], u64)>,
) -> Result<Vec<(&'a [u8], u64)>> {
    let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64;
    let t = remote.tracee;
    let Some(fd) = crate::sys::uffd::make_in(remote, flags)? else {
        return Ok(pieces);
    };
    if let Err(e) = crate::sys::uffd::api(&fd, 0) {
        tracing::debug!(pid = t.pid, "UFFDIO_API: {e}");
        return Ok(pieces);
    }
    for &(start, end) in vmas {
        if let Err(e) =
            crate::sys::uffd::register(&fd, start, end, crate::sys::uffd::REGISTER_MODE_MISSING)
        {
            tracing::debug!(pid = t.pid, "UFFDIO_REGISTER {start:#x}-{end:#x}: {e}");
            return Ok(pieces);
        }
    }
    let left = std::sync::Mutex::new(Vec::new());
    in_two(&pieces, |half| {
        for &(data, addr) in half {
            if let Err((done, e)) = crate::sys::uffd::copy(&fd, addr, data) {
                tracing::debug!(pid = t.pid, "UFFDIO_COPY at {:#x}: {e}", addr + done);
                left.lock()
                    .expect("not poisoned")
                    .push((&data[done as usize..], addr + done));
            }
        }
        Ok(())
    })?;
    drop(fd);
    Ok(left.into_inner().expect("not poisoned"))
}

/// Runs `work` over two halves of `pieces` (by bytes) on two threads when
/// there is enough to share and a second CPU: most of the cost is the
/// kernel's per-page work in the target, which runs in parallel.
fn in_two<'a, F>(pieces: &[(&'a [u8], u64)], work: F) -> Result<()>
where
    F: Fn(&[(&'a [u8], u64)]) -> Result<()> + Sync,
{
    let total: usize = pieces.iter().map(|(d, _)| d.len()).sum();
    let mut acc = 0;
    let split = pieces
        .iter()
        .position(|(d, _)| {
            acc += d.len();
            acc * 2 >= total
        })
        .map_or(pieces.len(), |i| i + 1);
    let (a, b) = pieces.split_at(split);
    let parallel =
        total >= 32 << 20 && std::thread::available_parallelism().is_ok_and(|n| n.get() > 1);
    if parallel && !b.is_empty() {
        std::thread::scope(|s| {
            let second = s.spawn(|| work(b));
            let first = work(a);
            first.and(second.join().expect("page writer panicked"))
        })
    } else {
        work(a)?;
        work(b)
    }
}

/// Copies `(data, address)` pieces into writable memory of `pid`, up to 1024
/// per process_vm_writev.
fn write_direct(pid: i32, pieces: &[(&[u8], u64)]) -> Result<()> {
    for batch in pieces.chunks(1024) {
        let local: Vec<std::io::IoSlice> = batch
            .iter()
            .map(|(d, _)| std::io::IoSlice::new(d))
            .collect();
        let remote: Vec<nix::sys::uio::RemoteIoVec> = batch
            .iter()
            .map(|(d, a)| nix::sys::uio::RemoteIoVec {
                base: *a as usize,
                len: d.len(),
            })
            .collect();
        let want: usize = batch.iter().map(|(d, _)| d.len()).sum();
        let n = nix::sys::uio::process_vm_writev(Pid::from_raw(pid), &local, &remote)
            .map_err(|e| Error::sys(pid, "process_vm_writev", e))?;
        if n != want {
            // A short write stops at the first piece that failed: finish piece by
            // piece through /proc/PID/mem, which reports the address that failed.
            for (d, a) in batch {
                crate::sys::ptrace::write_mem(pid, *a, d)?;
            }
        }
    }
    Ok(())
}

/// The shared files of one kind (`pick` says which, and takes its details),
/// in image order.
fn shared_of_kind<T>(shared: &[files::SharedFile], pick: impl Fn(&FdKind) -> Option<T>) -> Vec<T> {
    shared.iter().filter_map(|sf| pick(&sf.file)).collect()
}
