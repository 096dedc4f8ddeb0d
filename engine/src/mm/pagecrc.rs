//! Page checksums computed inside the frozen target, from the pages it has
//! mapped anyway, right before it vmsplices them (CRIU's parasite does its
//! page work in the target the same way). Computing them in crest instead
//! means mapping every page of the image file once more, and faulting in,
//! walking and unmapping those mappings costs crest's checksum thread two to
//! three times what the checksum itself does.
//!
//! crest maps a page of code and a data area in the target, writes the list
//! of jobs (a pipe and the pages to vmsplice into it) into the area, and lets
//! the target run the code on its own (PTRACE_CONT, every signal blocked).
//! For each job the code writes a record per page (the page's raw CRC32C and
//! whether it holds anything but zeros), then vmsplices the pages, waiting
//! for room while crest's threads splice the pipes into the page files. So
//! the whole copy costs two ptrace stops, where a remote call per vmsplice
//! costs two each. When crest's readers have all the pages, crest stops the
//! target (PTRACE_INTERRUPT), puts its registers back and reads the records.
//!
//! While the target runs, the kernel updates its thread's rseq area each
//! time the thread comes back to user mode on another CPU, so a page could
//! change between its checksum and its copy: crest copies the piece holding
//! that area itself (see the page pipe).
//!
//! crest then turns the per-page CRCs of a run into the run's CRC32C
//! ([`crate::image::crc`]), so the image is the same as when crest checksums
//! the file itself.

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::error::{Error, Result};
use crate::mm::pages::Run;
use crate::sys::ptrace::Regs;
use crate::sys::remote::RemoteCall as Remote;
use crate::sys::PAGE_SIZE;

// The code run in the target. Input: rdi = the data area ([`Layout`]). For
// each job it records the job's pages, then vmsplices them into the job's
// pipe (blocking: the pipe's reader in crest makes room), going on after a
// short vmsplice from where it stopped. Three pages at a time go through
// three independent CRC chains (the `crc32` instruction has a latency of
// three cycles and a throughput of one). When a vmsplice fails, it stores the
// result as the job's status and closes the pipes' write ends, so crest's
// readers see the end of their pipes instead of waiting. At the end it waits
// in pause() for crest to stop it, or returns if the area says so (tests).
// Uses every register but rsp, and no stack. In `.rodata`: crest never runs
// it itself; it copies the bytes between the two labels.
std::arch::global_asm!(
    ".pushsection .rodata.crest_page_crc, \"a\"",
    ".balign 16",
    ".globl crest_page_crc_start",
    ".hidden crest_page_crc_start",
    "crest_page_crc_start:",
    "    mov r15, rdi", // the area
    "    mov r14, [r15 + {jobs_count}]", // jobs left
    "    lea r13, [r15 + {jobs}]", // job cursor
    "10:",
    "    test r14, r14",
    "    jz 50f",
    "    mov r8, [r13 + 8]", // iovec cursor
    "    mov r9, [r13 + 16]", // iovecs left
    "    mov r10, [r13 + 24]", // record cursor
    "20:",
    "    test r9, r9",
    "    jz 30f",
    "    mov r11, [r8]", // page
    "    mov r12, [r8 + 8]", // bytes left in this iovec
    "    add r8, 16",
    "    dec r9",
    "21:",
    "    test r12, r12",
    "    jz 20b",
    "    xor eax, eax",
    "    xor ecx, ecx",
    "    xor esi, esi",
    "    xor edx, edx",
    "    cmp r12, 12288",
    "    jb 23f",
    "22:",
    "    crc32 rax, qword ptr [r11 + rdx]",
    "    crc32 rcx, qword ptr [r11 + rdx + 4096]",
    "    crc32 rsi, qword ptr [r11 + rdx + 8192]",
    "    add rdx, 8",
    "    cmp rdx, 4096",
    "    jb 22b",
    "    mov [r10], eax",
    "    mov [r10 + 8], ecx",
    "    mov [r10 + 16], esi",
    "    mov ebx, 3",
    "    jmp 24f",
    "23:",
    "    crc32 rax, qword ptr [r11 + rdx]",
    "    add rdx, 8",
    "    cmp rdx, 4096",
    "    jb 23b",
    "    mov [r10], eax",
    "    mov ebx, 1",
    "24:",
    // The rbx pages at r11 get their flag: 1 unless all zeros.
    "    mov rbp, r11",
    "    lea rdi, [r10 + 4]",
    "    mov rsi, rbx",
    "25:",
    "    xor edx, edx",
    "26:",
    "    cmp qword ptr [rbp + rdx], 0",
    "    jne 27f",
    "    add rdx, 8",
    "    cmp rdx, 4096",
    "    jb 26b",
    "    mov dword ptr [rdi], 0",
    "    jmp 28f",
    "27:",
    "    mov dword ptr [rdi], 1",
    "28:",
    "    add rbp, 4096",
    "    add rdi, 8",
    "    dec rsi",
    "    jnz 25b",
    "    mov rax, rbx",
    "    shl rax, 12",
    "    add r11, rax",
    "    sub r12, rax",
    "    shl rbx, 3",
    "    add r10, rbx",
    "    jmp 21b",
    // The job's vmsplice, again from where a short one stopped.
    "30:",
    "    mov rdi, [r13]", // pipe
    "    mov rsi, [r13 + 8]", // iovecs
    "    mov rdx, [r13 + 16]", // iovec count
    "31:",
    "    mov eax, {vmsplice}",
    "    xor r10d, r10d",
    "    syscall",
    "    test rax, rax",
    "    jle 40f",
    "32:",
    "    mov r8, [rsi + 8]",
    "    cmp rax, r8",
    "    jb 33f",
    "    sub rax, r8",
    "    add rsi, 16",
    "    dec rdx",
    "    jnz 32b",
    "    mov qword ptr [r13 + 32], 1", // done
    "    add r13, {job_size}",
    "    dec r14",
    "    jmp 10b",
    "33:",
    "    add [rsi], rax",
    "    sub [rsi + 8], rax",
    "    jmp 31b",
    // A vmsplice failed (or moved nothing: -EIO).
    "40:",
    "    jnz 41f",
    "    mov rax, -5",
    "41:",
    "    mov [r13 + 32], rax",
    "    mov rbx, [r15 + {fds_count}]",
    "    lea rbp, [r15 + {fds}]",
    "42:",
    "    test rbx, rbx",
    "    jz 50f",
    "    mov rdi, [rbp]",
    "    mov eax, {close}",
    "    syscall",
    "    add rbp, 8",
    "    dec rbx",
    "    jmp 42b",
    "50:",
    "    cmp qword ptr [r15 + {mode}], 0",
    "    je 52f",
    "51:",
    "    mov eax, {pause}",
    "    syscall",
    "    jmp 51b",
    "52:",
    "    ret",
    ".globl crest_page_crc_end",
    ".hidden crest_page_crc_end",
    "crest_page_crc_end:",
    ".popsection",
    jobs_count = const Layout::JOBS_COUNT,
    mode = const Layout::MODE,
    fds_count = const Layout::FDS_COUNT,
    fds = const Layout::FDS,
    jobs = const Layout::JOBS,
    job_size = const Layout::JOB_SIZE,
    vmsplice = const libc::SYS_vmsplice,
    close = const libc::SYS_close,
    pause = const libc::SYS_pause,
);

extern "C" {
    static crest_page_crc_start: u8;
    static crest_page_crc_end: u8;
}

/// The code's bytes.
fn code() -> &'static [u8] {
    // SAFETY: the two labels delimit the code above, in a read-only section
    // of this binary that lives as long as it does.
    unsafe {
        let start = std::ptr::addr_of!(crest_page_crc_start);
        let end = std::ptr::addr_of!(crest_page_crc_end);
        std::slice::from_raw_parts(start, end as usize - start as usize)
    }
}

/// The data area: a header (how many jobs; whether the code pauses or
/// returns at the end; the pipes' write ends, closed on a failure), the jobs
/// (pipe, iovecs, iovec count, records, status: 0 to do, 1 done, or a
/// negative errno), then the iovecs, then one record per page (`u32` raw CRC,
/// `u32` non-zero flag).
struct Layout {
    jobs: usize,
    iovs: usize,
    pages: usize,
}

impl Layout {
    const JOBS_COUNT: usize = 0;
    const MODE: usize = 8;
    const FDS_COUNT: usize = 16;
    const FDS: usize = 24;
    const MAX_FDS: usize = 12;
    const JOBS: usize = Self::FDS + Self::MAX_FDS * 8;
    const JOB_SIZE: usize = 40;
    const JOB_STATUS: usize = 32;

    fn iovs_at(&self) -> usize {
        Self::JOBS + self.jobs * Self::JOB_SIZE
    }

    fn records_at(&self) -> usize {
        self.iovs_at() + self.iovs * 16
    }

    fn bytes(&self) -> usize {
        (self.records_at() + self.pages * 8).next_multiple_of(PAGE_SIZE as usize)
    }

    /// The area for `jobs` (each a pipe's write end and its runs) when it is
    /// mapped at `base`: its bytes up to the records (which the code
    /// writes), and its layout.
    fn write(base: u64, jobs: &[(i32, &[Run])], fds: &[i32], pause: bool) -> (Vec<u8>, Layout) {
        let layout = Layout {
            jobs: jobs.len(),
            iovs: jobs.iter().map(|(_, runs)| runs.len()).sum(),
            pages: jobs
                .iter()
                .flat_map(|(_, runs)| runs.iter())
                .map(|r| (r.len / PAGE_SIZE) as usize)
                .sum(),
        };
        let mut area = vec![0u8; layout.records_at()];
        let mut put = |at: usize, v: u64| area[at..at + 8].copy_from_slice(&v.to_ne_bytes());
        put(Self::JOBS_COUNT, jobs.len() as u64);
        put(Self::MODE, pause as u64);
        put(Self::FDS_COUNT, fds.len() as u64);
        for (i, &fd) in fds.iter().enumerate() {
            put(Self::FDS + i * 8, fd as u64);
        }
        let (mut iov, mut record) = (layout.iovs_at(), layout.records_at());
        for (j, (fd, runs)) in jobs.iter().enumerate() {
            let at = Self::JOBS + j * Self::JOB_SIZE;
            put(at, *fd as u64);
            put(at + 8, base + iov as u64);
            put(at + 16, runs.len() as u64);
            put(at + 24, base + record as u64);
            for r in *runs {
                put(iov, r.vaddr);
                put(iov + 8, r.len);
                iov += 16;
                record += (r.len / PAGE_SIZE) as usize * 8;
            }
        }
        (area, layout)
    }

    /// The jobs' statuses and the page records, from the area's bytes that
    /// start at [`Layout::JOBS`].
    fn read(&self, jobs_and_records: &[u8]) -> (Vec<i64>, Vec<PageRecord>) {
        let at = |i: usize| i - Self::JOBS;
        let statuses = (0..self.jobs)
            .map(|j| {
                let s = at(Self::JOBS + j * Self::JOB_SIZE + Self::JOB_STATUS);
                i64::from_ne_bytes(jobs_and_records[s..s + 8].try_into().expect("8 bytes"))
            })
            .collect();
        let records = jobs_and_records
            [at(self.records_at())..at(self.records_at()) + self.pages * 8]
            .chunks_exact(8)
            .map(|r| PageRecord {
                raw_crc: u32::from_ne_bytes(r[0..4].try_into().expect("4 bytes")),
                nonzero: r[4..8] != [0; 4],
            })
            .collect();
        (statuses, records)
    }
}

/// What the code found in one page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRecord {
    /// CRC32C of the page from a zero state, with no final inversion.
    pub raw_crc: u32,
    pub nonzero: bool,
}

/// The code and a data area, mapped in a frozen target; unmapped again when
/// dropped (also on errors).
pub struct TargetCrc<'a> {
    remote: &'a Remote,
    code: u64,
    data: u64,
    data_len: usize,
    mem: File,
}

impl<'a> TargetCrc<'a> {
    /// The most write ends the code closes on a failure.
    pub const MAX_PIPES: usize = Layout::MAX_FDS;

    /// Maps the code, and a data area for up to `max_jobs` jobs of `max_runs`
    /// runs and `max_pages` pages together. `None` when this CPU has no
    /// `crc32` instruction or the target cannot map them (out of memory, or
    /// a policy against executable mappings): crest then checksums the page
    /// files itself.
    pub fn map(
        remote: &'a Remote,
        max_jobs: usize,
        max_runs: usize,
        max_pages: usize,
    ) -> Result<Option<TargetCrc<'a>>> {
        if !std::arch::is_x86_feature_detected!("sse4.2") {
            return Ok(None);
        }
        let pid = remote.tracee.pid;
        let path = format!("/proc/{pid}/mem");
        let mem = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let data_len = Layout {
            jobs: max_jobs,
            iovs: max_runs,
            pages: max_pages,
        }
        .bytes();
        let mmap = |len: usize, prot: i32| -> Result<Option<u64>> {
            let r = remote.raw(
                libc::SYS_mmap,
                [
                    0,
                    len as u64,
                    prot as u64,
                    (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64,
                    u64::MAX,
                    0,
                ],
            )?;
            if (-4095..0).contains(&r) {
                tracing::debug!(pid, errno = -r, "mmap for the page checksum code failed");
                return Ok(None);
            }
            Ok(Some(r as u64))
        };
        let Some(data) = mmap(data_len, libc::PROT_READ | libc::PROT_WRITE)? else {
            return Ok(None);
        };
        let mut crc = TargetCrc {
            remote,
            code: 0,
            data,
            data_len,
            mem,
        };
        // Never writable and executable at once (which a memory-deny-write-
        // execute policy refuses): the code is written through /proc/PID/mem.
        let Some(code_addr) = mmap(PAGE_SIZE as usize, libc::PROT_READ | libc::PROT_EXEC)? else {
            return Ok(None);
        };
        crc.code = code_addr;
        crc.write(code_addr, code())?;
        Ok(Some(crc))
    }

    /// Lets the target run the code for `jobs` (each a pipe's write end in
    /// the target and the runs to vmsplice into it, at most as many as
    /// [`TargetCrc::map`] was given), on its own until [`Running::stop`].
    /// `write_ends`: every pipe of the jobs, closed by the code on a failure.
    pub fn start(&self, jobs: &[(i32, &[Run])], write_ends: &[i32]) -> Result<Running<'_>> {
        assert!(write_ends.len() <= Layout::MAX_FDS);
        let (area, layout) = Layout::write(self.data, jobs, write_ends, true);
        assert!(
            layout.bytes() <= self.data_len,
            "the jobs fit the data area"
        );
        self.write(self.data, &area)?;
        let tracee = self.remote.tracee;
        let saved = tracee.regs()?;
        let mut regs = saved;
        regs.rip = self.code;
        regs.rdi = self.data;
        // -1: not inside a syscall, so the kernel does no restart fix-up.
        regs.orig_rax = u64::MAX;
        tracee.set_regs(&regs)?;
        // Built before the target runs: if resuming fails, dropping it puts
        // the registers back.
        let mut running = Running {
            crc: self,
            layout,
            saved,
            stopped: true,
            halted: false,
        };
        tracee.resume()?;
        running.stopped = false;
        Ok(running)
    }

    pub fn pid(&self) -> i32 {
        self.remote.tracee.pid
    }

    fn write(&self, addr: u64, bytes: &[u8]) -> Result<()> {
        self.mem.write_all_at(bytes, addr).map_err(|e| {
            crate::sys::ptrace::mem_error(self.remote.tracee.pid, "/proc/PID/mem", addr, e)
        })
    }
}

impl Drop for TargetCrc<'_> {
    fn drop(&mut self) {
        for (addr, len) in [(self.code, PAGE_SIZE as usize), (self.data, self.data_len)] {
            if addr == 0 {
                continue;
            }
            match self.remote.call(
                libc::SYS_munmap,
                [addr, len as u64, 0, 0, 0, 0],
                "munmap of crest's page checksum code",
            ) {
                Ok(_) => {}
                // A target that died has nothing left to unmap; the dump's
                // own error says it died.
                Err(Error::Gone { .. }) => return,
                Err(e) => tracing::warn!("{e}"),
            }
        }
    }
}

/// The target running crest's code. Dropping it without [`Running::stop`]
/// (an early return) stops the target all the same.
pub struct Running<'a> {
    crc: &'a TargetCrc<'a>,
    layout: Layout,
    saved: Regs,
    /// In a ptrace stop (ours or a signal's).
    stopped: bool,
    /// Stopped, and its registers put back.
    halted: bool,
}

/// What the code did.
pub struct Ran {
    pub records: Vec<PageRecord>,
    /// The first job that failed, and its vmsplice's errno.
    pub failed: Option<(usize, nix::errno::Errno)>,
}

impl Running<'_> {
    /// An error when the target stopped by itself (a signal: the code makes
    /// none) or died. Does not wait.
    pub fn check(&mut self) -> Result<()> {
        let tracee = self.crc.remote.tracee;
        match tracee.poll_signal_stop()? {
            None => Ok(()),
            Some(sig) => {
                self.stopped = true;
                Err(Error::Refused {
                    pid: tracee.pid,
                    reason: format!("got {sig} while crest's code in it copied its pages"),
                })
            }
        }
    }

    /// Stops the target, puts its registers back, and says what the code did.
    pub fn stop(mut self) -> Result<Ran> {
        self.halt()?;
        let from = Layout::JOBS;
        let mut bytes = vec![0u8; self.layout.records_at() + self.layout.pages * 8 - from];
        let at = self.crc.data + from as u64;
        self.crc.mem.read_exact_at(&mut bytes, at).map_err(|e| {
            crate::sys::ptrace::mem_error(self.crc.remote.tracee.pid, "/proc/PID/mem", at, e)
        })?;
        let (statuses, records) = self.layout.read(&bytes);
        let failed = statuses
            .iter()
            .enumerate()
            .find_map(|(j, &s)| (s < 0).then(|| (j, nix::errno::Errno::from_raw(-s as i32))));
        Ok(Ran { records, failed })
    }

    /// Stops the target (unless it stopped already) and leaves it as every
    /// remote call does: at a syscall-exit stop, with its registers back.
    fn halt(&mut self) -> Result<()> {
        if self.halted {
            return Ok(());
        }
        let remote = self.crc.remote;
        if !self.stopped {
            remote.tracee.interrupt()?;
            self.stopped = true;
        }
        // From a signal stop, resuming without the signal drops it.
        remote.leaving_regs(libc::SYS_getpid, [0; 6], &self.saved)?;
        remote.tracee.set_regs(&self.saved)?;
        self.halted = true;
        Ok(())
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        match self.halt() {
            Ok(()) | Err(Error::Gone { .. }) => {}
            Err(e) => tracing::warn!("{e}"),
        }
    }
}
/// The CRC32C of consecutive pages from their records.
pub fn crc32c_of_pages(records: &[PageRecord]) -> u32 {
    crate::image::crc::of_raw_pages(records.iter().map(|r| r.raw_crc))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page_of(seed: u8, zero: bool) -> Vec<u8> {
        let mut p = vec![0u8; PAGE_SIZE as usize];
        if !zero {
            for (i, b) in p.iter_mut().enumerate() {
                *b = (i as u8).wrapping_mul(31).wrapping_add(seed);
            }
        }
        p
    }

    fn raw_crc(page: &[u8]) -> u32 {
        !crc32c::crc32c_append(u32::MAX, page)
    }

    #[test]
    fn the_code_fits_its_page() {
        assert!(!code().is_empty() && code().len() <= PAGE_SIZE as usize);
    }

    #[test]
    fn pages_combine_to_the_crc_of_their_bytes() {
        let pages: Vec<Vec<u8>> = (0..7).map(|i| page_of(i, i == 3)).collect();
        let records: Vec<PageRecord> = pages
            .iter()
            .map(|p| PageRecord {
                raw_crc: raw_crc(p),
                nonzero: true,
            })
            .collect();
        assert_eq!(crc32c_of_pages(&records), crc32c::crc32c(&pages.concat()));
        assert_eq!(crc32c_of_pages(&records[2..3]), crc32c::crc32c(&pages[2]));
        assert_eq!(crc32c_of_pages(&[]), crc32c::crc32c(&[]));
    }

    /// Runs the code here, in this thread, on `jobs` of this process's
    /// pages, and returns the jobs' statuses and the records.
    fn run_code(jobs: &[(i32, &[Run])], fds: &[i32]) -> (Vec<i64>, Vec<PageRecord>) {
        let page = PAGE_SIZE as usize;
        let mut area = vec![0u64; 1 << 16];
        let base = area.as_ptr() as u64;
        let (bytes, layout) = Layout::write(base, jobs, fds, false);
        assert!(layout.bytes() <= area.len() * 8);
        // SAFETY: `bytes` fits the area (checked above).
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                area.as_mut_ptr().cast::<u8>(),
                bytes.len(),
            )
        };
        // SAFETY: an anonymous mapping of our own, written then made executable.
        let exec = unsafe {
            let at = libc::mmap(
                std::ptr::null_mut(),
                page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert_ne!(at, libc::MAP_FAILED);
            std::ptr::copy_nonoverlapping(code().as_ptr(), at.cast::<u8>(), code().len());
            assert_eq!(
                libc::mprotect(at, page, libc::PROT_READ | libc::PROT_EXEC),
                0
            );
            at
        };
        // SAFETY: the code reads the pages and the area and writes the area;
        // it clobbers the registers named here and rbx and rbp (saved around
        // the call), and uses no stack but the call's, below the red zone.
        unsafe {
            std::arch::asm!(
                "sub rsp, 128",
                "push rbx",
                "push rbp",
                "call {f}",
                "pop rbp",
                "pop rbx",
                "add rsp, 128",
                f = in(reg) exec as u64,
                inout("rdi") base => _,
                out("rax") _, out("rcx") _, out("rdx") _, out("rsi") _,
                out("r8") _, out("r9") _, out("r10") _, out("r11") _,
                out("r12") _, out("r13") _, out("r14") _, out("r15") _,
            );
            libc::munmap(exec, page);
        }
        // SAFETY: reading back the area as bytes.
        let all = unsafe { std::slice::from_raw_parts(area.as_ptr().cast::<u8>(), area.len() * 8) };
        layout.read(&all[Layout::JOBS..])
    }

    fn run(vaddr: *const u8, pages: usize) -> Run {
        Run {
            vaddr: vaddr as u64,
            len: (pages * PAGE_SIZE as usize) as u64,
            file_backed: false,
            readable: true,
        }
    }

    fn pipe() -> (File, i32) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills the two descriptors.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: the read end is ours to own.
        (
            unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fds[0]) },
            fds[1],
        )
    }

    #[test]
    fn the_code_records_each_page_then_splices_it() {
        if !std::arch::is_x86_feature_detected!("sse4.2") {
            return;
        }
        let page = PAGE_SIZE as usize;
        let zero_at = [1usize, 4];
        let mut pages = vec![0u8; 6 * page];
        for i in 0..6 {
            pages[i * page..(i + 1) * page]
                .copy_from_slice(&page_of(i as u8, zero_at.contains(&i)));
        }
        // A page that is zero but for its last byte is not zero.
        pages[2 * page..3 * page].fill(0);
        pages[3 * page - 1] = 7;
        let (mut out, w) = pipe();
        // Two jobs: five pages (a group of three, then two alone), then one.
        let first = [run(pages.as_ptr(), 5)];
        let second = [run(pages[5 * page..].as_ptr(), 1)];
        let (statuses, records) = run_code(&[(w, &first), (w, &second)], &[w]);
        assert_eq!(statuses, [1, 1]);
        let got: Vec<(u32, bool)> = records.iter().map(|r| (r.raw_crc, r.nonzero)).collect();
        let want: Vec<(u32, bool)> = pages
            .chunks(page)
            .map(|p| (raw_crc(p), p.iter().any(|&b| b != 0)))
            .collect();
        assert_eq!(got, want);
        assert_eq!(
            want.iter().map(|w| w.1).collect::<Vec<_>>(),
            [true, false, true, true, false, true]
        );
        // SAFETY: closing our write end, so the read below ends.
        unsafe { libc::close(w) };
        let mut spliced = Vec::new();
        std::io::Read::read_to_end(&mut out, &mut spliced).unwrap();
        assert!(spliced == pages, "the pipe holds the pages in order");
    }

    #[test]
    fn a_full_pipe_takes_the_rest_once_read() {
        if !std::arch::is_x86_feature_detected!("sse4.2") {
            return;
        }
        let page = PAGE_SIZE as usize;
        // 40 pages through a pipe of 16 (the default): vmsplice comes back
        // short, and the code goes on from there.
        let pages: Vec<u8> = (0..40).flat_map(|i| page_of(i as u8, false)).collect();
        let (mut out, w) = pipe();
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; 40 * page];
            std::io::Read::read_exact(&mut out, &mut got).unwrap();
            got
        });
        let runs = [run(pages.as_ptr(), 7), run(pages[7 * page..].as_ptr(), 33)];
        let (statuses, records) = run_code(&[(w, &runs)], &[w]);
        assert_eq!(statuses, [1]);
        assert_eq!(crc32c_of_pages(&records), crc32c::crc32c(&pages));
        assert!(reader.join().unwrap() == pages);
        // SAFETY: our write end.
        unsafe { libc::close(w) };
    }

    #[test]
    fn a_failed_vmsplice_is_its_status_and_closes_the_pipes() {
        if !std::arch::is_x86_feature_detected!("sse4.2") {
            return;
        }
        let pages = page_of(1, false);
        let (_out, w) = pipe();
        let runs = [run(pages.as_ptr(), 1)];
        let (statuses, _) = run_code(&[(w, &runs), (-1, &runs), (w, &runs)], &[w]);
        assert_eq!(statuses, [1, -libc::EBADF as i64, 0]);
        // SAFETY: F_GETFD on a number, no memory passed.
        let flags = unsafe { libc::fcntl(w, libc::F_GETFD) };
        assert_eq!(flags, -1, "the write end is closed");
    }
}
