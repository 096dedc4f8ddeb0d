//! The address space: VMAs, page contents, the vDSO, brk and the mm fields.
//!
//! Collect reads `/proc/PID/maps` and `pagemap`, and copies only pages that
//! were ever touched (present or swapped; for private file mappings only the
//! copy-on-write ones) into `pages-PID.img`, page-aligned, in runs ("chunks")
//! each with its own checksum. Restore maps every VMA at its old address and
//! copies the chunks straight from the (mmapped) page file into place.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::sys::proc::{self, pagemap, MapsEntry};
use crate::sys::PAGE_SIZE;

/// What backs a VMA.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Backing {
    /// Private anonymous memory (heap, stack, anonymous mmap).
    Anon,
    /// A mapping of a file. Private: pages the process wrote are in the image.
    /// Shared: its contents live in the file, nothing is saved.
    File {
        path: String,
        offset: u64,
        dev: u64,
        inode: u64,
        #[serde(default)]
        shared: bool,
        /// The mapping may be made writable (VM_MAYWRITE): the file must be
        /// reopened for writing when the mapping is shared.
        #[serde(default)]
        may_write: bool,
    },
    /// Shared anonymous memory (MAP_SHARED|MAP_ANONYMOUS, shared across fork),
    /// or a shared mapping of a file unlinked since (`path`: MPICH's deleted
    /// `/dev/shm/mpich_shar_tmp*` segment, mapped by every rank): the object
    /// `inode` is saved once for the whole dump (see `files::FdKind::Shmem`)
    /// and every process maps the same object again.
    SharedAnon {
        inode: u64,
        offset: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        path: Option<String>,
    },
    /// An attachment (or part of one, split by mprotect) of SysV shm segment
    /// `shmid`, saved once for the whole dump (see `crate::sysvshm`).
    SysvShm {
        shmid: i32,
        /// The key it was created with (its mappings' name, `/SYSV<key>`),
        /// which stays when IPC_RMID makes the segment's key private.
        key: i32,
        offset: u64,
        /// Attached writable (VM_MAYWRITE).
        #[serde(default)]
        may_write: bool,
    },
    /// A mapping of memfd `inode` (saved once for the whole dump, see
    /// `crate::memfd`). Private: pages the process wrote are in the image.
    Memfd {
        inode: u64,
        name: String,
        offset: u64,
        shared: bool,
        may_write: bool,
    },
    /// A mapping the kernel provides (`[vdso]`, `[vvar]`, `[vvar_vclock]`).
    Special { name: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vma {
    pub start: u64,
    pub end: u64,
    /// PROT_* bits.
    pub prot: i32,
    pub backing: Backing,
    /// `[heap]`, `[stack]`, or empty.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// VM_GROWSDOWN (the main stack).
    #[serde(default)]
    pub growsdown: bool,
    /// VM_NORESERVE: mapped with MAP_NORESERVE (not charged to overcommit).
    #[serde(default)]
    pub noreserve: bool,
    /// madvise/mlock state, as `/proc/PID/smaps` VmFlags: dc (MADV_DONTFORK),
    /// wf (MADV_WIPEONFORK), dd (MADV_DONTDUMP), hg/nh (MADV_(NO)HUGEPAGE), lo (mlock).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub advice: Vec<String>,
}

/// The VmFlags that [`Vma::advice`] carries, and how each is set again.
pub const ADVICE_FLAGS: &[(&str, Option<i32>)] = &[
    ("dc", Some(libc::MADV_DONTFORK)),
    ("wf", Some(libc::MADV_WIPEONFORK)),
    ("dd", Some(libc::MADV_DONTDUMP)),
    ("hg", Some(libc::MADV_HUGEPAGE)),
    ("nh", Some(libc::MADV_NOHUGEPAGE)),
    ("lo", None), // mlock
];

impl Vma {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

/// A run of saved pages: `len` bytes for `[vaddr, vaddr+len)` at `offset` in
/// page file `file` ([`crate::image::Image::pages_file_path`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageChunk {
    pub vaddr: u64,
    pub len: u64,
    pub offset: u64,
    pub crc32c: u32,
    #[serde(default, skip_serializing_if = "is_first_file")]
    pub file: u8,
}

fn is_first_file(file: &u8) -> bool {
    *file == 0
}

/// The mm fields PR_SET_MM_MAP restores (from `/proc/PID/stat` and `brk(0)`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MmFields {
    pub start_code: u64,
    pub end_code: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub brk: u64,
    pub start_stack: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MmImage {
    pub vmas: Vec<Vma>,
    pub fields: MmFields,
    pub auxv: Vec<u64>,
    /// `/proc/PID/exe`.
    pub exe: String,
    pub chunks: Vec<PageChunk>,
}

impl MmImage {
    pub fn saved_bytes(&self) -> u64 {
        self.chunks.iter().map(|c| c.len).sum()
    }
}

/// Finds the VMA holding an address in O(log n): images may have tens of
/// thousands of mappings and as many chunks.
pub struct VmaLookup<'a> {
    sorted: Vec<&'a Vma>,
}

impl<'a> VmaLookup<'a> {
    pub fn new(vmas: &'a [Vma]) -> Self {
        let mut sorted: Vec<&Vma> = vmas.iter().collect();
        sorted.sort_by_key(|v| v.start);
        VmaLookup { sorted }
    }

    /// The VMA containing `[addr, addr+len)` entirely, if one does.
    pub fn containing(&self, addr: u64, len: u64) -> Option<&'a Vma> {
        let i = self.sorted.partition_point(|v| v.start <= addr);
        let v = *self.sorted.get(i.checked_sub(1)?)?;
        (addr >= v.start && addr.checked_add(len)? <= v.end).then_some(v)
    }
}

/// Largest chunk: a chunk is checksummed and copied as one piece.
pub(crate) const MAX_CHUNK: u64 = 4 << 20;

/// Classifies the maps of `pid`, refusing what the engine cannot restore yet.
pub fn collect_vmas(
    pid: i32,
    maps: &[MapsEntry],
    vmflags: &[(u64, Vec<String>)],
) -> Result<Vec<Vma>> {
    // By start address: a process may have tens of thousands of mappings.
    let by_start: std::collections::HashMap<u64, &Vec<String>> =
        vmflags.iter().map(|(s, f)| (*s, f)).collect();
    let has_flag = |start: u64, flag: &str| {
        by_start
            .get(&start)
            .is_some_and(|f| f.iter().any(|x| x == flag))
    };
    let mut vmas = Vec::new();
    for m in maps {
        let prot = (if m.read { libc::PROT_READ } else { 0 })
            | (if m.write { libc::PROT_WRITE } else { 0 })
            | (if m.exec { libc::PROT_EXEC } else { 0 });
        let what = || {
            format!(
                "mapping {:#x}-{:#x} {}",
                m.start,
                m.end,
                if m.name.is_empty() {
                    "(anonymous)"
                } else {
                    &m.name
                }
            )
        };
        let backing = if m.name == "[vsyscall]" {
            continue; // fixed by the kernel, the same in every process
        } else if m.is_special() {
            if m.name == "[uprobes]" {
                return Err(Error::unsupported(
                    pid,
                    format!("{} (uprobes are attached)", what()),
                ));
            }
            Backing::Special {
                name: m.name.clone(),
            }
        } else if m.shared && m.deleted && m.name == "/dev/zero" {
            Backing::SharedAnon {
                inode: m.inode,
                offset: m.offset,
                path: None,
            }
        } else if m.shared && m.deleted && is_unlinked_file(&m.name) && m.inode != 0 {
            // An unlinked file mapped shared: nothing else can reach it by
            // name, so its contents are the object's whole state.
            Backing::SharedAnon {
                inode: m.inode,
                offset: m.offset,
                path: Some(m.name.clone()),
            }
        } else if m.shared && m.name.starts_with("/SYSV") {
            Backing::SysvShm {
                shmid: m.inode as i32,
                key: u32::from_str_radix(&m.name["/SYSV".len()..], 16).unwrap_or(0) as i32,
                offset: m.offset,
                may_write: has_flag(m.start, "mw"),
            }
        } else if m.deleted && m.name.starts_with("/memfd:") {
            Backing::Memfd {
                inode: m.inode,
                name: m.name["/memfd:".len()..].to_string(),
                offset: m.offset,
                shared: m.shared,
                may_write: has_flag(m.start, "mw"),
            }
        } else if m.shared
            && (m.deleted
                || !m.name.starts_with('/')
                || (m.name.starts_with("/dev/") && !m.name.starts_with("/dev/shm/"))
                || m.name.starts_with("/SYSV"))
        {
            return Err(Error::unsupported(
                pid,
                format!("{} is shared memory", what()),
            ));
        } else if m.inode != 0 {
            if m.deleted || !m.name.starts_with('/') {
                return Err(Error::unsupported(
                    pid,
                    format!("{} maps a deleted file", what()),
                ));
            }
            Backing::File {
                path: m.name.clone(),
                offset: m.offset,
                dev: ((m.dev_major as u64) << 8) | m.dev_minor as u64,
                inode: m.inode,
                shared: m.shared,
                may_write: has_flag(m.start, "mw"),
            }
        } else {
            Backing::Anon
        };
        let name = if matches!(m.name.as_str(), "[heap]" | "[stack]") {
            m.name.clone()
        } else {
            String::new()
        };
        vmas.push(Vma {
            start: m.start,
            end: m.end,
            prot,
            backing,
            name,
            growsdown: has_flag(m.start, "gd"),
            noreserve: has_flag(m.start, "nr"),
            advice: ADVICE_FLAGS
                .iter()
                .filter(|(f, _)| has_flag(m.start, f))
                .map(|(f, _)| f.to_string())
                .collect(),
        });
    }
    Ok(vmas)
}

/// Whether a "(deleted)" shared mapping's name is a file that was unlinked,
/// rather than a kernel object shown with a made-up path (SysV shm, memfd,
/// shared hugetlb anonymous memory, devices).
fn is_unlinked_file(name: &str) -> bool {
    // Kernel objects show as names right under / (`/i915`, `/SYSV…`).
    name.starts_with('/')
        && name.rfind('/') > Some(0)
        && !name.starts_with("/SYSV")
        && !name.starts_with("/memfd:")
        && !name.starts_with("/anon_hugepage")
        && (!name.starts_with("/dev/") || name.starts_with("/dev/shm/"))
}

/// A run of touched pages to copy, inside one VMA.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Run {
    pub vaddr: u64,
    pub len: u64,
    /// Private file mapping: pages are kept even when all zeros (they differ
    /// from the file).
    pub file_backed: bool,
    pub readable: bool,
}

/// Whether the pages of `vma` go into the page file (private memory), and if
/// so whether it maps a file (only its copy-on-write pages differ from the
/// file, and they are kept even when all zeros).
pub(crate) fn saved_pages_kind(vma: &Vma) -> Option<bool> {
    match &vma.backing {
        Backing::Special { .. }
        | Backing::File { shared: true, .. }
        | Backing::Memfd { shared: true, .. }
        | Backing::SysvShm { .. }
        | Backing::SharedAnon { .. } => None,
        Backing::File { .. } | Backing::Memfd { .. } => Some(true),
        Backing::Anon => Some(false),
    }
}

/// Bytes read from the target per batch (one process_vm_readv), and how
/// many batches may be in flight between the reader and the writer.
const BATCH: usize = 1 << 20;
const BUFFERS: usize = 4;

/// Copies the touched pages of `vmas` from `pid` into its page files in `dir`.
///
/// The touched pages are found with PAGEMAP_SCAN where the kernel has it
/// (cost follows the populated page tables, not the size of the mappings),
/// else by reading `pagemap`.
///
/// With `frozen` (the target seized and stopped, crest's scratch page mapped
/// in it) the pages move through pipes with one copy ([`crate::pagepipe`]).
/// Otherwise, or where the target cannot make a pipe, this thread reads them
/// with process_vm_readv in big batches while a second one writes the
/// previous batch, and a third allocates the file's pages ahead of the
/// writer: on tmpfs, allocation is most of the cost of a write.
pub fn collect_pages(
    pid: i32,
    vmas: &[Vma],
    dir: &Path,
    stats: &mut crate::image::DumpStats,
    frozen: Option<&crate::sys::remote::RemoteCall>,
) -> Result<Vec<PageChunk>> {
    let runs = touched_runs(pid, vmas, stats)?;
    if let Some(remote) = frozen {
        if let Some(copied) = crate::pagepipe::copy_pages(remote, &runs, dir)? {
            stats.pages_written += copied.written_pages;
            stats.pages_skipped += copied.zero_pages;
            return Ok(copied.chunks);
        }
    }
    let pages_path = &crate::image::Image::pages_path(dir, pid);
    let out = crate::image::create_private(pages_path)?;
    let upper: u64 = runs.iter().map(|r| r.len).sum();
    let mut chunks = Vec::new();
    let written = std::sync::atomic::AtomicU64::new(0);
    let result = std::thread::scope(|s| -> Result<u64> {
        let (job_tx, job_rx) =
            std::sync::mpsc::sync_channel::<(Vec<u8>, Vec<(usize, usize)>)>(BUFFERS);
        let (free_tx, free_rx) = std::sync::mpsc::channel::<Vec<u8>>();
        let out = &out;
        let written = &written;
        let allocator = s.spawn(move || preallocate(out, upper, written));
        let writer = s.spawn(move || -> Result<()> {
            let mut w = out;
            for (buf, parts) in job_rx {
                for (from, to) in &parts {
                    w.write_all(&buf[*from..*to])
                        .map_err(|e| Error::io(pages_path, e))?;
                    written.fetch_add((to - from) as u64, std::sync::atomic::Ordering::Relaxed);
                }
                if free_tx.send(buf).is_err() {
                    break;
                }
            }
            Ok(())
        });
        let mut made = 0;
        let mut offset = 0u64;
        let mut read_err = None;
        let mut i = 0;
        while i < runs.len() {
            let first = i;
            let bytes;
            (i, bytes) = next_batch(&runs, first, BATCH);
            let mut buf = if made < BUFFERS {
                made += 1;
                vec![0u8; BATCH.max(bytes)]
            } else {
                match free_rx.recv() {
                    Ok(b) => b,
                    Err(_) => break, // the writer failed: its error is reported below
                }
            };
            if buf.len() < bytes {
                buf.resize(bytes, 0);
            }
            if let Err(e) = read_batch(pid, &runs[first..i], &mut buf[..bytes]) {
                read_err = Some(e);
                break;
            }
            let mut parts = Vec::new();
            let mut at = 0usize;
            for r in &runs[first..i] {
                let data = &buf[at..at + r.len as usize];
                // Anonymous pages that hold only zeros come back as zeros from
                // the fresh mapping at restore: don't write them.
                let nonzero = if r.file_backed {
                    vec![(0, data.len())]
                } else {
                    nonzero_runs(data)
                };
                stats.pages_skipped +=
                    (data.len() - nonzero.iter().map(|x| x.1 - x.0).sum::<usize>()) as u64
                        / PAGE_SIZE;
                for (from, to) in nonzero {
                    let part = &data[from..to];
                    chunks.push(PageChunk {
                        vaddr: r.vaddr + from as u64,
                        len: part.len() as u64,
                        offset,
                        crc32c: crc32c::crc32c(part),
                        file: 0,
                    });
                    offset += part.len() as u64;
                    stats.pages_written += part.len() as u64 / PAGE_SIZE;
                    parts.push((at + from, at + to));
                }
                at += r.len as usize;
            }
            if job_tx.send((buf, parts)).is_err() {
                break;
            }
        }
        drop(job_tx);
        let wrote = writer.join().expect("page writer panicked");
        let allocated = allocator.join().expect("page allocator panicked");
        if let Some(e) = read_err {
            return Err(e);
        }
        wrote?;
        allocated.map_err(|e| Error::io(pages_path, e))?;
        Ok(offset)
    });
    let offset = result?;
    if written.load(std::sync::atomic::Ordering::Relaxed) != offset {
        return Err(Error::io(
            pages_path,
            std::io::Error::other("short write of the page file"),
        ));
    }
    // Pages allocated ahead for what turned out to be zero pages.
    out.set_len(offset).map_err(|e| Error::io(pages_path, e))?;
    Ok(chunks)
}

/// Allocates the page file's blocks (at most `upper` bytes) ahead of the
/// writer, in steps, without changing its size. Best effort: a filesystem
/// without fallocate just leaves allocation to the writes.
fn preallocate(
    out: &File,
    upper: u64,
    written: &std::sync::atomic::AtomicU64,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    const STEP: u64 = 16 << 20;
    // Stay at most this far ahead: allocating further only holds memory early.
    const AHEAD: u64 = 256 << 20;
    let mut at = 0u64;
    while at < upper {
        let w = written.load(std::sync::atomic::Ordering::Relaxed);
        if at > w + AHEAD {
            std::thread::sleep(std::time::Duration::from_micros(200));
            continue;
        }
        let at_least = at.max(w);
        let len = STEP.min(upper - at_least);
        if len == 0 {
            break;
        }
        // SAFETY: fallocate on a file we own; no memory is passed.
        let r = unsafe {
            libc::fallocate(
                out.as_raw_fd(),
                libc::FALLOC_FL_KEEP_SIZE,
                at_least as i64,
                len as i64,
            )
        };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => Ok(()),
                _ => Err(e),
            };
        }
        at = at_least + len;
    }
    Ok(())
}

/// The runs of touched pages of `vmas` (at most [`MAX_CHUNK`] each), counting
/// the untouched ones in `stats`.
pub(crate) fn touched_runs(
    pid: i32,
    vmas: &[Vma],
    stats: &mut crate::image::DumpStats,
) -> Result<Vec<Run>> {
    use proc::pagemap_scan as ps;
    let pm_path = format!("/proc/{pid}/pagemap");
    let pagemap_file = File::open(&pm_path).map_err(|e| Error::io(&pm_path, e))?;
    let mut use_scan = true;
    let mut runs = Vec::new();
    let mut regions = Vec::new();
    let mut entries = Vec::new();
    for vma in vmas {
        let Some(file_backed) = saved_pages_kind(vma) else {
            continue;
        };
        let readable = vma.prot & libc::PROT_READ != 0;
        let mut push = |from: u64, to: u64| {
            let mut a = from;
            while a < to {
                let len = (to - a).min(MAX_CHUNK);
                runs.push(Run {
                    vaddr: a,
                    len,
                    file_backed,
                    readable,
                });
                a += len;
            }
        };
        let mut kept = 0u64;
        if use_scan {
            regions.clear();
            match ps::scan(
                &pagemap_file,
                vma.start,
                vma.end,
                ps::IS_PRESENT | ps::IS_SWAPPED,
                ps::IS_PRESENT | ps::IS_SWAPPED | ps::IS_FILE | ps::IS_PFNZERO,
                &mut regions,
            ) {
                Ok(()) => {
                    for r in &regions {
                        let c = r.categories;
                        // The shared zero page reads as zeros: nothing to save.
                        // In a private file mapping only copy-on-write (not
                        // file) pages differ from the file.
                        let keep = c & ps::IS_SWAPPED != 0
                            || (c & ps::IS_PRESENT != 0
                                && c & ps::IS_PFNZERO == 0
                                && (!file_backed || c & ps::IS_FILE == 0));
                        if keep {
                            push(r.start, r.end);
                            kept += (r.end - r.start) / PAGE_SIZE;
                        }
                    }
                    stats.pages_skipped += vma.len() / PAGE_SIZE - kept;
                    continue;
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTTY) | Some(libc::EINVAL)) => {
                    use_scan = false; // an older kernel: read pagemap
                }
                Err(e) => return Err(Error::io(&pm_path, e)),
            }
        }
        proc::read_pagemap(&pagemap_file, vma.start, vma.end, &mut entries)
            .map_err(|e| Error::io(&pm_path, e))?;
        let keep = |e: u64| {
            if file_backed {
                (e & pagemap::PRESENT != 0 && e & pagemap::FILE_OR_SHARED == 0)
                    || e & pagemap::SWAPPED != 0
            } else {
                e & (pagemap::PRESENT | pagemap::SWAPPED) != 0
            }
        };
        for (first, end) in entry_runs(&entries, keep) {
            push(
                vma.start + first as u64 * PAGE_SIZE,
                vma.start + end as u64 * PAGE_SIZE,
            );
            kept += (end - first) as u64;
        }
        stats.pages_skipped += entries.len() as u64 - kept;
    }
    Ok(runs)
}

/// The index ranges `[first, end)` of consecutive pagemap `entries` for
/// which `want` holds.
pub(crate) fn entry_runs(entries: &[u64], want: impl Fn(u64) -> bool) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < entries.len() {
        if !want(entries[i]) {
            i += 1;
            continue;
        }
        let first = i;
        while i < entries.len() && want(entries[i]) {
            i += 1;
        }
        runs.push((first, i));
    }
    runs
}

/// Reads `runs` of target memory into `buf`, back to back: one
/// process_vm_readv for the readable ones, the rest (and whatever that
/// could not read) through /proc/PID/mem.
pub(crate) fn read_batch(pid: i32, runs: &[Run], buf: &mut [u8]) -> Result<()> {
    let mut done = 0usize;
    if runs.iter().all(|r| r.readable) {
        let mut locals: Vec<std::io::IoSliceMut> = Vec::with_capacity(runs.len());
        let mut rest = &mut buf[..];
        for r in runs {
            let (a, b) = rest.split_at_mut(r.len as usize);
            locals.push(std::io::IoSliceMut::new(a));
            rest = b;
        }
        let remote: Vec<nix::sys::uio::RemoteIoVec> = runs
            .iter()
            .map(|r| nix::sys::uio::RemoteIoVec {
                base: r.vaddr as usize,
                len: r.len as usize,
            })
            .collect();
        // A short read stops at the first run that failed (an odd mapping):
        // that one and the rest go through /proc/PID/mem below.
        done =
            nix::sys::uio::process_vm_readv(nix::unistd::Pid::from_raw(pid), &mut locals, &remote)
                .unwrap_or(0);
    }
    let mut at = 0usize;
    for r in runs {
        let len = r.len as usize;
        if at + len > done {
            let from = done.max(at);
            let skip = (from - at) as u64;
            read_target(pid, r.vaddr + skip, &mut buf[from..at + len], r.readable)?;
            done = at + len;
        }
        at += len;
    }
    Ok(())
}

/// The byte ranges of `data` covering its pages that are not all zeros.
pub(crate) fn nonzero_runs(data: &[u8]) -> Vec<(usize, usize)> {
    let page = PAGE_SIZE as usize;
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, p) in data.chunks(page).enumerate() {
        if p.iter().all(|&b| b == 0) {
            continue;
        }
        let (from, to) = (i * page, i * page + p.len());
        match runs.last_mut() {
            Some(last) if last.1 == from => last.1 = to,
            _ => runs.push((from, to)),
        }
    }
    runs
}

/// The batch of `runs` that starts at `first`, for one `process_vm_readv`:
/// consecutive runs up to `max_bytes` and 1024 iovecs (the kernel's
/// UIO_MAXIOV), or a larger run alone. Returns where it ends and its bytes.
pub(crate) fn next_batch(runs: &[Run], first: usize, max_bytes: usize) -> (usize, usize) {
    let mut end = first;
    let mut bytes = 0usize;
    while end < runs.len() && end - first < 1024 && bytes + runs[end].len as usize <= max_bytes {
        bytes += runs[end].len as usize;
        end += 1;
    }
    if end == first {
        return (first + 1, runs[first].len as usize);
    }
    (end, bytes)
}

/// Reads target memory: `process_vm_readv` where readable, else `/proc/PID/mem`
/// (which a tracer may read through PROT_NONE).
pub(crate) fn read_target(pid: i32, addr: u64, buf: &mut [u8], readable: bool) -> Result<()> {
    if readable {
        let len = buf.len();
        let local = [std::io::IoSliceMut::new(buf)];
        let remote = [nix::sys::uio::RemoteIoVec {
            base: addr as usize,
            len,
        }];
        match nix::sys::uio::process_vm_readv(
            nix::unistd::Pid::from_raw(pid),
            &mut { local },
            &remote,
        ) {
            Ok(n) if n == len => return Ok(()),
            Ok(_) | Err(_) => {} // fall back below: partial reads happen at odd mappings
        }
    }
    crate::sys::ptrace::read_mem(pid, addr, buf)
}

/// Reads the mm fields from `/proc/PID/stat` (fields 26–28 and 45–51).
pub fn parse_stat_mm_fields(stat: &str) -> Option<MmFields> {
    // The comm field may contain spaces and parentheses: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|s| s.parse().unwrap_or(0))
        .collect();
    // rest[0] is field 3 (state); field N is rest[N-3].
    let field = |n: usize| f.get(n - 3).copied();
    Some(MmFields {
        start_code: field(26)?,
        end_code: field(27)?,
        start_stack: field(28)?,
        start_data: field(45)?,
        end_data: field(46)?,
        start_brk: field(47)?,
        brk: 0,
        arg_start: field(48)?,
        arg_end: field(49)?,
        env_start: field(50)?,
        env_end: field(51)?,
    })
}

/// Parses `/proc/PID/auxv` (pairs of native u64) up to and including AT_NULL.
pub fn parse_auxv(bytes: &[u8]) -> Vec<u64> {
    let mut out = Vec::new();
    for pair in bytes.chunks_exact(16) {
        let k = u64::from_ne_bytes(pair[..8].try_into().expect("8 bytes"));
        let v = u64::from_ne_bytes(pair[8..].try_into().expect("8 bytes"));
        out.push(k);
        out.push(v);
        if k == 0 {
            break;
        }
    }
    out
}

/// `struct prctl_mm_map` for PR_SET_MM_MAP, as bytes with `auxv_addr` pointing
/// at the auxv copy in the target.
pub fn prctl_mm_map(fields: &MmFields, auxv_addr: u64, auxv_len: usize, exe_fd: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(104);
    for v in [
        fields.start_code,
        fields.end_code,
        fields.start_data,
        fields.end_data,
        fields.start_brk,
        fields.brk,
        fields.start_stack,
        fields.arg_start,
        fields.arg_end,
        fields.env_start,
        fields.env_end,
        auxv_addr,
    ] {
        b.extend_from_slice(&v.to_ne_bytes());
    }
    b.extend_from_slice(&((auxv_len * 8) as u32).to_ne_bytes());
    b.extend_from_slice(&exe_fd.to_ne_bytes());
    b
}

/// Finds `size` bytes of address space free of every range in `taken`, at or
/// above `from`.
pub fn find_gap(taken: &[(u64, u64)], size: u64, from: u64) -> Option<u64> {
    let mut ranges: Vec<(u64, u64)> = taken.to_vec();
    ranges.sort();
    let mut cand = from;
    for (s, e) in ranges {
        if e <= cand {
            continue;
        }
        if s >= cand + size {
            return Some(cand);
        }
        cand = cand.max(e);
    }
    (cand + size <= 0x7fff_ffff_f000).then_some(cand)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vma_lookup_finds_the_containing_mapping() {
        let vma = |start, end| Vma {
            start,
            end,
            prot: 0,
            backing: Backing::Anon,
            name: String::new(),
            growsdown: false,
            noreserve: false,
            advice: vec![],
        };
        let vmas = [vma(0x5000, 0x8000), vma(0x1000, 0x3000)];
        let l = VmaLookup::new(&vmas);
        assert_eq!(l.containing(0x1000, 0x2000).map(|v| v.start), Some(0x1000));
        assert_eq!(l.containing(0x7000, 0x1000).map(|v| v.start), Some(0x5000));
        assert!(l.containing(0x2000, 0x2000).is_none()); // runs past the end
        assert!(l.containing(0x3000, 0x1000).is_none()); // in the gap
        assert!(l.containing(0x0, 0x1000).is_none());
        assert!(l.containing(0x7000, u64::MAX).is_none());
    }

    #[test]
    fn zero_pages_are_left_out_of_runs() {
        let page = PAGE_SIZE as usize;
        let mut data = vec![0u8; 5 * page];
        data[page + 3] = 1; // page 1
        data[2 * page] = 1; // page 2
        data[4 * page + page - 1] = 1; // page 4
        assert_eq!(
            nonzero_runs(&data),
            vec![(page, 3 * page), (4 * page, 5 * page)]
        );
        assert!(nonzero_runs(&vec![0u8; 2 * page]).is_empty());
    }

    #[test]
    fn stat_fields_parse_despite_parentheses_in_comm() {
        let mut stat = String::from("42 (a) b) S");
        for n in 4..=52 {
            stat.push_str(&format!(" {n}"));
        }
        let f = parse_stat_mm_fields(&stat).unwrap();
        assert_eq!((f.start_code, f.end_code, f.start_stack), (26, 27, 28));
        assert_eq!((f.start_data, f.end_data, f.start_brk), (45, 46, 47));
        assert_eq!(
            (f.arg_start, f.arg_end, f.env_start, f.env_end),
            (48, 49, 50, 51)
        );
        assert!(parse_stat_mm_fields("42 (x) S 1 2").is_none());
    }

    #[test]
    fn auxv_stops_at_at_null() {
        let mut b = Vec::new();
        for v in [6u64, 4096, 0, 0, 99, 99] {
            b.extend_from_slice(&v.to_ne_bytes());
        }
        assert_eq!(parse_auxv(&b), vec![6, 4096, 0, 0]);
    }

    #[test]
    fn prctl_mm_map_is_104_bytes() {
        assert_eq!(prctl_mm_map(&MmFields::default(), 0, 4, 3).len(), 104);
    }

    #[test]
    fn gaps_avoid_every_taken_range() {
        let taken = [(0x10000, 0x20000), (0x21000, 0x30000)];
        assert_eq!(find_gap(&taken, 0x1000, 0x10000), Some(0x20000));
        assert_eq!(find_gap(&taken, 0x2000, 0x10000), Some(0x30000));
        assert_eq!(find_gap(&taken, 0x1000, 0x40000), Some(0x40000));
    }

    #[test]
    fn vsyscall_is_skipped_and_shared_device_memory_refused() {
        let maps = crate::sys::proc::parse_maps(
            "1000-2000 rw-p 00000000 00:00 0 [heap]\nffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0 [vsyscall]\n",
        )
        .unwrap();
        let vmas = collect_vmas(1, &maps, &[]).unwrap();
        assert_eq!(vmas.len(), 1);
        assert_eq!(vmas[0].name, "[heap]");
        let shared =
            crate::sys::proc::parse_maps("1000-2000 rw-s 00000000 00:05 9 /dev/fb0\n").unwrap();
        let err = collect_vmas(7, &shared, &[]).unwrap_err();
        assert!(matches!(err, Error::Unsupported { pid: 7, .. }), "{err}");
        assert!(err.to_string().contains("shared memory"));
        for name in ["/dev/fb0", "/i915"] {
            let m = crate::sys::proc::parse_maps(&format!(
                "1000-2000 rw-s 00000000 00:01 5 {name} (deleted)\n"
            ))
            .unwrap();
            assert!(collect_vmas(7, &m, &[]).is_err(), "{name}");
        }
    }

    /// MPICH's segment: an unlinked /dev/shm file every rank maps shared.
    #[test]
    fn an_unlinked_file_mapped_shared_is_a_shared_object() {
        let maps = crate::sys::proc::parse_maps(
            "7f00000000-7f00001000 rw-s 00000000 00:1a 77 /dev/shm/mpich_shar_tmpAbC (deleted)\n",
        )
        .unwrap();
        let vmas = collect_vmas(1, &maps, &[]).unwrap();
        assert_eq!(
            vmas[0].backing,
            Backing::SharedAnon {
                inode: 77,
                offset: 0,
                path: Some("/dev/shm/mpich_shar_tmpAbC".into())
            }
        );
    }
}
