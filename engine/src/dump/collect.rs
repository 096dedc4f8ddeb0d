//! Collecting: each frozen process ([`collect_process`]), then what the
//! processes share, once all are collected ([`collect_shared`]): which open
//! files they share, pipes, shared memory, memfds, SysV shm, saved files,
//! and the sessions and groups whose leader is gone.

use std::time::Instant;

use crate::dump::freeze::FrozenProcess;
use crate::error::{Error, Result};
use crate::fds::locks::FileLock;
use crate::fds::resolve::{self, ProcFds};
use crate::fds::table::FdTable;
use crate::fds::{self, FileKind, OpenFiles};
use crate::mm::precopy::{Counts, PreCopy};
use crate::mm::{self, Backing};
use crate::model::{DumpStats, ProcessImage};
use crate::net::DumpSockets;
use crate::sys::proc::{self, stat_field, stat_fields, PF_EXITING};
use crate::sys::remote::{find_syscall_insn, RemoteCall};
use crate::sys::PAGE_SIZE;
use crate::task;
use crate::tree::{self, LostGroup, Zombie};

/// What the processes share, resolved once all are collected.
pub(super) struct Shared {
    pub pipes: Vec<fds::pipe::Pipe>,
    pub sysv_shm: Vec<mm::sysvshm::SysvShm>,
    pub saved_files: Vec<fds::savefiles::SavedFile>,
    pub zombies: Vec<Zombie>,
    pub lost_session_leaders: Vec<i32>,
    pub lost_group_leaders: Vec<LostGroup>,
}

/// What the dump asks of [`collect_shared`].
pub(super) struct SharedOptions<'a> {
    pub root: i32,
    pub tcp_established: bool,
    pub verify_files_hash: bool,
    pub save_files: Option<&'a str>,
    pub include_files: &'a [std::path::PathBuf],
}

/// Once every process is collected: resolves the open files they share
/// (ptys and pipes with an end outside, stdio sockets to the outside,
/// descriptions shared across fork), saves the shared memory objects, the
/// memfds and the SysV shm segments into `dir`, the contents of files asked
/// for, refuses sockets whose peer the restore cannot give back, and finds
/// the zombies (`zombie_pids`) and lost session and group leaders.
pub(super) fn collect_shared(
    images: &mut [ProcessImage],
    files: &mut OpenFiles,
    zombie_pids: &[i32],
    dir: &std::path::Path,
    opts: &SharedOptions,
) -> Result<Shared> {
    let root = opts.root;
    let mut procs: Vec<ProcFds> = Vec::new();
    let mut vmas: Vec<(i32, &[mm::Vma])> = Vec::new();
    for p in images.iter_mut() {
        vmas.push((p.pid, &p.mm.vmas));
        procs.push(ProcFds {
            pid: p.pid,
            ctty: p.ctty,
            table: &mut p.files,
        });
    }
    let pipes = resolve::resolve(&mut procs, files, opts.tcp_established)?;
    let unlinked = resolve::unlinked_paths(&procs, files);
    resolve::add_shmem(files, mm::shmem::save(&vmas, &unlinked, dir)?);
    let mapped: Vec<(i32, u64, u64, u64, String)> = vmas
        .iter()
        .flat_map(|(pid, vs)| {
            vs.iter().filter_map(move |v| match &v.backing {
                Backing::Memfd { inode, name, .. } => {
                    Some((*pid, v.start, v.end, *inode, name.clone()))
                }
                _ => None,
            })
        })
        .collect();
    resolve::save_memfds(&mut procs, files, &mapped, dir)?;
    let sysv_shm = mm::sysvshm::collect(&vmas, dir)?;
    if opts.verify_files_hash {
        resolve::record_hashes(&procs, files, root)?;
    }
    let mut saved_files = match opts.save_files {
        Some(glob) => fds::savefiles::save(files, glob, dir)?,
        None => Vec::new(),
    };
    fds::savefiles::include(opts.include_files, dir, &mut saved_files)?;
    resolve::check_peers(&procs, files, opts.tcp_established, root)?;
    resolve::compact(&mut procs, files);
    drop(procs);
    let mut zombies = Vec::new();
    for &pid in zombie_pids {
        zombies.push(Zombie::collect(pid)?);
    }
    let members: Vec<tree::Member> = images.iter().map(ProcessImage::member).collect();
    let lost_session_leaders = tree::check_sessions(&members, &zombies)?;
    let lost_group_leaders = tree::lost_groups(&members, &zombies, &lost_session_leaders);
    Ok(Shared {
        pipes,
        sysv_shm,
        saved_files,
        zombies,
        lost_session_leaders,
        lost_group_leaders,
    })
}

/// An error met while collecting `pid`. If `pid` died meanwhile (it can be
/// killed while frozen), that is the cause to report, whichever call noticed
/// it first: a /proc read, pagemap, ptrace or a remote vmsplice.
pub(super) fn died_instead(pid: i32, e: Error) -> Error {
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
pub(super) struct ProcLocks {
    reader: Option<std::thread::JoinHandle<std::io::Result<String>>>,
    text: String,
}

impl ProcLocks {
    pub fn start() -> ProcLocks {
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
    table: &FdTable,
    files: &OpenFiles,
    collected: &[FileLock],
    locks: &str,
) -> Option<String> {
    let inodes: Vec<u64> = table
        .fds
        .iter()
        .filter(|f| collected.iter().any(|l| l.fd == f.fd))
        .filter_map(|f| match &files.file(f.file).kind {
            FileKind::Regular(r) => Some(r.identity.inode),
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

/// Collects one frozen process: its descriptors (new open files into
/// `files`), locks, threads, process state, mappings and memory (into its
/// page files in `dir`, or the pre-copy's final round), mm fields.
#[allow(clippy::too_many_arguments)]
pub(super) fn collect_process(
    fp: &mut FrozenProcess,
    dir: &std::path::Path,
    files: &mut OpenFiles,
    stats: &mut DumpStats,
    progress: &indicatif::ProgressBar,
    pre_copy: Option<&mut PreCopy>,
    proc_locks: &mut ProcLocks,
    sockets: &mut DumpSockets,
) -> Result<ProcessImage> {
    let pid = fp.pid;
    let t0 = Instant::now();
    let step =
        |done: &str| tracing::debug!(pid, us = t0.elapsed().as_micros() as u64, "collect: {done}");
    let status = proc::read(pid, "status")?;
    let maps = proc::maps(pid)?;
    let table = fds::collect(pid, files, sockets)?;
    step("maps and files");
    let mut locks = Vec::new();
    for f in &table.fds {
        let info = proc::read(pid, &format!("fdinfo/{}", f.fd)).unwrap_or_default();
        locks.extend(
            fds::locks::parse_fdinfo(f.fd, &info)
                .map_err(|why| Error::unsupported(pid, why.to_string()))?,
        );
    }
    if table.root != "/" {
        return Err(Error::unsupported(
            pid,
            format!("root directory {} (chroot)", table.root),
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
    if let Some(lock) = unreachable_lock(pid, &table, files, &locks, proc_locks.text()) {
        return Err(Error::unsupported(
            pid,
            format!("holds a file lock ({lock}) not reachable through an open descriptor"),
        ));
    }
    let smaps = smaps_reader
        .join()
        .unwrap_or_else(|_| panic!("the reader of /proc/{pid}/smaps panicked"))?;
    let vmflags = proc::parse_smaps_vmflags(&smaps);
    let vmas = mm::vma::collect_vmas(pid, &maps, &vmflags)?;
    step("vmas");
    let mem_started = Instant::now();
    progress.set_message(format!("pid {pid}: memory"));
    let pre_copied = match pre_copy {
        Some(p) => {
            let counts = Counts {
                written: &mut stats.pages_written,
                skipped: &mut stats.pages_skipped,
                round: stats.pre_copy.as_mut().and_then(|s| s.rounds.last_mut()),
            };
            p.final_round(pid, &vmas, &vmflags, counts)?
        }
        None => None,
    };
    let chunks = match pre_copied {
        Some(chunks) => chunks,
        None => mm::collect_pages(
            pid,
            &vmas,
            dir,
            &mut stats.pages_written,
            &mut stats.pages_skipped,
            Some(&remote),
        )?,
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
        files: table,
        api: None,
        locks,
        ctty: (stat_field(&f, 6) == pid as i64)
            .then(|| fds::tty::pts_index_of_tty_nr(stat_field(&f, 7)))
            .flatten(),
    })
}
