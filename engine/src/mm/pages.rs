//! Pages: the one writer of page files and the one reader of them.
//!
//! A dump copies only pages that were ever touched ([`touched_runs`]: present
//! or swapped; for private file mappings only the copy-on-write ones) into
//! the page file(s) of each process (`pages-PID.img`, and `pages-PID.1.img`
//! when two streams write it), page-aligned, in runs ("chunks",
//! [`PageChunk`]) each with its own checksum; anonymous pages of zeros are
//! holes. [`PageFile`] and [`Written`] are how every copy writes them: by
//! reading the target ([`copy_by_reading`]), through pipes the target fills
//! ([`crate::mm::pagepipe`]), or round by round ([`crate::mm::precopy`]).
//! Restore maps the page files read-only and checks every chunk's checksum
//! before anything is created ([`Pages`]).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::image::Blob;
use crate::mm::vma::{Vma, VmaLookup};
use crate::sys::proc::{self, pagemap};
use crate::sys::PAGE_SIZE;

/// The blob of page file `part` of process `pid`.
pub fn page_file(pid: i32, part: u8) -> Blob {
    Blob::new("pages", pid as u64).part(part)
}

/// A run of saved pages: `len` bytes for `[vaddr, vaddr+len)` at `offset` in
/// page file `file` ([`page_file`]).
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

/// Largest chunk: a chunk is checksummed and copied as one piece.
pub const MAX_CHUNK: u64 = 4 << 20;

/// A run of touched pages to copy, inside one VMA.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    pub vaddr: u64,
    pub len: u64,
    /// Private file mapping: pages are kept even when all zeros (they differ
    /// from the file).
    pub file_backed: bool,
    pub readable: bool,
}

/// A page file being written.
pub struct PageFile {
    pub file: File,
    pub path: PathBuf,
    /// Which file of its process it is (`PageChunk::file`).
    pub part: u8,
}

impl PageFile {
    /// Creates page file `part` of `pid` in `dir`, readable by its owner only.
    pub fn create(dir: &Path, pid: i32, part: u8) -> Result<PageFile> {
        let blob = page_file(pid, part);
        Ok(PageFile {
            file: blob.create(dir)?,
            path: blob.path(dir),
            part,
        })
    }

    pub fn write_at(&self, data: &[u8], offset: u64) -> Result<()> {
        std::os::unix::fs::FileExt::write_all_at(&self.file, data, offset)
            .map_err(|e| Error::io(&self.path, e))
    }

    /// Makes `[offset, offset + len)` a hole (pages of zeros).
    pub fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
        // SAFETY: fallocate on a file we own; no memory is passed.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as i64,
                len as i64,
            )
        };
        if r != 0 {
            return Err(Error::io(&self.path, std::io::Error::last_os_error()));
        }
        Ok(())
    }
}

/// What a copy wrote: its chunks, and the pages written and left out.
#[derive(Debug, Default)]
pub struct Written {
    pub chunks: Vec<PageChunk>,
    pub written_pages: u64,
    pub zero_pages: u64,
}

impl Written {
    /// Records the pages of `[vaddr, vaddr + len)` that landed at `offset` of
    /// `file`: its `parts` (`from`, `to` in the run, and their CRC32C) as
    /// chunks, the rest punched out of the file as holes.
    pub fn record(
        &mut self,
        file: &PageFile,
        vaddr: u64,
        offset: u64,
        len: u64,
        parts: impl Iterator<Item = (usize, usize, u32)>,
    ) -> Result<()> {
        let len = len as usize;
        let mut kept = 0;
        let mut at = 0;
        for (from, to, crc32c) in parts {
            if from > at {
                file.punch_hole(offset + at as u64, (from - at) as u64)?;
            }
            self.chunks.push(PageChunk {
                vaddr: vaddr + from as u64,
                len: (to - from) as u64,
                offset: offset + from as u64,
                crc32c,
                file: file.part,
            });
            self.written_pages += (to - from) as u64 / PAGE_SIZE;
            kept += to - from;
            at = to;
        }
        if at < len {
            file.punch_hole(offset + at as u64, (len - at) as u64)?;
        }
        self.zero_pages += (len - kept) as u64 / PAGE_SIZE;
        Ok(())
    }
}

/// Bytes read from the target per batch (one process_vm_readv), and how
/// many batches may be in flight between the reader and the writer.
const BATCH: usize = 1 << 20;
const BUFFERS: usize = 4;

/// Copies `runs` of `pid` into its page file in `dir` by reading them: this
/// thread reads them with process_vm_readv in big batches while a second one
/// writes the previous batch, and a third allocates the file's pages ahead
/// of the writer (on tmpfs, allocation is most of the cost of a write).
/// Anonymous pages of zeros are left out.
pub fn copy_by_reading(pid: i32, runs: &[Run], dir: &Path) -> Result<Written> {
    let page_file = PageFile::create(dir, pid, 0)?;
    let (out, pages_path) = (&page_file.file, &page_file.path);
    let mut copied = Written::default();
    let upper: u64 = runs.iter().map(|r| r.len).sum();
    let written = std::sync::atomic::AtomicU64::new(0);
    let result = std::thread::scope(|s| -> Result<u64> {
        let (job_tx, job_rx) =
            std::sync::mpsc::sync_channel::<(Vec<u8>, Vec<(usize, usize)>)>(BUFFERS);
        let (free_tx, free_rx) = std::sync::mpsc::channel::<Vec<u8>>();
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
            (i, bytes) = next_batch(runs, first, BATCH);
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
                copied.zero_pages += (data.len() - nonzero.iter().map(|x| x.1 - x.0).sum::<usize>())
                    as u64
                    / PAGE_SIZE;
                for (from, to) in nonzero {
                    let part = &data[from..to];
                    copied.chunks.push(PageChunk {
                        vaddr: r.vaddr + from as u64,
                        len: part.len() as u64,
                        offset,
                        crc32c: crc32c::crc32c(part),
                        file: 0,
                    });
                    offset += part.len() as u64;
                    copied.written_pages += part.len() as u64 / PAGE_SIZE;
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
    Ok(copied)
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
/// the untouched ones in `skipped`.
pub fn touched_runs(pid: i32, vmas: &[Vma], skipped: &mut u64) -> Result<Vec<Run>> {
    use proc::pagemap_scan as ps;
    let pm_path = format!("/proc/{pid}/pagemap");
    let pagemap_file = File::open(&pm_path).map_err(|e| Error::io(&pm_path, e))?;
    let mut use_scan = true;
    let mut runs = Vec::new();
    let mut regions = Vec::new();
    let mut entries = Vec::new();
    for vma in vmas {
        let Some(file_backed) = vma.saved_pages_kind() else {
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
                    *skipped += vma.len() / PAGE_SIZE - kept;
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
        *skipped += entries.len() as u64 - kept;
    }
    Ok(runs)
}

/// The index ranges `[first, end)` of consecutive pagemap `entries` for
/// which `want` holds.
pub fn entry_runs(entries: &[u64], want: impl Fn(u64) -> bool) -> Vec<(usize, usize)> {
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
pub fn read_batch(pid: i32, runs: &[Run], buf: &mut [u8]) -> Result<()> {
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
pub fn nonzero_runs(data: &[u8]) -> Vec<(usize, usize)> {
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
pub fn next_batch(runs: &[Run], first: usize, max_bytes: usize) -> (usize, usize) {
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
pub fn read_target(pid: i32, addr: u64, buf: &mut [u8], readable: bool) -> Result<()> {
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

/// The page file, mapped read-only, with every chunk checked against its checksum.
pub struct Pages {
    /// One mapping per page file (`PageChunk::file`); `None` for an empty one.
    maps: Vec<Option<(*mut libc::c_void, usize)>>,
}

impl Pages {
    /// Maps the page files of process `pid` in image `dir` and checks each
    /// of its `chunks` (which must lie inside one of its `vmas`).
    pub fn open(dir: &Path, pid: i32, vmas: &[Vma], chunks: &[PageChunk]) -> Result<Pages> {
        let files = chunks
            .iter()
            .map(|c| c.file as usize + 1)
            .max()
            .unwrap_or(1);
        let mut pages = Pages { maps: Vec::new() };
        let mut lens = Vec::new();
        for file in 0..files {
            let path = page_file(pid, file as u8).path(dir);
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
        let bad = |c: &PageChunk, reason: String| {
            Error::bad_image(page_file(pid, c.file).path(dir), reason)
        };
        let lookup = VmaLookup::new(vmas);
        for c in chunks {
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
        let check = |items: &[(&[u8], &PageChunk)]| -> Result<()> {
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
        let items: Vec<(&[u8], &PageChunk)> = chunks.iter().map(|c| (pages.slice(c), c)).collect();
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
    pub fn slice(&self, c: &PageChunk) -> &[u8] {
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

/// A saved run of pages: `len` bytes at `offset` in the page file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    len: u64,
    offset: u64,
}

/// The page file a pre-copy builds over its rounds: a later round writes
/// a page some chunk already holds in place and appends the others, and the
/// frozen round drops what is no longer mapped or touched. Each file page's
/// crc32c is kept, so a chunk's checksum is recomputed from its pages'
/// without reading it back.
pub struct PageStore {
    pub path: PathBuf,
    file: File,
    /// By address; never overlapping.
    chunks: BTreeMap<u64, Slot>,
    /// crc32c of each page of the file, by file page.
    page_crc: Vec<u32>,
    /// The file's length.
    end: u64,
}

impl PageStore {
    pub fn create(path: PathBuf) -> Result<PageStore> {
        let file = crate::image::create_private(&path)?;
        Ok(PageStore {
            path,
            file,
            chunks: BTreeMap::new(),
            page_crc: Vec::new(),
            end: 0,
        })
    }

    /// Copies `runs` (sorted, not overlapping) from `pid` into the file;
    /// returns the pages written. While the process runs (`!frozen`) a run
    /// that cannot be read (unmapped meanwhile) is skipped: the mapping has
    /// changed, and is copied whole later.
    pub fn write_runs(&mut self, pid: i32, runs: &[Run], frozen: bool) -> Result<u64> {
        let mut buf = vec![0u8; BATCH];
        let mut pages = 0;
        let mut i = 0;
        while i < runs.len() {
            let first = i;
            let bytes;
            (i, bytes) = next_batch(runs, first, BATCH);
            if buf.len() < bytes {
                buf.resize(bytes, 0);
            }
            let batch = &runs[first..i];
            match read_batch(pid, batch, &mut buf[..bytes]) {
                Ok(()) => {
                    let mut at = 0;
                    for r in batch {
                        pages += self.put(r, &buf[at..at + r.len as usize])?;
                        at += r.len as usize;
                    }
                }
                Err(e) if frozen || matches!(e, Error::Gone { .. }) => return Err(e),
                Err(_) => {
                    // One by one: keep what still reads.
                    for r in batch {
                        let data = &mut buf[..r.len as usize];
                        if read_batch(pid, std::slice::from_ref(r), data).is_ok() {
                            pages += self.put(r, &buf[..r.len as usize])?;
                        }
                    }
                }
            }
        }
        Ok(pages)
    }

    /// Stores the contents of run `r`: in place where chunks hold its pages,
    /// appended elsewhere (anonymous pages of zeros are left out: a fresh
    /// mapping reads as zeros). Returns the pages written.
    fn put(&mut self, r: &Run, data: &[u8]) -> Result<u64> {
        let (start, end) = (r.vaddr, r.vaddr + r.len);
        // The chunks overlapping [start, end), in address order.
        let mut over: Vec<(u64, Slot)> = Vec::new();
        if let Some((&a, &s)) = self.chunks.range(..start).next_back() {
            if a + s.len > start {
                over.push((a, s));
            }
        }
        over.extend(self.chunks.range(start..end).map(|(&a, &s)| (a, s)));
        let mut written = 0;
        let mut at = start;
        for (a, s) in over {
            if a > at {
                written +=
                    self.append(r, at, &data[(at - start) as usize..(a - start) as usize])?;
            }
            let from = at.max(a);
            let to = end.min(a + s.len);
            let off = s.offset + (from - a);
            let part = &data[(from - start) as usize..(to - start) as usize];
            self.file
                .write_all_at(part, off)
                .map_err(|e| Error::io(&self.path, e))?;
            self.set_crcs(off, part);
            written += part.len() as u64 / PAGE_SIZE;
            at = to;
        }
        if at < end {
            written += self.append(r, at, &data[(at - start) as usize..])?;
        }
        Ok(written)
    }

    /// Appends the pages of `data` (at address `vaddr`, part of run `r`) as
    /// new chunks, growing the previous chunk where it ends right there.
    fn append(&mut self, r: &Run, vaddr: u64, data: &[u8]) -> Result<u64> {
        let parts = if r.file_backed {
            vec![(0, data.len())]
        } else {
            nonzero_runs(data)
        };
        let mut written = 0;
        for (from, to) in parts {
            let part = &data[from..to];
            let addr = vaddr + from as u64;
            self.file
                .write_all_at(part, self.end)
                .map_err(|e| Error::io(&self.path, e))?;
            let off = self.end;
            self.end += part.len() as u64;
            self.set_crcs(off, part);
            written += part.len() as u64 / PAGE_SIZE;
            // One chunk per contiguous run in memory and in the file.
            let grow = self.chunks.range(..addr).next_back().and_then(|(&a, &s)| {
                (a + s.len == addr
                    && s.offset + s.len == off
                    && s.len + part.len() as u64 <= MAX_CHUNK)
                    .then_some(a)
            });
            match grow {
                Some(a) => self.chunks.get_mut(&a).expect("found above").len += part.len() as u64,
                None => {
                    self.chunks.insert(
                        addr,
                        Slot {
                            len: part.len() as u64,
                            offset: off,
                        },
                    );
                }
            }
        }
        Ok(written)
    }

    fn set_crcs(&mut self, offset: u64, data: &[u8]) {
        let first = (offset / PAGE_SIZE) as usize;
        let n = data.len() / PAGE_SIZE as usize;
        if self.page_crc.len() < first + n {
            self.page_crc.resize(first + n, 0);
        }
        for (i, page) in data.chunks(PAGE_SIZE as usize).enumerate() {
            self.page_crc[first + i] = crc32c::crc32c(page);
        }
    }

    /// Keeps only the parts of chunks inside `keep` (runs of pages, each
    /// inside one mapping): a chunk never spans two mappings, nor holds a
    /// page that is no longer mapped, touched or private.
    pub fn retain(&mut self, keep: &[Run]) {
        let mut keep: Vec<(u64, u64)> = keep.iter().map(|r| (r.vaddr, r.vaddr + r.len)).collect();
        keep.sort_unstable();
        let old = std::mem::take(&mut self.chunks);
        let mut k = 0;
        for (a, s) in old {
            let end = a + s.len;
            while k < keep.len() && keep[k].1 <= a {
                k += 1;
            }
            let mut j = k;
            while j < keep.len() && keep[j].0 < end {
                let from = keep[j].0.max(a);
                let to = keep[j].1.min(end);
                self.chunks.insert(
                    from,
                    Slot {
                        len: to - from,
                        offset: s.offset + (from - a),
                    },
                );
                j += 1;
            }
        }
    }

    /// The parts of `keep` no chunk holds.
    pub fn uncovered(&self, keep: &[Run]) -> Vec<Run> {
        let mut out = Vec::new();
        for r in keep {
            let (start, end) = (r.vaddr, r.vaddr + r.len);
            let mut at = start;
            let before = self
                .chunks
                .range(..start)
                .next_back()
                .map(|(&a, &s)| (a, s));
            let chunks = before
                .into_iter()
                .chain(self.chunks.range(start..end).map(|(&a, &s)| (a, s)));
            for (a, s) in chunks {
                if a + s.len <= at {
                    continue;
                }
                if a > at {
                    out.push(Run {
                        vaddr: at,
                        len: a - at,
                        ..*r
                    });
                }
                at = end.min(a + s.len);
            }
            if at < end {
                out.push(Run {
                    vaddr: at,
                    len: end - at,
                    ..*r
                });
            }
        }
        out
    }

    /// The chunks, each with its checksum.
    pub fn finish(self) -> Result<Vec<PageChunk>> {
        Ok(self
            .chunks
            .iter()
            .map(|(&vaddr, s)| {
                let first = (s.offset / PAGE_SIZE) as usize;
                let n = (s.len / PAGE_SIZE) as usize;
                PageChunk {
                    vaddr,
                    len: s.len,
                    offset: s.offset,
                    crc32c: crate::image::crc::of_pages(&self.page_crc[first..first + n]),
                    file: 0,
                }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn run(vaddr: u64, pages: u64) -> Run {
        Run {
            vaddr,
            len: pages * PAGE_SIZE,
            file_backed: false,
            readable: true,
        }
    }

    fn page_of(b: u8) -> Vec<u8> {
        vec![b; PAGE_SIZE as usize]
    }

    #[test]
    fn later_rounds_overwrite_in_place_append_and_trim() {
        let dir = tempfile::tempdir().unwrap();
        let mut st = PageStore::create(dir.path().join("pages.img")).unwrap();
        let p = PAGE_SIZE;
        // Round 1: pages 0-3 (page 2 all zeros: not stored).
        let mut d = [page_of(1), page_of(2), page_of(0), page_of(4)].concat();
        assert_eq!(st.put(&run(0x10000, 4), &d).unwrap(), 3);
        assert_eq!(st.chunks.len(), 2);
        // Round 2: page 1 changed (in place), page 2 now written (appended).
        d = [page_of(9), page_of(8)].concat();
        assert_eq!(st.put(&run(0x10000 + p, 2), &d).unwrap(), 2);
        assert_eq!(st.end, 4 * p);
        assert_eq!(st.uncovered(&[run(0x10000, 4)]).len(), 0);
        // Page 3 is no longer touched: dropped.
        st.retain(&[run(0x10000, 3)]);
        let chunks = st.finish().unwrap();
        let file = std::fs::read(dir.path().join("pages.img")).unwrap();
        let mut mem = vec![0u8; 4 * p as usize];
        for c in &chunks {
            let data = &file[c.offset as usize..(c.offset + c.len) as usize];
            assert_eq!(crc32c::crc32c(data), c.crc32c);
            let at = (c.vaddr - 0x10000) as usize;
            mem[at..at + c.len as usize].copy_from_slice(data);
        }
        assert_eq!(
            mem,
            [page_of(1), page_of(9), page_of(8), page_of(0)].concat()
        );
    }

    #[test]
    fn uncovered_finds_the_gaps_between_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let mut st = PageStore::create(dir.path().join("pages.img")).unwrap();
        let p = PAGE_SIZE;
        st.put(&run(0x20000 + p, 1), &page_of(1)).unwrap();
        st.put(&run(0x20000 + 3 * p, 1), &page_of(1)).unwrap();
        let gaps: Vec<(u64, u64)> = st
            .uncovered(&[run(0x20000, 5)])
            .iter()
            .map(|r| ((r.vaddr - 0x20000) / p, r.len / p))
            .collect();
        assert_eq!(gaps, vec![(0, 1), (2, 1), (4, 1)]);
    }
}
