//! Iterative pre-copy (`crest dump --pre-copy`): memory is copied while the
//! processes run, the pages they write meanwhile are found and copied again,
//! and they are frozen only for a last round that copies what changed since.
//!
//! Two ways to find the written pages:
//! - `uffd-wp` (Linux 6.7+): an asynchronous write-protecting userfaultfd
//!   (`UFFD_FEATURE_WP_ASYNC`: a write to a protected page only clears the
//!   protection, the writer never blocks) registered on the private mappings,
//!   and `PAGEMAP_SCAN`, which lists the pages written since it last
//!   protected them and protects them again in the same walk. A userfaultfd
//!   belongs to the mm of the process that creates it, so crest creates it
//!   inside the target with a remote syscall, takes it with pidfd_getfd and
//!   closes the target's descriptor: the target's fd table is unchanged, and
//!   when crest closes it (or dies) the kernel unregisters it and drops every
//!   protection.
//! - `soft-dirty` (CONFIG_MEM_SOFT_DIRTY, CRIU's way): `clear_refs` 4 clears
//!   the bits, pagemap bit 55 shows the pages written since. Reading the bits
//!   and clearing them is not atomic, so the threads are paused (seized, no
//!   code run) for that moment only, not for the copy.
//!
//! A mapping that appeared or changed between rounds (no longer registered,
//! or soft-dirty as a whole) is copied whole again. The pages go into the page
//! file as a plain dump writes it ([`PageChunk`]s, never overlapping): a later
//! round writes a page some chunk already holds in place and appends the
//! others, and the frozen round drops what is no longer mapped or touched.
//! Each file page's crc32c is kept, so a chunk's checksum is recomputed from
//! its pages' without reading it back (the crc32c of a concatenation is a
//! linear function of the parts').

use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::Instant;

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

use crate::mm::pages::{self as mm, PageChunk, PageStore, Run};
use crate::mm::vma::Vma;
use crate::sys::proc::{self, pagemap, pagemap_scan as ps, start_time, stat_fields};
use crate::sys::ptrace::{Regs, Tracee};
use crate::sys::PAGE_SIZE;

/// What finds the pages written between rounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tracker {
    UffdWp,
    SoftDirty,
}

impl Tracker {
    pub fn name(self) -> &'static str {
        match self {
            Tracker::UffdWp => "uffd-wp",
            Tracker::SoftDirty => "soft-dirty",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreCopyOptions {
    /// Rounds copied while the processes run (at least 1); fewer when the
    /// set of written pages stops shrinking.
    pub rounds: u32,
    /// The tracker to use; `None`: uffd-wp where the kernel has it, else
    /// soft-dirty.
    pub tracker: Option<Tracker>,
}

impl Default for PreCopyOptions {
    fn default() -> Self {
        PreCopyOptions {
            rounds: 3,
            tracker: None,
        }
    }
}

// userfaultfd features and mode (include/uapi/linux/userfaultfd.h); the
// ioctls are in `crate::sys::uffd`.
const UFFD_USER_MODE_ONLY: u64 = 1;
const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;

/// `UFFDIO_API` asking for async write-protection. WP_UNPOPULATED too:
/// without it the kernel does not write-protect anonymous memory for
/// PAGEMAP_SCAN at all (`userfaultfd_wp_use_markers`); crest never protects
/// unpopulated ranges itself, so no page tables are allocated for holes.
fn uffd_api(fd: &OwnedFd) -> std::io::Result<()> {
    crate::sys::uffd::api(fd, UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED)
}

/// `UFFDIO_REGISTER` of `[start, end)` for write-protection.
fn uffd_register(fd: &OwnedFd, start: u64, end: u64) -> std::io::Result<()> {
    crate::sys::uffd::register(fd, start, end, UFFDIO_REGISTER_MODE_WP)
}

/// Whether crest can track writes with an async write-protecting
/// userfaultfd and PAGEMAP_SCAN here; else why not.
fn uffd_wp_available() -> Result<(), NoTracker> {
    let (scan, why) = proc::probe_pagemap_scan();
    if !scan {
        return Err(NoTracker::PagemapScan(why));
    }
    // SAFETY: userfaultfd takes flags and returns a new fd, owned below.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_userfaultfd,
            libc::O_CLOEXEC as u64 | UFFD_USER_MODE_ONLY,
        )
    };
    if fd < 0 {
        return Err(NoTracker::Userfaultfd(std::io::Error::last_os_error()));
    }
    // SAFETY: the fd userfaultfd just returned, owned by nobody else.
    let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
    uffd_api(&fd).map_err(NoTracker::WriteProtect)
}

/// Why a write tracker is not available on this kernel.
#[derive(Debug, thiserror::Error)]
enum NoTracker {
    #[error("PAGEMAP_SCAN: {0}")]
    PagemapScan(String),
    #[error("userfaultfd: {0}")]
    Userfaultfd(std::io::Error),
    #[error("userfaultfd write-protect (async, Linux 6.7+): {0}")]
    WriteProtect(std::io::Error),
    /// Why soft-dirty bits are not there, as the probe says it.
    #[error("{0}")]
    SoftDirty(String),
    #[error("this kernel cannot track written pages (no soft-dirty: {soft}; {uffd})")]
    Neither { soft: String, uffd: Box<NoTracker> },
}

/// Picks the tracker: the one asked for, or the best the kernel has.
pub fn choose_tracker(pid: i32, wanted: Option<Tracker>) -> Result<Tracker> {
    let uffd = || uffd_wp_available();
    let soft = || match proc::probe_soft_dirty() {
        (true, _) => Ok(()),
        (false, why) => Err(why),
    };
    let refuse = |why: NoTracker| Error::unsupported(pid, format!("--pre-copy: {why}"));
    match wanted {
        Some(Tracker::UffdWp) => uffd().map(|()| Tracker::UffdWp).map_err(refuse),
        Some(Tracker::SoftDirty) => soft()
            .map(|()| Tracker::SoftDirty)
            .map_err(|why| refuse(NoTracker::SoftDirty(why))),
        None => match uffd() {
            Ok(()) => Ok(Tracker::UffdWp),
            Err(u) => soft().map(|()| Tracker::SoftDirty).map_err(|soft| {
                refuse(NoTracker::Neither {
                    soft,
                    uffd: Box::new(u),
                })
            }),
        },
    }
}

/// How a pre-copy dump went: the rounds run while the processes ran, then
/// the one while they were frozen (recorded in the image's stats).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreCopyStats {
    /// What found the written pages: `uffd-wp` or `soft-dirty`.
    pub tracker: String,
    pub rounds: Vec<PreCopyRound>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreCopyRound {
    /// Pages copied (written or found dirty) in this round.
    pub pages: u64,
    /// How long the round took, in microseconds.
    pub us: u64,
    /// The last round, copied with every process frozen.
    #[serde(default)]
    pub frozen: bool,
}

/// What the frozen round of one process adds to the dump's figures.
pub struct Counts<'a> {
    pub written: &'a mut u64,
    pub skipped: &'a mut u64,
    /// The frozen round's entry.
    pub round: Option<&'a mut PreCopyRound>,
}

/// The pre-copy state of every process being tracked, between the running
/// rounds and the frozen one. Dropping it closes the userfaultfds: the
/// kernel then unregisters them and drops their protections.
pub struct PreCopy {
    tracker: Tracker,
    procs: Vec<Tracked>,
    /// The userfaultfds of the processes already copied frozen. Closing one
    /// walks the whole address space to drop its protections (40 ms for
    /// 1 GiB), so it waits until they are killed (then there is nothing to
    /// walk) or running again.
    done: Vec<OwnedFd>,
}

impl PreCopy {
    /// Runs the rounds copied while the processes run; `dir` gets their page
    /// files. Processes stopped or exiting are left to the frozen dump.
    pub fn run(
        pids: &[i32],
        dir: &Path,
        opts: &PreCopyOptions,
        progress: &indicatif::ProgressBar,
    ) -> Result<(PreCopy, PreCopyStats)> {
        let root = pids.first().copied().unwrap_or(0);
        let tracker = choose_tracker(root, opts.tracker)?;
        let mut pc = PreCopy {
            tracker,
            procs: Vec::new(),
            done: Vec::new(),
        };
        for &pid in pids {
            let Ok(st) = stat_fields(pid) else { continue };
            // Stopped or dying: nothing to gain from copying it early.
            if st.first().is_none_or(|s| s != "S" && s != "R" && s != "D") {
                continue;
            }
            pc.procs.push(Tracked::start(pid, &st, tracker, dir)?);
        }
        let mut rounds = Vec::new();
        let mut previous = u64::MAX;
        for round in 1..=opts.rounds.max(1) {
            progress.set_message(format!("pre-copy round {round}"));
            let t = Instant::now();
            let mut pages = 0;
            for p in &mut pc.procs {
                pages += p.running_round(tracker)?;
            }
            rounds.push(PreCopyRound {
                pages,
                us: t.elapsed().as_micros() as u64,
                frozen: false,
            });
            tracing::info!(round, pages, "pre-copy round");
            // Another round is worth it only while the written set shrinks.
            if pages >= previous || pages == 0 {
                break;
            }
            previous = pages;
        }
        let stats = PreCopyStats {
            tracker: tracker.name().into(),
            rounds,
        };
        Ok((pc, stats))
    }

    pub fn tracker(&self) -> Tracker {
        self.tracker
    }

    /// The frozen round of `pid` (see [`Tracked::final_round`]): its
    /// chunks, or `None` when it was not tracked (or is no longer the same
    /// process), and then needs a plain dump (its page file is removed).
    /// Counts the pages it writes and skips, and adds them and its time to
    /// the frozen `round`.
    pub fn final_round(
        &mut self,
        pid: i32,
        vmas: &[Vma],
        vmflags: &[(u64, Vec<String>)],
        counts: Counts,
    ) -> Result<Option<Vec<PageChunk>>> {
        let Some(i) = self.procs.iter().position(|p| p.pid == pid) else {
            return Ok(None);
        };
        let mut t = self.procs.remove(i);
        if !stat_fields(pid).is_ok_and(|f| start_time(&f) == t.start_time) {
            let _ = std::fs::remove_file(&t.store.path);
            return Ok(None);
        }
        self.done.extend(t.uffd.take());
        t.final_round(vmas, vmflags, counts).map(Some)
    }
}

fn open_pagemap(pid: i32) -> Result<File> {
    let path = format!("/proc/{pid}/pagemap");
    File::open(&path).map_err(|e| Error::io(&path, e))
}

/// `/proc/PID/smaps` VmFlags by mapping start.
type VmFlags = Vec<(u64, Vec<String>)>;

/// One tracked process.
pub struct Tracked {
    pid: i32,
    tracker: Tracker,
    start_time: u64,
    /// uffd-wp: crest's copy of the userfaultfd made in the process.
    uffd: Option<OwnedFd>,
    /// uffd-wp: the ranges registered; soft-dirty: the private mappings at
    /// the last clear. A mapping inside one of them (and still registered,
    /// or not soft-dirty as a whole) is tracked; any other is copied whole.
    ranges: Vec<(u64, u64)>,
    rounds: u32,
    store: PageStore,
}

/// A private mapping whose pages go into the page file.
struct Private<'a> {
    vma: &'a Vma,
    file_backed: bool,
    tracked: bool,
}

impl Tracked {
    fn start(pid: i32, stat: &[String], tracker: Tracker, dir: &Path) -> Result<Tracked> {
        let uffd = match tracker {
            Tracker::UffdWp => Some(make_uffd(pid)?),
            Tracker::SoftDirty => None,
        };
        Ok(Tracked {
            pid,
            tracker,
            start_time: start_time(stat),
            uffd,
            ranges: Vec::new(),
            rounds: 0,
            store: PageStore::create(crate::mm::pages::page_file(pid, 0).path(dir))?,
        })
    }

    /// The private mappings of `vmas`, each marked tracked or not.
    fn privates<'a>(&self, vmas: &'a [Vma], vmflags: &[(u64, Vec<String>)]) -> Vec<Private<'a>> {
        let flags: std::collections::HashMap<u64, &Vec<String>> =
            vmflags.iter().map(|(s, f)| (*s, f)).collect();
        let has = |v: &Vma, f: &str| {
            flags
                .get(&v.start)
                .is_some_and(|x| x.iter().any(|y| y == f))
        };
        vmas.iter()
            .filter_map(|vma| {
                let file_backed = vma.saved_pages_kind()?;
                let inside = self
                    .ranges
                    .iter()
                    .any(|&(s, e)| s <= vma.start && vma.end <= e);
                let tracked = inside
                    && self.rounds > 0
                    && if self.tracker == Tracker::UffdWp {
                        has(vma, "uw")
                    } else {
                        !has(vma, "sd")
                    };
                Some(Private {
                    vma,
                    file_backed,
                    tracked,
                })
            })
            .collect()
    }

    fn current_vmas(&self) -> Result<(Vec<Vma>, VmFlags)> {
        let maps = proc::maps(self.pid)?;
        let vmflags = proc::parse_smaps_vmflags(&proc::read(self.pid, "smaps")?);
        let vmas = crate::mm::vma::collect_vmas(self.pid, &maps, &vmflags)?;
        Ok((vmas, vmflags))
    }

    /// One round while the process runs; returns the pages copied.
    fn running_round(&mut self, tracker: Tracker) -> Result<u64> {
        let pid = self.pid;
        let (vmas, vmflags) = self.current_vmas()?;
        let mut runs = Vec::new();
        let mut scratch = 0u64;
        match tracker {
            Tracker::UffdWp => {
                let privates = self.privates(&vmas, &vmflags);
                let pm = open_pagemap(pid)?;
                let uffd = self.uffd.as_ref().expect("uffd-wp tracking has a uffd");
                for p in &privates {
                    if !p.tracked {
                        // New (or the first round): register it.
                        match uffd_register(uffd, p.vma.start, p.vma.end) {
                            Ok(()) => self.ranges.push((p.vma.start, p.vma.end)),
                            Err(e) => {
                                // Copied whole, frozen, at the end.
                                tracing::debug!(
                                    pid,
                                    "cannot register {:#x}-{:#x}: {e}",
                                    p.vma.start,
                                    p.vma.end
                                );
                                continue;
                            }
                        }
                    }
                    // An untracked mapping is protected, then every touched
                    // page copied, not only those the scan reports: pages
                    // moved here by mremap may still carry protections from
                    // their old place (kernels before the mremap uffd-wp
                    // fix), which the scan takes as unwritten.
                    let mut protected = Vec::new();
                    let out = if p.tracked { &mut runs } else { &mut protected };
                    match written_regions(&pm, p, out) {
                        Ok(()) if !p.tracked => runs.extend(mm::touched_runs(
                            pid,
                            std::slice::from_ref(p.vma),
                            &mut scratch,
                        )?),
                        Ok(()) => {}
                        // Unregistered or unmapped meanwhile: the next round sees it.
                        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {}
                        Err(e) => return Err(Error::io(format!("/proc/{pid}/pagemap"), e)),
                    }
                }
            }
            Tracker::SoftDirty => {
                let clear = |pid: i32| {
                    let path = format!("/proc/{pid}/clear_refs");
                    std::fs::write(&path, "4").map_err(|e| Error::io(&path, e))
                };
                if self.rounds == 0 {
                    // Everything is copied after the clear: later writes show.
                    self.ranges = vmas.iter().map(|v| (v.start, v.end)).collect();
                    clear(pid)?;
                    runs = mm::touched_runs(pid, &vmas, &mut scratch)?;
                } else {
                    // Reading the bits and clearing them must see no write in
                    // between: pause the threads for that moment.
                    let paused = Paused::pause(pid)?;
                    let (vmas, vmflags) = self.current_vmas()?;
                    let privates = self.privates(&vmas, &vmflags);
                    let pm = open_pagemap(pid)?;
                    let mut entries = Vec::new();
                    for p in &privates {
                        if p.tracked {
                            soft_dirty_runs(&pm, p, &mut entries, &mut runs)
                                .map_err(|e| Error::io(format!("/proc/{pid}/pagemap"), e))?;
                        } else {
                            runs.extend(mm::touched_runs(
                                pid,
                                std::slice::from_ref(p.vma),
                                &mut scratch,
                            )?);
                        }
                    }
                    self.ranges = vmas.iter().map(|v| (v.start, v.end)).collect();
                    clear(pid)?;
                    paused.release()?;
                }
            }
        }
        self.rounds += 1;
        self.store.write_runs(pid, &runs, false)
    }

    /// The frozen round: `vmas` are the process's mappings now (`uffd` was
    /// taken by the caller). Copies what
    /// was written since the last round and every page of a mapping not
    /// tracked, drops what is no longer there, and returns the chunks.
    fn final_round(
        mut self,
        vmas: &[Vma],
        vmflags: &[(u64, Vec<String>)],
        counts: Counts,
    ) -> Result<Vec<PageChunk>> {
        let Counts {
            written: pages_written,
            skipped: pages_skipped,
            round: frozen_round,
        } = counts;
        let pid = self.pid;
        let t = Instant::now();
        let privates = self.privates(vmas, vmflags);
        // Every page the image must hold, and those that changed.
        let mut keep: Vec<Run> = Vec::new();
        let mut dirty: Vec<Run> = Vec::new();
        let mut entries = Vec::new();
        let pm = open_pagemap(pid)?;
        for p in &privates {
            let (k, d) = (keep.len(), dirty.len());
            let r = match (p.tracked, self.tracker == Tracker::UffdWp) {
                (false, _) => Err(std::io::Error::from_raw_os_error(libc::EPERM)),
                (true, true) => written_regions_final(&pm, p, &mut keep, &mut dirty),
                (true, false) => soft_dirty_final(&pm, p, &mut entries, &mut keep, &mut dirty),
            };
            match r {
                Ok(()) => {
                    let kept: u64 = keep[k..].iter().map(|r| r.len / PAGE_SIZE).sum();
                    *pages_skipped += p.vma.len() / PAGE_SIZE - kept;
                }
                // Not tracked (new, changed, or not registered after all): whole.
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                    keep.truncate(k);
                    dirty.truncate(d);
                    let runs = mm::touched_runs(pid, std::slice::from_ref(p.vma), pages_skipped)?;
                    keep.extend_from_slice(&runs);
                    dirty.extend_from_slice(&runs);
                }
                Err(e) => return Err(Error::io(format!("/proc/{pid}/pagemap"), e)),
            }
        }
        let scanned = t.elapsed();
        self.store.retain(&keep);
        // Pages to keep that no chunk holds yet (zero pages skipped before)
        // are read again too: the image must never miss a page.
        dirty.extend(self.store.uncovered(&keep));
        dirty.sort_by_key(|r| r.vaddr);
        let trimmed = t.elapsed();
        let pages = self.store.write_runs(pid, &dirty, true)?;
        let written = t.elapsed();
        *pages_written += pages;
        if let Some(round) = frozen_round.filter(|r| r.frozen) {
            round.pages += pages;
            round.us += t.elapsed().as_micros() as u64;
        }
        let chunks = self.store.finish();
        tracing::debug!(
            pid,
            ?scanned,
            ?trimmed,
            ?written,
            finished = ?t.elapsed(),
            "frozen pre-copy round"
        );
        chunks
    }
}

/// Registers-and-all of one seized thread.
struct PausedThread {
    tracee: Tracee,
    regs: Regs,
    sigmask: u64,
}

/// Every thread of a process seized (ptrace stop), for a moment. Dropping
/// it lets them all go, as they were.
struct Paused {
    threads: Vec<PausedThread>,
    /// Remote syscalls ran in the first thread: it left its syscall-exit
    /// stop, so its interrupted call must be restarted by hand.
    remote: bool,
    released: bool,
}

impl Paused {
    fn pause(pid: i32) -> Result<Paused> {
        let mut p = Paused {
            threads: Vec::new(),
            remote: false,
            released: false,
        };
        // Threads may appear while we seize: again until none is new.
        loop {
            let mut tids: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/task"))
                .map_err(|e| Error::io(format!("/proc/{pid}/task"), e))?
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect();
            tids.sort_unstable_by_key(|&t| (t != pid, t));
            let mut new = false;
            for tid in tids {
                if p.threads.iter().any(|t| t.tracee.pid == tid) {
                    continue;
                }
                match Tracee::seize(tid) {
                    Ok(tracee) => {
                        let regs = tracee.regs()?;
                        let sigmask = tracee.sigmask()?;
                        p.threads.push(PausedThread {
                            tracee,
                            regs,
                            sigmask,
                        });
                        // Signals wait until we are done, rather than stop a remote call.
                        tracee.set_sigmask(!0)?;
                        new = true;
                    }
                    Err(Error::Gone { .. }) if tid != pid => {}
                    Err(e) => return Err(e),
                }
            }
            if !new {
                return Ok(p);
            }
        }
    }

    fn release(mut self) -> Result<()> {
        self.release_all()
    }

    fn release_all(&mut self) -> Result<()> {
        self.released = true;
        let mut first_err = None;
        for (i, t) in self.threads.iter().enumerate() {
            let mut regs = t.regs;
            if i == 0 && self.remote {
                crate::sys::ptrace::resume_interrupted_syscall(&mut regs, true);
            }
            let r = t
                .tracee
                .set_regs(&regs)
                .and_then(|()| t.tracee.set_sigmask(t.sigmask))
                .and_then(|()| t.tracee.detach(None));
            match r {
                Ok(()) | Err(Error::Gone { .. }) => {}
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        if !self.released {
            if let Err(e) = self.release_all() {
                tracing::error!("could not resume every thread after pre-copy: {e}");
            }
        }
    }
}

/// Creates a userfaultfd in `pid` (whose mm it then tracks), takes it into
/// crest and closes the process's descriptor, and enables async
/// write-protection on it.
fn make_uffd(pid: i32) -> Result<OwnedFd> {
    let mut paused = Paused::pause(pid)?;
    let maps = proc::maps(pid)?;
    let insn = crate::sys::remote::find_syscall_insn(pid, &maps)?;
    let main = crate::sys::remote::RemoteCall::new(paused.threads[0].tracee, insn, 0);
    paused.remote = true;
    let flags = libc::O_CLOEXEC as u64 | libc::O_NONBLOCK as u64;
    let fd = match crate::sys::uffd::make_in(&main, flags | UFFD_USER_MODE_ONLY)? {
        Some(fd) => fd,
        // Before 5.11: no user-mode-only flag (root may create one anyway).
        None => crate::sys::uffd::make_in(&main, flags)?.ok_or_else(|| {
            Error::unsupported(
                pid,
                "--pre-copy: userfaultfd() in the process failed (CONFIG_USERFAULTFD, \
                 vm.unprivileged_userfaultfd or a seccomp filter)",
            )
        })?,
    };
    paused.release()?;
    uffd_api(&fd).map_err(|e| {
        Error::unsupported(
            pid,
            format!("--pre-copy: async write-protection on its userfaultfd: {e}"),
        )
    })?;
    Ok(fd)
}

/// Whether a page with these PAGEMAP_SCAN categories goes into the image
/// (the rule of [`mm::touched_runs`]).
fn keep_page(c: u64, file_backed: bool) -> bool {
    c & ps::IS_SWAPPED != 0
        || (c & ps::IS_PRESENT != 0
            && c & ps::IS_PFNZERO == 0
            && (!file_backed || c & ps::IS_FILE == 0))
}

fn push_run(out: &mut Vec<Run>, p: &Private, from: u64, to: u64) {
    let readable = p.vma.prot & libc::PROT_READ != 0;
    let mut a = from;
    while a < to {
        let len = (to - a).min(mm::MAX_CHUNK);
        out.push(Run {
            vaddr: a,
            len,
            file_backed: p.file_backed,
            readable,
        });
        a += len;
    }
}

/// uffd-wp, running: the pages of `p` written since the last scan (all of
/// them the first time), protected again in the same walk.
fn written_regions(pm: &File, p: &Private, out: &mut Vec<Run>) -> std::io::Result<()> {
    let mut regions = Vec::new();
    ps::scan_with(
        pm,
        p.vma.start,
        p.vma.end,
        ps::CHECK_WPASYNC | ps::WP_MATCHING,
        ps::IS_WRITTEN,
        ps::IS_PRESENT | ps::IS_SWAPPED,
        ps::IS_PRESENT | ps::IS_SWAPPED | ps::IS_FILE | ps::IS_PFNZERO,
        &mut regions,
    )?;
    for r in &regions {
        if keep_page(r.categories, p.file_backed) {
            push_run(out, p, r.start, r.end);
        }
    }
    Ok(())
}

/// uffd-wp, frozen: every page of `p` to keep, and those written since.
fn written_regions_final(
    pm: &File,
    p: &Private,
    keep: &mut Vec<Run>,
    dirty: &mut Vec<Run>,
) -> std::io::Result<()> {
    let mut regions = Vec::new();
    ps::scan_with(
        pm,
        p.vma.start,
        p.vma.end,
        ps::CHECK_WPASYNC,
        0,
        ps::IS_PRESENT | ps::IS_SWAPPED,
        ps::IS_WRITTEN | ps::IS_PRESENT | ps::IS_SWAPPED | ps::IS_FILE | ps::IS_PFNZERO,
        &mut regions,
    )?;
    for r in &regions {
        if keep_page(r.categories, p.file_backed) {
            push_run(keep, p, r.start, r.end);
            if r.categories & ps::IS_WRITTEN != 0 {
                push_run(dirty, p, r.start, r.end);
            }
        }
    }
    Ok(())
}

/// Whether a pagemap entry is a page the image holds (as [`mm::touched_runs`]).
fn keep_entry(e: u64, file_backed: bool) -> bool {
    if file_backed {
        (e & pagemap::PRESENT != 0 && e & pagemap::FILE_OR_SHARED == 0) || e & pagemap::SWAPPED != 0
    } else {
        e & (pagemap::PRESENT | pagemap::SWAPPED) != 0
    }
}

/// Appends the runs of consecutive pages of `p` for which `want` holds.
fn entry_runs(entries: &[u64], p: &Private, out: &mut Vec<Run>, want: impl Fn(u64) -> bool) {
    for (first, end) in mm::entry_runs(entries, want) {
        push_run(
            out,
            p,
            p.vma.start + first as u64 * PAGE_SIZE,
            p.vma.start + end as u64 * PAGE_SIZE,
        );
    }
}

/// soft-dirty, paused: the pages of `p` written since the last clear.
fn soft_dirty_runs(
    pm: &File,
    p: &Private,
    entries: &mut Vec<u64>,
    out: &mut Vec<Run>,
) -> std::io::Result<()> {
    proc::read_pagemap(pm, p.vma.start, p.vma.end, entries)?;
    let fb = p.file_backed;
    entry_runs(entries, p, out, |e| {
        keep_entry(e, fb) && e & pagemap::SOFT_DIRTY != 0
    });
    Ok(())
}

/// soft-dirty, frozen: every page of `p` to keep, and those written since.
fn soft_dirty_final(
    pm: &File,
    p: &Private,
    entries: &mut Vec<u64>,
    keep: &mut Vec<Run>,
    dirty: &mut Vec<Run>,
) -> std::io::Result<()> {
    proc::read_pagemap(pm, p.vma.start, p.vma.end, entries)?;
    let fb = p.file_backed;
    entry_runs(entries, p, keep, |e| keep_entry(e, fb));
    entry_runs(entries, p, dirty, |e| {
        keep_entry(e, fb) && e & pagemap::SOFT_DIRTY != 0
    });
    Ok(())
}
