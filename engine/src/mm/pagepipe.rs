//! Page transfer from a frozen target with one copy: the target vmsplices its
//! own pages into a pipe (the pipe then holds references, not copies), and
//! crest splices the pipe into the page file, where the kernel copies each
//! page once, straight into the image. CRIU's parasite moves pages the same
//! way. Two pipes per file let the target fill one while crest drains the
//! other.
//!
//! Where it can, the target runs crest's code for the whole copy and
//! checksums each page before it vmsplices it ([`crate::mm::pagecrc`]).
//! Otherwise each vmsplice is a remote system call, and crest checksums each
//! piece from a read-only mapping of the file right after it lands.
//!
//! Reading with process_vm_readv and then writing (the fallback in
//! `pages::copy_by_reading`, and what a running target gets) copies every
//! page twice.

use std::fs::File;
use std::ops::Range;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;

use crate::error::{Error, Result};
use crate::mm::pagecrc::{PageRecord, TargetCrc};
use crate::mm::pages::{nonzero_runs, read_target, PageFile, Run, Written};
use crate::sys::remote::RemoteCall as Remote;
use crate::sys::PAGE_SIZE;

/// iovecs per vmsplice: as many as fit in crest's scratch page in the target.
pub(crate) const IOVS_PER_CALL: usize = PAGE_SIZE as usize / 16;
/// The pipe size asked for: the default limit for a process without
/// CAP_SYS_RESOURCE (/proc/sys/fs/pipe-max-size).
const PIPE_BYTES: usize = 1 << 20;
/// Pipes per stream: the target fills one while crest drains the other.
const PIPES_PER_STREAM: usize = 2;
/// From this much memory on, a process's pages are written as two files.
const TWO_STREAMS_FROM: u64 = 32 << 20;

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
    fn open(remote: &'a Remote, count: usize) -> Result<Option<TargetPipes<'a>>> {
        let mut p = TargetPipes {
            remote,
            read_ends: Vec::new(),
            theirs: Vec::new(),
            write_ends: Vec::new(),
            capacity: usize::MAX,
        };
        let pid = remote.tracee.pid;
        for _ in 0..count {
            let r = remote.raw(
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
            let ours = crate::sys::fd::pidfd_getfd(pid, read_end)?;
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

    /// The target closed the write ends itself.
    fn forget_write_ends(&mut self) {
        let closed = std::mem::take(&mut self.write_ends);
        self.theirs.retain(|fd| !closed.contains(fd));
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
            crate::sys::ptrace::write_mem(pid, self.remote.scratch, &iov)?;
            let n = self.remote.raw(
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
            match self.remote.call(
                libc::SYS_close,
                [fd as u64, 0, 0, 0, 0, 0],
                "close of crest's pipe",
            ) {
                Ok(_) => {}
                // A target that died has no descriptors left to close; the
                // dump's own error says it died.
                Err(Error::Gone { .. }) => return,
                Err(e) => tracing::warn!("{e}"),
            }
        }
    }
}

/// A piece of the image: `run` lands at `offset` in page file `file`.
#[derive(Clone, Copy)]
struct Piece {
    run: Run,
    file: u8,
    offset: u64,
}

/// What the copy produced.
type Copied = Written;

/// A page file being written by one stream.
struct Stream {
    page: PageFile,
    size: u64,
}

/// Copies `runs` of the frozen target behind `remote` into its page files
/// in `dir`: with enough to copy and a second CPU, two streams each splice
/// half into a file of its own (on tmpfs a file's writes serialize on its
/// inode lock, so one file cannot take two writers). `None` when the target
/// cannot make pipes.
pub fn copy_pages(remote: &Remote, runs: &[Run], dir: &Path) -> Result<Option<Copied>> {
    let pid = remote.tracee.pid;
    let total: u64 = runs.iter().map(|r| r.len).sum();
    let streams_wanted = if total >= TWO_STREAMS_FROM
        && std::thread::available_parallelism().is_ok_and(|n| n.get() > 1)
    {
        2
    } else {
        1
    };
    let Some(mut pipes) = TargetPipes::open(remote, streams_wanted * PIPES_PER_STREAM)? else {
        return Ok(None);
    };
    // Pieces no bigger than a pipe, laid out back to back in each file.
    let mut pieces = Vec::new();
    let mut file = 0u8;
    let mut offset = 0u64;
    let mut sizes = vec![0u64; streams_wanted];
    let mut starts = vec![0usize];
    for r in runs {
        let mut at = 0;
        while at < r.len {
            if streams_wanted == 2 && file == 0 && offset * 2 >= total {
                sizes[0] = offset;
                file = 1;
                offset = 0;
                starts.push(pieces.len());
            }
            let len = (r.len - at).min(pipes.capacity as u64);
            pieces.push(Piece {
                run: Run {
                    vaddr: r.vaddr + at,
                    len,
                    ..*r
                },
                file,
                offset,
            });
            offset += len;
            at += len;
        }
    }
    sizes[file as usize] = offset;
    starts.push(pieces.len());
    let nstreams = file as usize + 1;
    let mut streams = Vec::new();
    for (n, &size) in sizes.iter().enumerate().take(nstreams) {
        let page = PageFile::create(dir, pid, n as u8)?;
        page.file
            .set_len(size)
            .map_err(|e| Error::io(&page.path, e))?;
        streams.push(Stream { page, size });
    }
    if total == 0 {
        return Ok(Some(Copied::default()));
    }
    let mut closed_by_target = false;
    let copy = match copy_with_target_crc(
        remote,
        &pipes,
        &pieces,
        &streams,
        &starts,
        &mut closed_by_target,
    ) {
        Ok(Some(copy)) => Ok(copy),
        Ok(None) => copy_with_crest_crc(&pipes, &pieces, &streams, &starts),
        Err(e) => Err(e),
    };
    if closed_by_target {
        pipes.forget_write_ends();
    }
    // The pieces set aside: crest reads them (process_vm_readv, or
    // /proc/PID/mem where they are not readable) and writes them.
    let (mut copied, set_aside) = copy?;
    for p in &set_aside {
        let stream = &streams[p.file as usize];
        let mut buf = vec![0u8; p.run.len as usize];
        read_target(pid, p.run.vaddr, &mut buf, p.run.readable)?;
        std::os::unix::fs::FileExt::write_all_at(&stream.page.file, &buf, p.offset)
            .map_err(|e| Error::io(&stream.page.path, e))?;
        account(stream, p, &buf, &mut copied)?;
    }
    drop(pipes);
    copied.chunks.sort_by_key(|c| (c.file, c.offset));
    Ok(Some(copied))
}

/// The next batch of a stream's pieces from `i` (its pieces end at `end`):
/// the pieces there that crest copies itself (`aside`), then up to a pipeful
/// of the others for one vmsplice.
fn next_batch(
    pieces: &[Piece],
    mut i: usize,
    end: usize,
    capacity: usize,
    aside: &dyn Fn(&Piece) -> bool,
) -> (Range<usize>, Range<usize>) {
    let set_aside = i;
    while i < end && aside(&pieces[i]) {
        i += 1;
    }
    let first = i;
    let mut bytes = 0;
    while i < end
        && !aside(&pieces[i])
        && i - first < IOVS_PER_CALL
        && bytes + pieces[i].run.len <= capacity as u64
    {
        bytes += pieces[i].run.len;
        i += 1;
    }
    (set_aside..first, first..i)
}

/// vmsplice needs read access; /proc/PID/mem does not.
fn unreadable_piece(p: &Piece) -> bool {
    !p.run.readable
}

/// One vmsplice of the copy: the pieces into pipe `pipe`.
struct Job {
    pipe: usize,
    pieces: Range<usize>,
}

/// Pages per run of the target's code: its records take 8 bytes a page in
/// the target (2 MiB for 1 GiB).
const PAGES_PER_RUN: usize = 1 << 18;

/// The copy with the target checksumming its pages ([`crate::mm::pagecrc`]):
/// the copied chunks and the pieces set aside for crest to copy. `None` when
/// the target cannot run crest's code. Sets `closed_by_target` when the code
/// failed and closed the pipes' write ends.
fn copy_with_target_crc(
    remote: &Remote,
    pipes: &TargetPipes,
    pieces: &[Piece],
    streams: &[Stream],
    starts: &[usize],
    closed_by_target: &mut bool,
) -> Result<Option<(Copied, Vec<Piece>)>> {
    if pipes.write_ends.len() > TargetCrc::MAX_PIPES {
        return Ok(None);
    }
    // While the target runs, the kernel updates its thread's rseq area each
    // time the thread comes back to user mode on another CPU: a page the
    // code checksummed could change before crest splices it. crest copies
    // that piece itself; and where it cannot know of such an area, it
    // checksums the page files instead.
    let tracee = remote.tracee;
    let rseq = tracee.rseq_area(tracee.regs()?.fs_base)?;
    if rseq.is_none() && crate::sys::ptrace::Tracee::rseq_unknown() {
        return Ok(None);
    }
    let aside = |p: &Piece| {
        unreadable_piece(p)
            || rseq.as_ref().is_some_and(|r| {
                r.pointer < p.run.vaddr + p.run.len && p.run.vaddr < r.pointer + r.size as u64
            })
    };
    let mut set_aside = Vec::new();
    let mut batches: Vec<Vec<Range<usize>>> = vec![Vec::new(); streams.len()];
    for (st, batches) in batches.iter_mut().enumerate() {
        let mut i = starts[st];
        while i < starts[st + 1] {
            let (skipped, batch) = next_batch(pieces, i, starts[st + 1], pipes.capacity, &aside);
            set_aside.extend_from_slice(&pieces[skipped]);
            i = batch.end;
            if !batch.is_empty() {
                batches.push(batch);
            }
        }
    }
    // The streams take turns, and each stream's pipes take turns: while the
    // target fills one pipe, crest drains the others.
    let mut jobs = Vec::new();
    for k in 0..batches.iter().map(Vec::len).max().unwrap_or(0) {
        for (st, batches) in batches.iter().enumerate() {
            if let Some(b) = batches.get(k) {
                jobs.push(Job {
                    pipe: st * PIPES_PER_STREAM + k % PIPES_PER_STREAM,
                    pieces: b.clone(),
                });
            }
        }
    }
    let pages_of = |j: &Job| -> usize {
        pieces[j.pieces.clone()]
            .iter()
            .map(|p| (p.run.len / PAGE_SIZE) as usize)
            .sum()
    };
    let mut runs_of_code = Vec::new();
    let (mut from, mut pages) = (0, 0);
    for (j, job) in jobs.iter().enumerate() {
        let n = pages_of(job);
        if pages + n > PAGES_PER_RUN && j > from {
            runs_of_code.push(from..j);
            (from, pages) = (j, 0);
        }
        pages += n;
    }
    if from < jobs.len() {
        runs_of_code.push(from..jobs.len());
    }
    let most = |f: &dyn Fn(&[Job]) -> usize| {
        runs_of_code
            .iter()
            .map(|r| f(&jobs[r.clone()]))
            .max()
            .unwrap_or(0)
    };
    let Some(crc) = TargetCrc::map(
        remote,
        most(&|js| js.len()),
        most(&|js| js.iter().map(|j| j.pieces.len()).sum()),
        most(&|js| js.iter().map(pages_of).sum()),
    )?
    else {
        return Ok(None);
    };
    let mut copied = Copied::default();
    for r in runs_of_code {
        copy_jobs(
            &crc,
            pipes,
            pieces,
            streams,
            &jobs[r],
            closed_by_target,
            &mut copied,
        )?;
    }
    Ok(Some((copied, set_aside)))
}

/// Runs the target's code for `jobs` while one thread per stream splices
/// its pipes into its page file, then records the chunks from the target's
/// page records.
fn copy_jobs(
    crc: &TargetCrc,
    pipes: &TargetPipes,
    pieces: &[Piece],
    streams: &[Stream],
    jobs: &[Job],
    closed_by_target: &mut bool,
    copied: &mut Copied,
) -> Result<()> {
    let runs: Vec<Vec<Run>> = jobs
        .iter()
        .map(|j| pieces[j.pieces.clone()].iter().map(|p| p.run).collect())
        .collect();
    let specs: Vec<(i32, &[Run])> = jobs
        .iter()
        .zip(&runs)
        .map(|(j, r)| (pipes.write_ends[j.pipe], r.as_slice()))
        .collect();
    let stop = AtomicBool::new(false);
    let (done_tx, done_rx) = mpsc::channel::<Result<()>>();
    let started = std::time::Instant::now();
    let (ran, drain_err) = std::thread::scope(|s| -> Result<_> {
        let mut running = crc.start(&specs, &pipes.write_ends)?;
        for (st, stream) in streams.iter().enumerate() {
            let mine: Vec<&Job> = jobs
                .iter()
                .filter(|j| j.pipe / PIPES_PER_STREAM == st)
                .collect();
            let (done_tx, stop) = (done_tx.clone(), &stop);
            let read_ends = &pipes.read_ends;
            s.spawn(move || {
                let mut busy = Busy::default();
                let drained = mine.iter().try_for_each(|j| {
                    let from = pieces[j.pieces.start].offset;
                    let last = &pieces[j.pieces.end - 1];
                    let bytes = (last.offset + last.run.len - from) as usize;
                    splice_into(
                        &read_ends[j.pipe],
                        &stream.page.file,
                        from,
                        bytes,
                        &stream.page.path,
                        Some(stop),
                    )
                });
                busy.worked();
                busy.log("page drainer (checksums made in the target)");
                let _ = done_tx.send(drained);
            });
        }
        drop(done_tx);
        let mut drain_err = None;
        let mut left = streams.len();
        while left > 0 {
            match done_rx.recv_timeout(std::time::Duration::from_millis(2)) {
                Ok(Ok(())) => left -= 1,
                Ok(Err(e)) => {
                    drain_err = Some(e);
                    break;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Err(e) = running.check() {
                        drain_err = Some(e);
                        break;
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        // Every page is through, or something failed: stop the target
        // either way, and on a failure the threads still splicing.
        let ran = running.stop();
        if drain_err.is_some() || !matches!(&ran, Ok(r) if r.failed.is_none()) {
            stop.store(true, Ordering::Relaxed);
        }
        Ok((ran, drain_err))
    })?;
    let ran = ran?;
    tracing::debug!(
        jobs = jobs.len(),
        pages = ran.records.len(),
        ms = started.elapsed().as_millis() as u64,
        "page copy run by crest's code in the target"
    );
    if let Some((j, errno)) = ran.failed {
        *closed_by_target = true;
        let job = &pieces[jobs[j].pieces.clone()];
        let bytes: u64 = job.iter().map(|p| p.run.len).sum();
        return Err(Error::sys(
            crc.pid(),
            format!(
                "remote vmsplice of {bytes} bytes at {:#x}",
                job[0].run.vaddr
            ),
            errno,
        ));
    }
    if let Some(e) = drain_err {
        return Err(e);
    }
    let mut page = 0;
    for p in jobs.iter().flat_map(|j| &pieces[j.pieces.clone()]) {
        let n = (p.run.len / PAGE_SIZE) as usize;
        account_records(
            &streams[p.file as usize],
            p,
            &ran.records[page..page + n],
            copied,
        )?;
        page += n;
    }
    Ok(())
}

/// The copy with crest checksumming the pages where they landed in the page
/// files: the copied chunks and the unreadable pieces, set aside for crest
/// to copy.
fn copy_with_crest_crc(
    pipes: &TargetPipes,
    pieces: &[Piece],
    streams: &[Stream],
    starts: &[usize],
) -> Result<(Copied, Vec<Piece>)> {
    let nstreams = streams.len();
    let (free_tx, free_rx) = mpsc::channel::<usize>();
    let (check_tx, check_rx) = mpsc::channel::<Range<usize>>();
    let read_ends = &pipes.read_ends;
    std::thread::scope(|s| -> Result<(Copied, Vec<Piece>)> {
        // The checker reads what landed while the drainers splice the next
        // batches: splicing (page allocation and the copy) is the long pole.
        let checker = s.spawn(move || -> Result<Copied> {
            let mut copied = Copied::default();
            let mut windows: Vec<Option<FileView>> = streams.iter().map(|_| None).collect();
            let mut busy = Busy::default();
            for range in check_rx {
                busy.waited();
                for p in &pieces[range] {
                    let stream = &streams[p.file as usize];
                    let data = FileView::slice_of(
                        &mut windows[p.file as usize],
                        stream,
                        p.offset,
                        p.run.len,
                    )?;
                    account(stream, p, data, &mut copied)?;
                }
                busy.worked();
            }
            busy.log("page checker");
            Ok(copied)
        });
        let mut job_txs = Vec::new();
        let mut drainers = Vec::new();
        for stream in streams.iter() {
            let (job_tx, job_rx) = mpsc::sync_channel::<(usize, Range<usize>)>(PIPES_PER_STREAM);
            job_txs.push(job_tx);
            let free_tx = free_tx.clone();
            let check_tx = check_tx.clone();
            drainers.push(s.spawn(move || -> Result<()> {
                let mut busy = Busy::default();
                for (i, range) in job_rx {
                    busy.waited();
                    let from = pieces[range.start].offset;
                    let last = &pieces[range.end - 1];
                    let bytes = (last.offset + last.run.len - from) as usize;
                    splice_into(
                        &read_ends[i],
                        &stream.page.file,
                        from,
                        bytes,
                        &stream.page.path,
                        None,
                    )?;
                    busy.worked();
                    if free_tx.send(i).is_err() || check_tx.send(range).is_err() {
                        break;
                    }
                }
                busy.log("page drainer");
                Ok(())
            }));
        }
        drop(free_tx);
        drop(check_tx);
        // The tracer (this thread) fills whichever pipe is free with the next
        // batch of that pipe's stream.
        let fill = || -> Result<Vec<Piece>> {
            let mut busy = Busy::default();
            let mut unreadable = Vec::new();
            let mut next: Vec<usize> = starts[..nstreams].to_vec();
            let mut free: Vec<usize> = (0..nstreams * PIPES_PER_STREAM).collect();
            while (0..nstreams).any(|st| next[st] < starts[st + 1]) {
                busy.worked();
                let pipe = match free.pop() {
                    Some(p) => p,
                    None => match free_rx.recv() {
                        Ok(p) => p,
                        Err(_) => break, // a drainer failed: its error is reported
                    },
                };
                busy.waited();
                let st = pipe / PIPES_PER_STREAM;
                let (skipped, batch) = next_batch(
                    pieces,
                    next[st],
                    starts[st + 1],
                    pipes.capacity,
                    &unreadable_piece,
                );
                unreadable.extend_from_slice(&pieces[skipped]);
                next[st] = batch.end;
                if batch.is_empty() {
                    continue; // this stream is done: its pipe rests
                }
                let runs: Vec<Run> = pieces[batch.clone()].iter().map(|p| p.run).collect();
                pipes.fill(pipe, &runs)?;
                if job_txs[st].send((pipe, batch)).is_err() {
                    break;
                }
            }
            busy.worked();
            busy.log("page filler (vmsplice in the target)");
            Ok(unreadable)
        };
        let filled = fill();
        drop(job_txs);
        let drained: Vec<Result<()>> = drainers
            .into_iter()
            .map(|d| d.join().expect("page drainer panicked"))
            .collect();
        let checked = checker.join().expect("page checker panicked");
        let unreadable = filled?;
        drained.into_iter().collect::<Result<Vec<()>>>()?;
        Ok((checked?, unreadable))
    })
}

/// Splices exactly `bytes` from `pipe` into `out` at `offset`. With `stop`,
/// waits for data only until it is set.
fn splice_into(
    pipe: &OwnedFd,
    out: &File,
    offset: u64,
    bytes: usize,
    path: &Path,
    stop: Option<&AtomicBool>,
) -> Result<()> {
    let mut off = offset as libc::loff_t;
    let mut left = bytes;
    while left > 0 {
        if let Some(stop) = stop {
            wait_readable(pipe, stop, path)?;
        }
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

/// Waits until `pipe` has data or no writer, or `stop` is set (an error).
fn wait_readable(pipe: &OwnedFd, stop: &AtomicBool, path: &Path) -> Result<()> {
    loop {
        let mut pfd = libc::pollfd {
            fd: pipe.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one descriptor we hold, with a local pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, 20) };
        if r > 0 {
            return Ok(());
        }
        if r < 0 && nix::errno::Errno::last() != nix::errno::Errno::EINTR {
            return Err(Error::io(path, std::io::Error::last_os_error()));
        }
        if stop.load(Ordering::Relaxed) {
            return Err(Error::io(
                path,
                std::io::Error::other("the copy stopped before these pages came"),
            ));
        }
    }
}

/// Checksums piece `p` (`data`: its bytes where they landed in the file),
/// and leaves its zero anonymous pages out (as holes: they come back as
/// zeros anyway).
fn account(stream: &Stream, p: &Piece, data: &[u8], copied: &mut Copied) -> Result<()> {
    let parts = if p.run.file_backed {
        vec![(0, data.len())]
    } else {
        nonzero_runs(data)
    };
    let parts = parts
        .into_iter()
        .map(|(from, to)| (from, to, crc32c::crc32c(&data[from..to])));
    account_parts(stream, p, parts, copied)
}

/// [`account`] from the target's records of the piece's pages.
fn account_records(
    stream: &Stream,
    p: &Piece,
    records: &[PageRecord],
    copied: &mut Copied,
) -> Result<()> {
    let page = PAGE_SIZE as usize;
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, r) in records.iter().enumerate() {
        if !r.nonzero && !p.run.file_backed {
            continue;
        }
        match runs.last_mut() {
            Some(last) if last.1 == i => last.1 = i + 1,
            _ => runs.push((i, i + 1)),
        }
    }
    let parts = runs.into_iter().map(|(from, to)| {
        let crc = crate::mm::pagecrc::crc32c_of_pages(&records[from..to]);
        (from * page, to * page, crc)
    });
    account_parts(stream, p, parts, copied)
}

/// Records piece `p`'s non-zero `parts` (`from`, `to` in the piece, and
/// their CRC32C) as chunks, and punches the rest out of the file as holes.
fn account_parts(
    stream: &Stream,
    p: &Piece,
    parts: impl Iterator<Item = (usize, usize, u32)>,
    copied: &mut Copied,
) -> Result<()> {
    copied.record(&stream.page, p.run.vaddr, p.offset, p.run.len, parts)
}

/// How much of a page file the checker maps at a time.
const WINDOW_BYTES: u64 = 32 << 20;

/// A window of a page file mapped read-only, to checksum what the splices
/// wrote. Reading the pages through a mapping costs less than reading them
/// into a buffer; mapping a window at a time spreads the unmapping (which
/// walks every page) over the copy instead of leaving it all for the end.
struct FileView {
    addr: *mut libc::c_void,
    offset: u64,
    len: usize,
}

impl FileView {
    fn new(file: &File, offset: u64, len: u64) -> std::io::Result<FileView> {
        // SAFETY: a shared read-only mapping of a file we hold, unmapped in Drop.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        // Sequential use only: munmap then leaves the pages' LRU state alone,
        // where it would otherwise mark each one accessed and activate it
        // (a quarter of the checker's CPU). Advice only, so a failure is moot.
        // SAFETY: advice on the mapping just made; no memory is touched.
        unsafe { libc::madvise(addr, len as usize, libc::MADV_SEQUENTIAL) };
        Ok(FileView {
            addr,
            offset,
            len: len as usize,
        })
    }

    /// `len` bytes at `offset` of `stream`'s file, through `window`, which is
    /// moved forward (unmapped and mapped again) when it does not hold them.
    fn slice_of<'w>(
        window: &'w mut Option<FileView>,
        stream: &Stream,
        offset: u64,
        len: u64,
    ) -> Result<&'w [u8]> {
        let holds = |w: &FileView| offset >= w.offset && offset + len <= w.offset + w.len as u64;
        if !window.as_ref().is_some_and(holds) {
            *window = None;
            let start = offset - offset % PAGE_SIZE;
            let end = (start + WINDOW_BYTES).max(offset + len).min(stream.size);
            *window = Some(
                FileView::new(&stream.page.file, start, end - start)
                    .map_err(|e| Error::io(&stream.page.path, e))?,
            );
        }
        let w = window.as_ref().expect("window mapped above");
        assert!(holds(w), "piece inside the mapped window");
        // SAFETY: in bounds (checked above) of a mapping alive as long as the
        // window, which the returned borrow keeps in place.
        Ok(unsafe {
            std::slice::from_raw_parts(
                w.addr.cast::<u8>().add((offset - w.offset) as usize),
                len as usize,
            )
        })
    }
}

impl Drop for FileView {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

/// Where a copy thread's time went, for `-vv`: working, or waiting for the
/// next piece of work (which says which thread holds the others up). Wall
/// time, so a thread ready but waiting for a CPU counts as working or
/// waiting as it was doing; `cpu_ms` is the thread's CPU time since it
/// started (for the filler, the dump's main thread, everything so far).
struct Busy {
    since: std::time::Instant,
    work: std::time::Duration,
    wait: std::time::Duration,
}

impl Default for Busy {
    fn default() -> Busy {
        Busy {
            since: std::time::Instant::now(),
            work: std::time::Duration::ZERO,
            wait: std::time::Duration::ZERO,
        }
    }
}

impl Busy {
    fn waited(&mut self) {
        let now = std::time::Instant::now();
        self.wait += now - self.since;
        self.since = now;
    }

    fn worked(&mut self) {
        let now = std::time::Instant::now();
        self.work += now - self.since;
        self.since = now;
    }

    fn log(&mut self, who: &str) {
        self.waited();
        let cpu = nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
            .map(|t| std::time::Duration::from(t).as_millis() as u64)
            .unwrap_or(0);
        tracing::debug!(
            work_ms = self.work.as_millis() as u64,
            wait_ms = self.wait.as_millis() as u64,
            cpu_ms = cpu,
            "{who}"
        );
    }
}
