//! Page checksums computed inside the frozen target, from the pages it has
//! mapped anyway, right before it vmsplices them (CRIU's parasite does its
//! page work in the target the same way). Computing them in crest instead
//! means mapping every page of the image file once more, and faulting in,
//! walking and unmapping those mappings costs crest's checksum thread two to
//! three times what the checksum itself does.
//!
//! crest maps a page of code and a data area in the target. The code walks
//! the iovecs of one vmsplice, writes a record per page (the page's raw CRC32C
//! and whether it holds anything but zeros), then makes the vmsplice itself:
//! one remote call does both. The code uses no stack and ends in the
//! `syscall`, so it runs like any remote system call: crest sets the
//! registers, sees the syscall stops, and puts the registers back.
//!
//! crest then turns the per-page CRCs of a run into the run's CRC32C (a CRC
//! is linear: shifting a state past a page of zeros is a fixed map, done with
//! four table lookups), so the image is the same as when crest checksums
//! the file itself.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::OnceLock;

use crate::error::{Error, Result};
use crate::mm::Run;
use crate::task::Remote;
use crate::PAGE_SIZE;

// The code run in the target. Input: rdi = the data area, laid out as
// [`Layout`] says. Three pages at a time go through three independent CRC
// chains (the `crc32` instruction has a latency of three cycles and a
// throughput of one). Uses rax, rcx, rdx, rsi, rdi and r8 to r15; no stack,
// no rbx or rbp (so a test can call it from Rust). In `.rodata`: crest never
// runs it itself; it copies the bytes between the two labels.
std::arch::global_asm!(
    ".pushsection .rodata.crest_page_crc, \"a\"",
    ".balign 16",
    ".globl crest_page_crc_start",
    ".hidden crest_page_crc_start",
    "crest_page_crc_start:",
    "    mov r8, [rdi + 56]", // iovec cursor
    "    mov r9, [rdi + 64]", // iovecs left
    "    lea r10, [rdi + {records}]", // record cursor
    "2:",
    "    test r9, r9",
    "    jz 7f",
    "    mov r11, [r8]", // page
    "    mov r12, [r8 + 8]", // bytes left in this iovec
    "    add r8, 16",
    "    dec r9",
    "3:",
    "    test r12, r12",
    "    jz 2b",
    "    xor eax, eax",
    "    xor ecx, ecx",
    "    xor esi, esi",
    "    xor edx, edx",
    "    cmp r12, 12288",
    "    jb 5f",
    "4:",
    "    crc32 rax, qword ptr [r11 + rdx]",
    "    crc32 rcx, qword ptr [r11 + rdx + 4096]",
    "    crc32 rsi, qword ptr [r11 + rdx + 8192]",
    "    add rdx, 8",
    "    cmp rdx, 4096",
    "    jb 4b",
    "    mov [r10], eax",
    "    mov [r10 + 8], ecx",
    "    mov [r10 + 16], esi",
    "    mov r15, 3",
    "    jmp 6f",
    "5:",
    "    crc32 rax, qword ptr [r11 + rdx]",
    "    add rdx, 8",
    "    cmp rdx, 4096",
    "    jb 5b",
    "    mov [r10], eax",
    "    mov r15, 1",
    "6:",
    // The r15 pages at r11 get their flag: 1 unless all zeros.
    "    mov r13, r11",
    "    lea r14, [r10 + 4]",
    "    mov rsi, r15",
    "61:",
    "    xor edx, edx",
    "62:",
    "    cmp qword ptr [r13 + rdx], 0",
    "    jne 63f",
    "    add rdx, 8",
    "    cmp rdx, 4096",
    "    jb 62b",
    "    mov dword ptr [r14], 0",
    "    jmp 64f",
    "63:",
    "    mov dword ptr [r14], 1",
    "64:",
    "    add r13, 4096",
    "    add r14, 8",
    "    dec rsi",
    "    jnz 61b",
    "    mov rax, r15",
    "    shl rax, 12",
    "    add r11, rax",
    "    sub r12, rax",
    "    shl r15, 3",
    "    add r10, r15",
    "    jmp 3b",
    "7:",
    // The system call crest asked for, with its arguments from the area.
    "    mov rax, [rdi]",
    "    mov rsi, [rdi + 16]",
    "    mov rdx, [rdi + 24]",
    "    mov r10, [rdi + 32]",
    "    mov r8, [rdi + 40]",
    "    mov r9, [rdi + 48]",
    "    mov rdi, [rdi + 8]",
    "    syscall",
    // Only a test, which calls the code, gets here: in the target crest
    // takes over at the syscall-exit stop.
    "    ret",
    ".globl crest_page_crc_end",
    ".hidden crest_page_crc_end",
    "crest_page_crc_end:",
    ".popsection",
    records = const Layout::RECORDS,
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

/// The data area: the system call (number, then six arguments), where its
/// iovecs are and how many, the iovecs, then one record per page
/// (`u32` CRC, `u32` non-zero flag).
struct Layout;

impl Layout {
    const IOVS: usize = 128;
    const RECORDS: usize = Self::IOVS + crate::pagepipe::IOVS_PER_CALL * 16;

    fn bytes(pages: usize) -> usize {
        (Self::RECORDS + pages * 8).next_multiple_of(PAGE_SIZE as usize)
    }
}

/// What the code found in one page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PageRecord {
    /// CRC32C of the page from a zero state, with no final inversion.
    pub raw_crc: u32,
    pub nonzero: bool,
}

/// The code and its data area, mapped in a frozen target; unmapped again
/// when dropped (also on errors).
pub(crate) struct TargetCrc<'a> {
    remote: &'a Remote,
    code: u64,
    data: u64,
    data_len: usize,
    max_pages: usize,
    mem: File,
}

impl<'a> TargetCrc<'a> {
    /// `None` when this CPU has no `crc32` instruction or the target cannot
    /// map the code (out of memory, or a policy against executable
    /// mappings): crest then checksums the page files itself.
    pub fn map(remote: &'a Remote, max_bytes: usize) -> Result<Option<TargetCrc<'a>>> {
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
        let max_pages = max_bytes / PAGE_SIZE as usize;
        let data_len = Layout::bytes(max_pages);
        let mmap = |len: usize, prot: i32| -> Result<Option<u64>> {
            let r = remote.tracee.remote_syscall(
                remote.insn,
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
            max_pages,
            mem,
        };
        // Never writable and executable at once (which a memory-deny-write-
        // execute policy refuses): the code is written through /proc/PID/mem.
        let Some(code_addr) = mmap(PAGE_SIZE as usize, libc::PROT_READ | libc::PROT_EXEC)? else {
            return Ok(None);
        };
        crc.code = code_addr;
        crc.mem
            .write_all_at(code(), code_addr)
            .map_err(|e| Error::io(format!("{path} at {code_addr:#x}"), e))?;
        Ok(Some(crc))
    }

    /// Records the pages of `pieces` (at most `max_bytes` together) into
    /// `records`, then vmsplices them into `pipe_fd` (the target's
    /// descriptor): returns vmsplice's raw result.
    pub fn vmsplice(
        &self,
        pipe_fd: i32,
        pieces: &[Run],
        records: &mut Vec<PageRecord>,
    ) -> Result<i64> {
        let pages: usize = pieces.iter().map(|r| (r.len / PAGE_SIZE) as usize).sum();
        assert!(
            pages <= self.max_pages,
            "a vmsplice batch fits the records area"
        );
        assert!(pieces.len() <= crate::pagepipe::IOVS_PER_CALL);
        let pid = self.remote.tracee.pid;
        let iovs = self.data + Layout::IOVS as u64;
        let mut area = Vec::with_capacity(Layout::IOVS + pieces.len() * 16);
        for v in [
            libc::SYS_vmsplice as u64,
            pipe_fd as u64,
            iovs,
            pieces.len() as u64,
            libc::SPLICE_F_NONBLOCK as u64,
            0,
            0,
            iovs,
            pieces.len() as u64,
        ] {
            area.extend_from_slice(&v.to_ne_bytes());
        }
        area.resize(Layout::IOVS, 0);
        for r in pieces {
            area.extend_from_slice(&r.vaddr.to_ne_bytes());
            area.extend_from_slice(&r.len.to_ne_bytes());
        }
        self.write(self.data, &area)?;
        let n = self.remote.tracee.remote_syscall(
            self.code,
            libc::SYS_vmsplice,
            [self.data, 0, 0, 0, 0, 0],
        )?;
        let mut raw = vec![0u8; pages * 8];
        self.mem
            .read_exact_at(&mut raw, self.data + Layout::RECORDS as u64)
            .map_err(|e| mem_error(pid, self.data, e))?;
        records.clear();
        records.extend(raw.chunks_exact(8).map(|r| PageRecord {
            raw_crc: u32::from_ne_bytes(r[0..4].try_into().expect("4 bytes")),
            nonzero: r[4..8] != [0; 4],
        }));
        Ok(n)
    }

    fn write(&self, addr: u64, bytes: &[u8]) -> Result<()> {
        self.mem
            .write_all_at(bytes, addr)
            .map_err(|e| mem_error(self.remote.tracee.pid, addr, e))
    }
}

fn mem_error(pid: i32, addr: u64, e: std::io::Error) -> Error {
    if e.raw_os_error() == Some(libc::ESRCH) || crate::proc::is_gone(pid) {
        return Error::Gone {
            pid,
            during: "dump",
        };
    }
    Error::io(format!("/proc/{pid}/mem at {addr:#x}"), e)
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

/// The CRC32C of consecutive pages from their records.
pub(crate) fn crc32c_of_pages(records: &[PageRecord]) -> u32 {
    let tables = shift_tables();
    let mut state = u32::MAX;
    for r in records {
        let s = state.to_le_bytes();
        state = tables[0][s[0] as usize]
            ^ tables[1][s[1] as usize]
            ^ tables[2][s[2] as usize]
            ^ tables[3][s[3] as usize]
            ^ r.raw_crc;
    }
    !state
}

/// Tables of the map taking a raw CRC state past a page of zero bytes, one
/// per byte of the state (the map is linear, so the four results XOR).
fn shift_tables() -> &'static [[u32; 256]; 4] {
    static TABLES: OnceLock<Box<[[u32; 256]; 4]>> = OnceLock::new();
    TABLES.get_or_init(|| {
        let zeros = [0u8; PAGE_SIZE as usize];
        // crc32c_append inverts the state before and after: undo both.
        let shift = |state: u32| !crc32c::crc32c_append(!state, &zeros);
        let basis: Vec<u32> = (0..32).map(|bit| shift(1 << bit)).collect();
        let mut t = Box::new([[0u32; 256]; 4]);
        for (byte, table) in t.iter_mut().enumerate() {
            for (v, slot) in table.iter_mut().enumerate() {
                *slot = (0..8)
                    .filter(|b| v & (1 << b) != 0)
                    .fold(0, |acc, b| acc ^ basis[byte * 8 + b]);
            }
        }
        t
    })
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

    /// Runs the code here, on pages of this process, the way the target
    /// runs it, with getpid as the system call at its end.
    #[test]
    fn the_code_records_each_page() {
        if !std::arch::is_x86_feature_detected!("sse4.2") {
            return;
        }
        let page = PAGE_SIZE as usize;
        // Two iovecs: five pages (a group of three, then two alone) and one.
        let zero_at = [1usize, 4];
        let mut pages = vec![0u8; 6 * page];
        for i in 0..6 {
            pages[i * page..(i + 1) * page]
                .copy_from_slice(&page_of(i as u8, zero_at.contains(&i)));
        }
        // A page that is zero but for its last byte is not zero.
        pages[2 * page..3 * page].fill(0);
        pages[3 * page - 1] = 7;
        let base = pages.as_ptr() as u64;
        let mut area = vec![0u64; Layout::bytes(8) / 8];
        let iovs_at = area.as_ptr() as u64 + Layout::IOVS as u64;
        area[0] = libc::SYS_getpid as u64;
        area[7] = iovs_at;
        area[8] = 2;
        let iov = Layout::IOVS / 8;
        area[iov..iov + 4].copy_from_slice(&[
            base,
            5 * page as u64,
            base + 5 * page as u64,
            page as u64,
        ]);

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
        let result: u64;
        // SAFETY: the code reads the pages and iovecs above and writes the
        // records into `area`; it clobbers only the registers named here
        // (and the syscall's rcx and r11), and uses no stack but the call's.
        unsafe {
            std::arch::asm!(
                "sub rsp, 128",
                "call {f}",
                "add rsp, 128",
                f = in(reg) exec as u64,
                inout("rdi") area.as_mut_ptr() as u64 => _,
                out("rax") result,
                out("rcx") _, out("rdx") _, out("rsi") _,
                out("r8") _, out("r9") _, out("r10") _, out("r11") _,
                out("r12") _, out("r13") _, out("r14") _, out("r15") _,
            );
            libc::munmap(exec, page);
        }
        assert_eq!(result as i32, std::process::id() as i32);
        let records: Vec<(u32, bool)> = area[Layout::RECORDS / 8..Layout::RECORDS / 8 + 6]
            .iter()
            .map(|r| (*r as u32, (*r >> 32) != 0))
            .collect();
        let want: Vec<(u32, bool)> = pages
            .chunks(page)
            .map(|p| (raw_crc(p), p.iter().any(|&b| b != 0)))
            .collect();
        assert_eq!(records, want);
        assert_eq!(
            want.iter().map(|w| w.1).collect::<Vec<_>>(),
            [true, false, true, true, false, true]
        );
    }
}
