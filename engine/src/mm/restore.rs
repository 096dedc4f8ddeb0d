//! The address space rebuilt in a restored process, through remote system
//! calls at its trampoline: crest's own mappings unmapped, the vDSO moved to
//! where it was, every VMA mapped at its old address (SysV shm attached), the
//! saved pages copied in, protections and madvise/mlock state set, and the
//! mm fields, auxv and exe given back in one `PR_SET_MM_MAP`.

use std::path::Path;

use nix::unistd::Pid;

use crate::error::{Error, Result};
use crate::mm::pages::{page_file, PageChunk, Pages};
use crate::mm::sysvshm;
use crate::mm::vma::{Backing, Vma, VmaLookup, ADVICE_FLAGS};
use crate::mm::{find_gap, prctl_mm_map, MmImage};
use crate::sys::proc;
use crate::sys::remote::RemoteCall;

/// The descriptors a restore child holds for its mappings: the one each VMA
/// maps from (a file, memfd or shared memory object; `None` for the
/// others), every such descriptor (closed once mapped), and the executable's.
pub struct MapFds<'a> {
    pub vma_fds: &'a [Option<i32>],
    pub helpers: &'a [i32],
    pub exe: i32,
}

/// Rebuilds the address space of the restored process behind `remote` (its
/// scratch page right after its syscall instruction, in a trampoline of
/// `trampoline_len` bytes) as `mm` says, its pages from `pages`.
/// `sysv_sizes`: the SysV shm segments of the image (id, size); `meta_path`
/// names the image in errors.
pub fn rebuild(
    remote: &RemoteCall,
    trampoline_len: u64,
    mm: &MmImage,
    pages: &Pages,
    sysv_sizes: &[(i32, u64)],
    fds: &MapFds,
    meta_path: &Path,
) -> Result<(), RebuildError> {
    let t = remote.tracee;
    let (pid, insn, scratch) = (t.pid, remote.insn, remote.scratch);
    let call = |nr: i64, args: [u64; 6], what: &str| remote.call(nr, args, what);
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
        if (m.start >= insn && m.end <= insn + trampoline_len) || m.is_special() {
            continue;
        }
        call(libc::SYS_munmap, [m.start, m.len(), 0, 0, 0, 0], "munmap")?;
    }
    move_specials(mm, &own, remote)?;

    // SysV shm: one shmat per attachment, at its first VMA; the rest of it
    // (split off by mprotect) gets its protection after.
    let attachments = sysvshm::attachments(&mm.vmas, sysv_sizes)
        .map_err(|e| Error::bad_image(meta_path, format!("pid {pid}: {e}")))?;
    for group in &attachments {
        let vmas: Vec<&Vma> = group.iter().map(|&i| &mm.vmas[i]).collect();
        let Backing::SysvShm { shmid, .. } = vmas[0].backing else {
            continue;
        };
        let (shmflg, prot) = sysvshm::attach_flags(&vmas);
        let got = call(
            libc::SYS_shmat,
            [shmid as u64, vmas[0].start, shmflg as u64, 0, 0, 0],
            &format!("shmat of SysV shm segment {shmid} at {:#x}", vmas[0].start),
        )?;
        if got != vmas[0].start {
            return Err(RebuildError::ShmMisplaced {
                pid,
                shmid,
                start: vmas[0].start,
                got,
            });
        }
        for v in vmas.iter().filter(|v| v.prot != prot) {
            call(
                libc::SYS_mprotect,
                [v.start, v.len(), v.prot as u64, 0, 0, 0],
                "mprotect of a SysV shm attachment",
            )?;
        }
    }

    for (v, fd) in mm.vmas.iter().zip(fds.vma_fds) {
        let prot = if needs_write_window(mm, v) {
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
        let source = || {
            fd.ok_or(RebuildError::NoDescriptor {
                pid,
                start: v.start,
                end: v.end,
            })
        };
        let (fd, off) = match &v.backing {
            Backing::Special { .. } | Backing::SysvShm { .. } => continue,
            Backing::Anon => {
                flags |= libc::MAP_ANONYMOUS;
                (u64::MAX, 0)
            }
            Backing::File { offset, shared, .. } | Backing::Memfd { offset, shared, .. } => {
                if *shared {
                    flags = (flags & !libc::MAP_PRIVATE) | libc::MAP_SHARED;
                }
                (source()? as u64, *offset)
            }
            Backing::SharedAnon { offset, .. } => {
                flags = (flags & !libc::MAP_PRIVATE) | libc::MAP_SHARED;
                (source()? as u64, *offset)
            }
        };
        let got = call(
            libc::SYS_mmap,
            [v.start, v.len(), prot as u64, flags as u64, fd, off],
            &format!("mmap {:#x}-{:#x}", v.start, v.end),
        )?;
        if got != v.start {
            return Err(RebuildError::Misplaced {
                pid,
                start: v.start,
                got,
            });
        }
    }

    write_pages(remote, mm, pages)?;

    for v in mm
        .vmas
        .iter()
        .filter(|v| needs_write_window(mm, v) && v.prot != libc::PROT_READ | libc::PROT_WRITE)
    {
        call(
            libc::SYS_mprotect,
            [v.start, v.len(), v.prot as u64, 0, 0, 0],
            "mprotect",
        )?;
    }

    for v in &mm.vmas {
        for flag in &v.advice {
            match ADVICE_FLAGS.iter().find(|(f, _)| f == flag) {
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
    let auxv: Vec<u8> = mm.auxv.iter().flat_map(|v| v.to_ne_bytes()).collect();
    if auxv.len() > 2048 {
        return Err(Error::bad_image(
            page_file(pid, 0).path(Path::new("")),
            "auxv is larger than the kernel's",
        )
        .into());
    }
    crate::sys::ptrace::write_mem(pid, auxv_addr, &auxv)?;
    // The child's exe is crest's own. When the target is crest too (a benchmark
    // re-executing itself), the kernel refuses to replace an exe that is still
    // mapped (EBUSY), and there is nothing to replace: leave it (-1).
    let same_exe =
        std::fs::read_link("/proc/self/exe").is_ok_and(|e| e.as_os_str() == mm.exe.as_str());
    let exe_fd_for_prctl = if same_exe { u32::MAX } else { fds.exe as u32 };
    crate::sys::ptrace::write_mem(
        pid,
        scratch,
        &prctl_mm_map(&mm.fields, auxv_addr, mm.auxv.len(), exe_fd_for_prctl),
    )?;
    const PR_SET_MM: u64 = 35;
    const PR_SET_MM_MAP: u64 = 14;
    call(
        libc::SYS_prctl,
        [PR_SET_MM, PR_SET_MM_MAP, scratch, 104, 0, 0],
        "prctl(PR_SET_MM_MAP)",
    )?;
    for &fd in fds.helpers.iter().chain([&fds.exe]) {
        call(libc::SYS_close, [fd as u64, 0, 0, 0, 0, 0], "close")?;
    }
    Ok(())
}

/// Whether a mapping is mapped writable while its pages are copied in, then
/// protected: file mappings with copy-on-write pages, so that they keep the
/// boundaries they had (mapped read-only at once, the kernel would merge them
/// with a neighbouring read-only mapping of the same file). Anonymous ones get
/// their final protection at once and are written through /proc/PID/mem,
/// which keeps a huge PROT_NONE reservation from being charged to overcommit.
/// Why an address space could not be rebuilt as the image says.
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error("pid {pid}: SysV shm segment {shmid} attached at {got:#x}, not {start:#x}")]
    ShmMisplaced {
        pid: i32,
        shmid: i32,
        start: u64,
        got: u64,
    },
    #[error("pid {pid}: mapping {start:#x}-{end:#x} has no descriptor to map")]
    NoDescriptor { pid: i32, start: u64, end: u64 },
    #[error("pid {pid}: mapping {start:#x} landed at {got:#x}")]
    Misplaced { pid: i32, start: u64, got: u64 },
    #[error("pid {pid}: no room to move the vDSO")]
    NoRoomForVdso { pid: i32 },
    #[error(transparent)]
    Engine(#[from] Error),
}

fn needs_write_window(mm: &MmImage, v: &Vma) -> bool {
    matches!(
        v.backing,
        Backing::File { shared: false, .. } | Backing::Memfd { shared: false, .. }
    ) && v.prot & libc::PROT_WRITE == 0
        && mm
            .chunks
            .iter()
            .any(|c| c.vaddr >= v.start && c.vaddr < v.end)
}

/// Moves the child's vDSO and vvar areas to where the dumped process had them.
/// Same kernel: same sizes, so a move is enough. Another layout is refused.
fn move_specials(
    mm: &MmImage,
    own: &[proc::MapsEntry],
    remote: &RemoteCall,
) -> Result<(), RebuildError> {
    let pid = remote.pid();
    let call = |nr: i64, args: [u64; 6], what: &str| remote.call(nr, args, what);
    let wanted: Vec<_> = mm
        .vmas
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
        ).into());
    }
    // Two moves: first out of the way of every final address, then into place.
    let mut taken: Vec<(u64, u64)> = own.iter().map(|m| (m.start, m.end)).collect();
    taken.extend(mm.vmas.iter().map(|v| (v.start, v.end)));
    let total: u64 = have.iter().map(|h| h.2).sum();
    let mut tmp =
        find_gap(&taken, total, 0x1000_0000).ok_or(RebuildError::NoRoomForVdso { pid })?;
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
fn write_pages(remote: &RemoteCall, mm: &MmImage, pages: &Pages) -> Result<()> {
    let pid = remote.pid();
    let lookup = VmaLookup::new(&mm.vmas);
    let writable = |addr: u64| {
        lookup
            .containing(addr, 1)
            .is_some_and(|v| v.prot & libc::PROT_WRITE != 0 || needs_write_window(mm, v))
    };
    let (direct, forced): (Vec<&PageChunk>, Vec<&PageChunk>) =
        mm.chunks.iter().partition(|c| writable(c.vaddr));
    let anon_vma = |addr: u64| {
        lookup
            .containing(addr, 1)
            .filter(|v| matches!(v.backing, Backing::Anon) && v.prot & libc::PROT_WRITE != 0)
    };
    let piece = |c: &&PageChunk| (pages.slice(c), c.vaddr);
    let (anon, other): (Vec<&PageChunk>, Vec<&PageChunk>) = direct
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
            if let Err(crate::sys::uffd::CopyError { done, source: e }) =
                crate::sys::uffd::copy(&fd, addr, data)
            {
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
