//! Page transfer from a frozen target with one copy: the target vmsplices its
//! own pages into a pipe (a remote system call; the pipe then holds
//! references, not copies), and crest splices the pipe into the page file,
//! where the kernel copies each page once, straight into the image. CRIU's
//! parasite moves pages the same way. Two pipes let the target fill one while
//! crest drains the other; crest checksums each piece from a read-only
//! mapping of the file right after it lands, while it is still in cache.
//!
//! Reading with process_vm_readv and then writing (the fallback in
//! [`crate::mm`], and what a running target gets) copies every page twice.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::mpsc;

use crate::error::{Error, Result};
use crate::mm::{nonzero_runs, read_target, PageChunk, Run};
use crate::task::Remote;
use crate::PAGE_SIZE;

/// iovecs per vmsplice: as many as fit in crest's scratch page in the target.
const IOVS_PER_CALL: usize = PAGE_SIZE as usize / 16;
/// The pipe size asked for: the default limit for a process without
/// CAP_SYS_RESOURCE (/proc/sys/fs/pipe-max-size).
const PIPE_BYTES: usize = 1 << 20;
const PIPES: usize = 2;

/// Pipes made in the target: crest holds each read end, the target each
/// write end, which is closed in the target when this is dropped (also on
/// errors), so the target's descriptor table ends as it began.
struct TargetPipes<'a> {
    remote: &'a Remote,
    read_ends: Vec<OwnedFd>,
    /// Descriptors to close in the target.
    theirs: Vec<i32>,
    write_ends: Vec<i32>,
    capacity: usize,
}

impl<'a> TargetPipes<'a> {
    /// `None` when the target cannot make a pipe (e.g. out of descriptors):
    /// the caller then copies another way.
    fn open(remote: &'a Remote) -> Result<Option<TargetPipes<'a>>> {
        let mut p = TargetPipes {
            remote,
            read_ends: Vec::new(),
            theirs: Vec::new(),
            write_ends: Vec::new(),
            capacity: usize::MAX,
        };
        let pid = remote.tracee.pid;
        for _ in 0..PIPES {
            let r = remote.tracee.remote_syscall(
                remote.insn,
                libc::SYS_pipe2,
                [remote.scratch, libc::O_CLOEXEC as u64, 0, 0, 0, 0],
            )?;
            if r < 0 {
                tracing::debug!(pid, errno = -r, "pipe2 in the target failed");
                return Ok(None);
            }
            let fds = remote.read_scratch(8)?;
            let read_end = i32::from_ne_bytes(fds[0..4].try_into().expect("4 bytes"));
            let write_end = i32::from_ne_bytes(fds[4..8].try_into().expect("4 bytes"));
            p.theirs.extend([read_end, write_end]);
            p.write_ends.push(write_end);
            let ours = crate::files::pidfd_getfd(pid, read_end)?;
            remote.call(
                libc::SYS_close,
                [read_end as u64, 0, 0, 0, 0, 0],
                "close of crest's pipe",
            )?;
            p.theirs.retain(|&fd| fd != read_end);
            // SAFETY: fcntl on a pipe we hold; no memory is passed.
            let mut size = unsafe { libc::fcntl(ours.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_BYTES) };
            if size < 0 {
                // SAFETY: as above.
                size = unsafe { libc::fcntl(ours.as_raw_fd(), libc::F_GETPIPE_SZ) };
            }
            if size < PAGE_SIZE as i32 {
                return Err(Error::sys(
                    pid,
                    "F_GETPIPE_SZ of crest's page pipe",
                    nix::errno::Errno::last(),
                ));
            }
            p.capacity = p.capacity.min(size as usize);
            p.read_ends.push(ours);
        }
        Ok(Some(p))
    }

    /// Moves `pieces` (all readable, at most `capacity` bytes and
    /// [`IOVS_PER_CALL`] of them) into pipe `i` with vmsplice in the target.
    fn fill(&self, i: usize, pieces: &[Run]) -> Result<()> {
        let pid = self.remote.tracee.pid;
        let mut done = 0u64;
        let total: u64 = pieces.iter().map(|r| r.len).sum();
        while done < total {
            // The iovecs still to go, in the scratch page.
            let mut iov = Vec::with_capacity(pieces.len() * 16);
            let mut skip = done;
            for r in pieces {
                if skip >= r.len {
                    skip -= r.len;
                    continue;
                }
                iov.extend_from_slice(&(r.vaddr + skip).to_ne_bytes());
                iov.extend_from_slice(&(r.len - skip).to_ne_bytes());
                skip = 0;
            }
            crate::ptrace::write_mem(pid, self.remote.scratch, &iov)?;
            let n = self.remote.tracee.remote_syscall(
                self.remote.insn,
                libc::SYS_vmsplice,
                [
                    self.write_ends[i] as u64,
                    self.remote.scratch,
                    (iov.len() / 16) as u64,
                    libc::SPLICE_F_NONBLOCK as u64,
                    0,
                    0,
                ],
            )?;
            if n <= 0 {
                // The pipe is empty when we fill it, so even EAGAIN means
                // something is wrong; say which pages.
                let e = if n < 0 {
                    nix::errno::Errno::from_raw(-n as i32)
                } else {
                    nix::errno::Errno::EIO
                };
                return Err(Error::sys(
                    pid,
                    format!(
                        "remote vmsplice of {} bytes at {:#x}",
                        total - done,
                        pieces[0].vaddr
                    ),
                    e,
                ));
            }
            done += n as u64;
        }
        Ok(())
    }
}

impl Drop for TargetPipes<'_> {
    fn drop(&mut self) {
        for &fd in &self.theirs {
            if let Err(e) = self.remote.call(
                libc::SYS_close,
                [fd as u64, 0, 0, 0, 0, 0],
                "close of crest's pipe",
            ) {
                tracing::warn!("pid {}: {e}", self.remote.tracee.pid);
            }
        }
    }
}

/// A piece of the page file: `run` lands at `offset`.
#[derive(Clone, Copy)]
struct Piece {
    run: Run,
    offset: u64,
}

/// What the copy produced.
#[derive(Default)]
pub(crate) struct Copied {
    pub chunks: Vec<PageChunk>,
    pub written_pages: u64,
    pub zero_pages: u64,
}

/// Copies `runs` of the frozen target behind `remote` into `out` (a new,
/// empty file at `path`). `None` when the target cannot make pipes.
pub(crate) fn copy_pages(
    remote: &Remote,
    runs: &[Run],
    out: &File,
    path: &Path,
) -> Result<Option<Copied>> {
    let Some(pipes) = TargetPipes::open(remote)? else {
        return Ok(None);
    };
    let pid = remote.tracee.pid;
    // Pieces no bigger than a pipe, laid out back to back in the file.
    let mut pieces = Vec::new();
    let mut offset = 0u64;
    for r in runs {
        let mut at = 0;
        while at < r.len {
            let len = (r.len - at).min(pipes.capacity as u64);
            pieces.push(Piece {
                run: Run {
                    vaddr: r.vaddr + at,
                    len,
                    ..*r
                },
                offset,
            });
            offset += len;
            at += len;
        }
    }
    let upper = offset;
    if upper == 0 {
        return Ok(Some(Copied::default()));
    }
    out.set_len(upper).map_err(|e| Error::io(path, e))?;
    let view = FileView::new(out, upper).map_err(|e| Error::io(path, e))?;
    let view = &view;

    let (job_tx, job_rx) = mpsc::sync_channel::<(usize, std::ops::Range<usize>)>(PIPES);
    let (free_tx, free_rx) = mpsc::channel::<usize>();
    let pieces = &pieces;
    let read_ends = &pipes.read_ends;
    let result = std::thread::scope(|s| -> Result<Copied> {
        // The checker reads what landed while the drainer splices the next
        // batch: splicing (page allocation and the copy) is the long pole.
        let (check_tx, check_rx) = mpsc::channel::<std::ops::Range<usize>>();
        let checker = s.spawn(move || -> Result<Copied> {
            let mut copied = Copied::default();
            for range in check_rx {
                for p in &pieces[range] {
                    account(view, p, out, path, &mut copied)?;
                }
            }
            Ok(copied)
        });
        let drainer = s.spawn(move || -> Result<()> {
            for (i, range) in job_rx {
                let from = pieces[range.start].offset;
                let last = &pieces[range.end - 1];
                let bytes = (last.offset + last.run.len - from) as usize;
                splice_into(&read_ends[i], out, from, bytes, path)?;
                if free_tx.send(i).is_err() || check_tx.send(range).is_err() {
                    break;
                }
            }
            Ok(())
        });
        let fill = || -> Result<Vec<Piece>> {
            let mut unreadable = Vec::new();
            let mut free: Vec<usize> = (0..PIPES).collect();
            let mut i = 0;
            while i < pieces.len() {
                if !pieces[i].run.readable {
                    // vmsplice needs read access; /proc/PID/mem does not.
                    unreadable.push(pieces[i]);
                    i += 1;
                    continue;
                }
                let first = i;
                let mut bytes = 0;
                while i < pieces.len()
                    && pieces[i].run.readable
                    && i - first < IOVS_PER_CALL
                    && bytes + pieces[i].run.len <= pipes.capacity as u64
                {
                    bytes += pieces[i].run.len;
                    i += 1;
                }
                let pipe = match free.pop() {
                    Some(p) => p,
                    None => match free_rx.recv() {
                        Ok(p) => p,
                        Err(_) => break, // the drainer failed: its error is reported
                    },
                };
                let runs: Vec<Run> = pieces[first..i].iter().map(|p| p.run).collect();
                pipes.fill(pipe, &runs)?;
                if job_tx.send((pipe, first..i)).is_err() {
                    break;
                }
            }
            Ok(unreadable)
        };
        let filled = fill();
        drop(job_tx);
        let drained = drainer.join().expect("page drainer panicked");
        let checked = checker.join().expect("page checker panicked");
        let unreadable = filled?;
        drained?;
        let mut copied = checked?;
        for p in &unreadable {
            let mut buf = vec![0u8; p.run.len as usize];
            read_target(pid, p.run.vaddr, &mut buf, false)?;
            std::os::unix::fs::FileExt::write_all_at(out, &buf, p.offset)
                .map_err(|e| Error::io(path, e))?;
            account(view, p, out, path, &mut copied)?;
        }
        Ok(copied)
    });
    drop(pipes);
    let mut copied = result?;
    copied.chunks.sort_by_key(|c| c.offset);
    Ok(Some(copied))
}

/// Splices exactly `bytes` from `pipe` into `out` at `offset`.
fn splice_into(pipe: &OwnedFd, out: &File, offset: u64, bytes: usize, path: &Path) -> Result<()> {
    let mut off = offset as libc::loff_t;
    let mut left = bytes;
    while left > 0 {
        // SAFETY: splice between descriptors we hold; `off` is a local.
        let n = unsafe {
            libc::splice(
                pipe.as_raw_fd(),
                std::ptr::null_mut(),
                out.as_raw_fd(),
                &mut off,
                left,
                libc::SPLICE_F_MOVE,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::io(path, e));
        }
        if n == 0 {
            return Err(Error::io(
                path,
                std::io::Error::other("the page pipe ran dry before the pages were written"),
            ));
        }
        left -= n as usize;
    }
    Ok(())
}

/// Checksums piece `p` where it landed in the file, and leaves its zero
/// anonymous pages out (as holes: they come back as zeros anyway).
fn account(view: &FileView, p: &Piece, out: &File, path: &Path, copied: &mut Copied) -> Result<()> {
    let data = view.slice(p.offset, p.run.len);
    let parts = if p.run.file_backed {
        vec![(0, data.len())]
    } else {
        nonzero_runs(data)
    };
    let parts_len: usize = parts.iter().map(|(f, t)| t - f).sum();
    let mut at = 0;
    for (from, to) in parts {
        if from > at {
            punch_hole(out, p.offset + at as u64, (from - at) as u64, path)?;
        }
        copied.chunks.push(PageChunk {
            vaddr: p.run.vaddr + from as u64,
            len: (to - from) as u64,
            offset: p.offset + from as u64,
            crc32c: crc32c::crc32c(&data[from..to]),
        });
        copied.written_pages += (to - from) as u64 / PAGE_SIZE;
        at = to;
    }
    if at < data.len() {
        punch_hole(out, p.offset + at as u64, (data.len() - at) as u64, path)?;
    }
    let kept: usize = parts_len;
    copied.zero_pages += (data.len() - kept) as u64 / PAGE_SIZE;
    Ok(())
}

fn punch_hole(out: &File, offset: u64, len: u64, path: &Path) -> Result<()> {
    // SAFETY: fallocate on a file we own; no memory is passed.
    let r = unsafe {
        libc::fallocate(
            out.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as i64,
            len as i64,
        )
    };
    if r != 0 {
        return Err(Error::io(path, std::io::Error::last_os_error()));
    }
    Ok(())
}

/// The page file mapped read-only, to checksum what the splices wrote.
struct FileView {
    addr: *mut libc::c_void,
    len: usize,
}

// SAFETY: a read-only mapping; only read through shared references.
unsafe impl Sync for FileView {}

impl FileView {
    fn new(file: &File, len: u64) -> std::io::Result<FileView> {
        // SAFETY: a shared read-only mapping of a file we hold, unmapped in Drop.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(FileView {
            addr,
            len: len as usize,
        })
    }

    fn slice(&self, offset: u64, len: u64) -> &[u8] {
        assert!(
            offset + len <= self.len as u64,
            "piece inside the page file"
        );
        // SAFETY: in bounds (checked above) of a mapping alive as long as self.
        unsafe {
            std::slice::from_raw_parts(self.addr.cast::<u8>().add(offset as usize), len as usize)
        }
    }
}

impl Drop for FileView {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}
