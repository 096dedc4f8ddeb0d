//! Readers for `/proc/PID/*` that the `procfs` crate does not cover exactly
//! enough for checkpointing: `maps` with its `(deleted)` marker, `smaps` VmFlags,
//! `pagemap` and `fdinfo`. Parsers are pure functions, tested on literal text.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use crate::error::{Error, Result};

/// One line of `/proc/PID/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapsEntry {
    pub start: u64,
    pub end: u64,
    pub read: bool,
    pub write: bool,
    pub exec: bool,
    pub shared: bool,
    pub offset: u64,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub inode: u64,
    /// The path or pseudo-name (`[heap]`, `[stack]`, `[vdso]`…), empty for anonymous.
    pub name: String,
    /// The mapped file was unlinked (`(deleted)` suffix).
    pub deleted: bool,
}

impl MapsEntry {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }

    /// A kernel-provided special mapping such as `[vdso]` or `[vvar]`.
    pub fn is_special(&self) -> bool {
        matches!(
            self.name.as_str(),
            "[vdso]" | "[vvar]" | "[vvar_vclock]" | "[vsyscall]" | "[uprobes]"
        )
    }

    /// Backed by a file (as opposed to anonymous memory or a special mapping).
    pub fn is_file(&self) -> bool {
        self.inode != 0 && self.name.starts_with('/')
    }
}

/// Parses the text of `/proc/PID/maps`.
pub fn parse_maps(text: &str) -> Result<Vec<MapsEntry>, MalformedMaps> {
    text.lines()
        .filter(|l| !l.is_empty())
        .map(parse_maps_line)
        .collect()
}

/// A line of `/proc/PID/maps` crest cannot read.
#[derive(Debug, thiserror::Error)]
#[error("malformed maps line {line:?}")]
pub struct MalformedMaps {
    line: String,
}

fn parse_maps_line(line: &str) -> Result<MapsEntry, MalformedMaps> {
    let bad = || MalformedMaps {
        line: line.to_string(),
    };
    // Five space-separated fields, then padding, then the name (which may contain spaces).
    let mut rest = line;
    let mut fields = [""; 5];
    for f in fields.iter_mut() {
        rest = rest.trim_start_matches(' ');
        let end = rest.find(' ').unwrap_or(rest.len());
        *f = &rest[..end];
        rest = &rest[end..];
    }
    let name = rest.trim_start_matches(' ');
    let (range, perms, offset, dev, inode) =
        (fields[0], fields[1], fields[2], fields[3], fields[4]);
    let (start, end) = range.split_once('-').ok_or_else(bad)?;
    let perms = perms.as_bytes();
    if perms.len() != 4 {
        return Err(bad());
    }
    let (major, minor) = dev.split_once(':').ok_or_else(bad)?;
    let (name, deleted) = match name.strip_suffix(" (deleted)") {
        Some(n) => (n.to_string(), true),
        None => (name.to_string(), false),
    };
    Ok(MapsEntry {
        start: u64::from_str_radix(start, 16).map_err(|_| bad())?,
        end: u64::from_str_radix(end, 16).map_err(|_| bad())?,
        read: perms[0] == b'r',
        write: perms[1] == b'w',
        exec: perms[2] == b'x',
        shared: perms[3] == b's',
        offset: u64::from_str_radix(offset, 16).map_err(|_| bad())?,
        dev_major: u32::from_str_radix(major, 16).map_err(|_| bad())?,
        dev_minor: u32::from_str_radix(minor, 16).map_err(|_| bad())?,
        inode: inode.parse().map_err(|_| bad())?,
        name,
        deleted,
    })
}

/// The `VmFlags:` line of each VMA in `/proc/PID/smaps`, keyed by start address.
pub fn parse_smaps_vmflags(text: &str) -> Vec<(u64, Vec<String>)> {
    let mut out = Vec::new();
    let mut current: Option<u64> = None;
    for line in text.lines() {
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            if let Some(start) = current.take() {
                out.push((
                    start,
                    flags.split_whitespace().map(str::to_string).collect(),
                ));
            }
        } else if let Some((range, _)) = line.split_once(' ') {
            if let Some((start, _)) = range.split_once('-') {
                if let Ok(start) = u64::from_str_radix(start, 16) {
                    current = Some(start);
                }
            }
        }
    }
    out
}

/// The fields of `/proc/PID/fdinfo/N` the engine uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FdInfo {
    pub pos: u64,
    /// Open flags in octal in the file, including O_CLOEXEC.
    pub flags: i32,
    pub mnt_id: u64,
}

pub fn parse_fdinfo(text: &str) -> FdInfo {
    let mut info = FdInfo::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match key {
            "pos" => info.pos = value.parse().unwrap_or(0),
            "flags" => info.flags = i32::from_str_radix(value, 8).unwrap_or(0),
            "mnt_id" => info.mnt_id = value.parse().unwrap_or(0),
            _ => {}
        }
    }
    info
}

/// Reads a `/proc/PID/…` file; a missing process is reported as [`Error::Gone`].
pub fn read(pid: i32, name: &str) -> Result<String> {
    let path = PathBuf::from(format!("/proc/{pid}/{name}"));
    fs::read_to_string(&path).map_err(|e| gone_or_io(pid, path, e))
}

pub fn readlink(pid: i32, name: &str) -> Result<PathBuf> {
    let path = PathBuf::from(format!("/proc/{pid}/{name}"));
    fs::read_link(&path).map_err(|e| gone_or_io(pid, path, e))
}

fn gone_or_io(pid: i32, path: PathBuf, e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::NotFound && is_gone(pid) {
        Error::Gone {
            pid,
            during: "dump",
        }
    } else {
        Error::io(path, e)
    }
}

/// The process no longer exists, or only as a zombie (whose /proc entries
/// other than `stat` and `status` have gone).
pub fn is_gone(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| matches!(rest.trim_start().chars().next(), Some('Z' | 'X'))),
        Err(_) => true,
    }
}

/// A pidfd for `pid` (pidfd_open, Linux 5.3+).
pub fn pidfd_open(pid: i32) -> Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes integers and returns a descriptor we then own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    if fd < 0 {
        return Err(Error::sys(pid, "pidfd_open", nix::errno::Errno::last()));
    }
    // SAFETY: a descriptor just returned to us and owned by nothing else.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Frees the memory of the killed process behind `pidfd` from the caller's
/// side, while the process's own exit frees the rest (process_mrelease, Linux
/// 5.15+, the call user-space OOM killers make). The kernel refuses it
/// (EINVAL) for a process that is not dying, so it cannot take memory from
/// one that lives on.
pub fn release_memory(pidfd: &std::os::fd::OwnedFd) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: process_mrelease takes a descriptor and flags; no memory is passed.
    let r = unsafe { libc::syscall(libc::SYS_process_mrelease, pidfd.as_raw_fd(), 0) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

pub fn maps(pid: i32) -> Result<Vec<MapsEntry>> {
    let text = read(pid, "maps")?;
    parse_maps(&text).map_err(|e| Error::Refused {
        pid,
        reason: e.to_string(),
    })
}

/// A line such as `SigBlk:\t0000000000000000` from `/proc/PID/status`.
pub fn status_field<'a>(status: &'a str, key: &str) -> Option<&'a str> {
    status.lines().find_map(|l| {
        l.strip_prefix(key)
            .and_then(|r| r.strip_prefix(':'))
            .map(str::trim)
    })
}

/// The fields of `/proc/PID/stat` after the command name (field 3 first).
pub fn stat_fields(pid: i32) -> Result<Vec<String>> {
    let s = read(pid, "stat")?;
    Ok(split_stat(&s))
}

/// The fields of a `/proc/PID/stat` text after the command name, which may
/// hold spaces and parentheses.
pub fn split_stat(s: &str) -> Vec<String> {
    let rest = s
        .rfind(')')
        .map(|i| s.get(i + 2..).unwrap_or(""))
        .unwrap_or("");
    rest.split_whitespace().map(str::to_string).collect()
}

/// Field `n` (1-based, as in proc(5)) of a stat split by [`stat_fields`].
pub fn stat_field(f: &[String], n: usize) -> i64 {
    f.get(n - 3).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// Field 22 (starttime): tells a reused PID apart.
pub fn start_time(f: &[String]) -> u64 {
    f.get(22 - 3).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// Task flags (`/proc/PID/stat` field 9) from include/linux/sched.h.
pub const PF_EXITING: i64 = 0x4;
pub const PF_KTHREAD: i64 = 0x0020_0000;

/// Whether `pid` is a zombie.
pub fn is_zombie(pid: i32) -> bool {
    stat_fields(pid)
        .map(|f| f.first().is_some_and(|s| s == "Z"))
        .unwrap_or(false)
}

/// The threads of `pid`, the main thread (tid == pid) first, the rest in order.
pub fn threads_of(pid: i32) -> Vec<i32> {
    let mut tids: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    tids.sort_unstable_by_key(|&t| (t != pid, t));
    tids
}

/// The descriptor numbers `pid` has open, in order.
pub fn fds_of(pid: i32) -> Result<Vec<i32>> {
    let dir = format!("/proc/{pid}/fd");
    let mut fds: Vec<i32> = fs::read_dir(&dir)
        .map_err(|e| gone_or_io(pid, PathBuf::from(&dir), e))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort_unstable();
    Ok(fds)
}

/// The PIDs in `/proc`.
pub fn pids() -> Result<Vec<i32>> {
    Ok(fs::read_dir("/proc")
        .map_err(|e| Error::io("/proc", e))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .collect())
}

/// Whether the kernel marks written pages soft-dirty (CONFIG_MEM_SOFT_DIRTY),
/// and what the probe saw.
pub fn probe_soft_dirty() -> (bool, String) {
    // Writing 4 to clear_refs succeeds even without CONFIG_MEM_SOFT_DIRTY, so
    // look for the bit itself on a page written after clearing.
    if let Err(e) = std::fs::write("/proc/self/clear_refs", "4") {
        return (false, format!("clear_refs refuses 4 ({e})"));
    }
    let page_size = crate::sys::PAGE_SIZE;
    let mut page = vec![0u8; 2 * page_size as usize];
    let addr = (page.as_mut_ptr() as u64).next_multiple_of(page_size);
    // SAFETY: `addr` lies inside `page`, which we own.
    unsafe { std::ptr::write_volatile(addr as *mut u8, 1) };
    let Ok(f) = std::fs::File::open("/proc/self/pagemap") else {
        return (false, "no /proc/self/pagemap".into());
    };
    let mut entry = Vec::new();
    if read_pagemap(&f, addr, addr + page_size, &mut entry).is_err() {
        return (false, "cannot read /proc/self/pagemap".into());
    }
    drop(page);
    if entry.first().is_some_and(|e| e & pagemap::SOFT_DIRTY != 0) {
        (true, "written pages are marked soft-dirty".into())
    } else {
        (
            false,
            "written pages are not marked: CONFIG_MEM_SOFT_DIRTY is off".into(),
        )
    }
}

/// Whether the kernel has the PAGEMAP_SCAN ioctl (Linux 6.7+), and what the
/// probe saw.
pub fn probe_pagemap_scan() -> (bool, String) {
    const PAGEMAP_SCAN: libc::c_ulong = 0xc060_6610;
    let Ok(f) = std::fs::File::open("/proc/self/pagemap") else {
        return (false, "no /proc/self/pagemap".into());
    };
    use std::os::fd::AsRawFd;
    let zero = [0u8; 96];
    // SAFETY: an all-zero pm_scan_arg has size 0, which the kernel rejects with EINVAL before touching memory.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), PAGEMAP_SCAN, zero.as_ptr()) };
    if r >= 0 {
        return (true, "available".into());
    }
    match nix::errno::Errno::last() {
        nix::errno::Errno::ENOTTY => (false, "no PAGEMAP_SCAN ioctl (Linux 6.7+)".into()),
        nix::errno::Errno::EINVAL => (true, "available".into()),
        e => (false, e.to_string()),
    }
}

/// `/proc/PID/pagemap` bits.
pub mod pagemap {
    pub const PRESENT: u64 = 1 << 63;
    pub const SWAPPED: u64 = 1 << 62;
    /// Page is a file page or shared anonymous memory.
    pub const FILE_OR_SHARED: u64 = 1 << 61;
    pub const PFN_MASK: u64 = (1 << 55) - 1;
    /// Written since `clear_refs` 4 (CONFIG_MEM_SOFT_DIRTY).
    pub const SOFT_DIRTY: u64 = 1 << 55;
}

/// Reads pagemap entries for `[start, end)` of `pid` into `out` (one u64 per page).
pub fn read_pagemap(
    file: &fs::File,
    start: u64,
    end: u64,
    out: &mut Vec<u64>,
) -> std::io::Result<()> {
    let pages = ((end - start) / crate::sys::PAGE_SIZE) as usize;
    out.clear();
    out.resize(pages, 0);
    // SAFETY: a u64 slice is plain memory; viewing it as bytes of the same length is sound.
    let bytes = unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr().cast::<u8>(), pages * 8) };
    let mut done = 0;
    while done < bytes.len() {
        let n = file.read_at(
            &mut bytes[done..],
            (start / crate::sys::PAGE_SIZE) * 8 + done as u64,
        )?;
        if n == 0 {
            break;
        }
        done += n;
    }
    Ok(())
}

/// `PAGEMAP_SCAN` (Linux 6.7+): the ioctl on a pagemap file that lists page
/// ranges by category, walking only populated page tables, so a huge sparse
/// reservation costs nothing.
pub mod pagemap_scan {
    /// Not write-protected by an async userfaultfd since the last
    /// `WP_MATCHING` scan: written (or faulted in) since.
    pub const IS_WRITTEN: u64 = 1 << 1;
    pub const IS_FILE: u64 = 1 << 2;
    pub const IS_PRESENT: u64 = 1 << 3;
    pub const IS_SWAPPED: u64 = 1 << 4;
    pub const IS_PFNZERO: u64 = 1 << 5;

    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct PageRegion {
        pub start: u64,
        pub end: u64,
        pub categories: u64,
    }

    #[repr(C)]
    #[derive(Default)]
    struct ScanArg {
        size: u64,
        flags: u64,
        start: u64,
        end: u64,
        walk_end: u64,
        vec: u64,
        vec_len: u64,
        max_pages: u64,
        category_inverted: u64,
        category_mask: u64,
        category_anyof_mask: u64,
        return_mask: u64,
    }

    /// `_IOWR('f', 16, struct pm_scan_arg)`.
    const PAGEMAP_SCAN: u64 =
        (3 << 30) | ((std::mem::size_of::<ScanArg>() as u64) << 16) | (0x66 << 8) | 16;

    /// `PM_SCAN_WP_MATCHING`: write-protect the pages reported, atomically
    /// with reading their categories.
    pub const WP_MATCHING: u64 = 1 << 0;
    /// `PM_SCAN_CHECK_WPASYNC`: fail with EPERM where a VMA of the range is
    /// not registered with an async write-protecting userfaultfd.
    pub const CHECK_WPASYNC: u64 = 1 << 1;

    /// Appends to `out` the ranges of `[start, end)` having any category in
    /// `anyof`, each with its categories among `ret`. Err(ENOTTY/EINVAL) when
    /// the kernel has no PAGEMAP_SCAN.
    pub fn scan(
        pagemap: &std::fs::File,
        start: u64,
        end: u64,
        anyof: u64,
        ret: u64,
        out: &mut Vec<PageRegion>,
    ) -> std::io::Result<()> {
        scan_with(pagemap, start, end, 0, 0, anyof, ret, out)
    }

    /// [`scan`] with `flags` (`WP_MATCHING`, `CHECK_WPASYNC`) and categories
    /// every reported page must have (`all`).
    #[allow(clippy::too_many_arguments)]
    pub fn scan_with(
        pagemap: &std::fs::File,
        start: u64,
        end: u64,
        flags: u64,
        all: u64,
        anyof: u64,
        ret: u64,
        out: &mut Vec<PageRegion>,
    ) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let mut buf = [PageRegion::default(); 512];
        let mut at = start;
        while at < end {
            let mut arg = ScanArg {
                size: std::mem::size_of::<ScanArg>() as u64,
                flags,
                start: at,
                end,
                vec: buf.as_mut_ptr() as u64,
                vec_len: buf.len() as u64,
                category_mask: all,
                category_anyof_mask: anyof,
                return_mask: ret,
                ..Default::default()
            };
            // SAFETY: `arg` is a valid pm_scan_arg whose vec points at `buf`
            // (vec_len entries), both live across the call.
            let n = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN as _, &mut arg) };
            if n < 0 {
                return Err(std::io::Error::last_os_error());
            }
            out.extend_from_slice(&buf[..n as usize]);
            if arg.walk_end <= at {
                break;
            }
            at = arg.walk_end;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_memory_refuses_a_live_process_and_takes_a_killed_one() {
        use nix::sys::signal::{kill, Signal};
        use std::os::unix::process::ExitStatusExt;
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let pidfd = pidfd_open(pid.as_raw()).expect("pidfd_open");
        let e = release_memory(&pidfd).expect_err("a live process's memory released");
        kill(pid, Signal::SIGKILL).unwrap();
        if e.raw_os_error() != Some(libc::ENOSYS) {
            // (ENOSYS: before Linux 5.15.)
            assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{e}");
            // It may have exited already: then nothing is left to free.
            if let Err(e) = release_memory(&pidfd) {
                assert_eq!(e.raw_os_error(), Some(libc::ESRCH), "{e}");
            }
        }
        let status = child.wait().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL));
    }

    #[test]
    fn pagemap_scan_finds_touched_pages_or_is_absent() {
        use pagemap_scan::*;
        let page = crate::sys::PAGE_SIZE as usize;
        let len = 64 * page;
        // SAFETY: a fresh private anonymous mapping, unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        // SAFETY: pages 3, 4 and 40 of the mapping.
        unsafe {
            *p.cast::<u8>().add(3 * page) = 1;
            *p.cast::<u8>().add(4 * page) = 1;
            *p.cast::<u8>().add(40 * page) = 1;
        }
        let f = fs::File::open("/proc/self/pagemap").unwrap();
        let mut out = Vec::new();
        let base = p as u64;
        let r = scan(
            &f,
            base,
            base + len as u64,
            IS_PRESENT | IS_SWAPPED,
            IS_PRESENT,
            &mut out,
        );
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(p, len) };
        match r {
            Ok(()) => {
                let got: Vec<(u64, u64)> = out
                    .iter()
                    .map(|r| ((r.start - base) / page as u64, (r.end - base) / page as u64))
                    .collect();
                assert_eq!(got, vec![(3, 5), (40, 41)]);
            }
            Err(e) => assert!(
                matches!(e.raw_os_error(), Some(libc::ENOTTY) | Some(libc::EINVAL)),
                "{e}"
            ),
        }
    }

    const MAPS: &str = "\
55d0c0a00000-55d0c0a02000 r--p 00000000 fe:01 1835041                    /usr/bin/cat
55d0c2400000-55d0c2421000 rw-p 00000000 00:00 0                          [heap]
7f1e5c000000-7f1e5c021000 rw-s 00000000 00:01 4321                       /memfd:shm with space (deleted)
7ffd4a9d6000-7ffd4a9f7000 rw-p 00000000 00:00 0                          [stack]
7ffd4a9fb000-7ffd4a9fd000 r-xp 00000000 00:00 0                          [vdso]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
7f0000000000-7f0000001000 ---p 00001000 00:00 0 
";

    #[test]
    fn maps_lines_parse_with_names_spaces_and_deleted_marker() {
        let maps = parse_maps(MAPS).unwrap();
        assert_eq!(maps.len(), 7);
        assert_eq!(maps[0].name, "/usr/bin/cat");
        assert!(maps[0].read && !maps[0].write && !maps[0].shared && maps[0].is_file());
        assert_eq!(
            (maps[0].dev_major, maps[0].dev_minor, maps[0].inode),
            (0xfe, 1, 1835041)
        );
        assert_eq!(maps[1].name, "[heap]");
        assert_eq!(maps[1].len(), 0x21000);
        assert_eq!(maps[2].name, "/memfd:shm with space");
        assert!(maps[2].deleted && maps[2].shared);
        assert!(maps[4].is_special() && maps[5].is_special());
        assert_eq!(maps[6].name, "");
        assert_eq!(maps[6].offset, 0x1000);
        assert!(!maps[6].read && !maps[6].write && !maps[6].exec);
    }

    #[test]
    fn malformed_maps_line_is_an_error_not_a_panic() {
        assert!(parse_maps("zzzz r--p").is_err());
        assert!(parse_maps("1000-2000 rw 0 0:0 0").is_err());
    }

    #[test]
    fn smaps_vmflags_are_keyed_by_start() {
        let text = "7ffd4a9d6000-7ffd4a9f7000 rw-p 00000000 00:00 0      [stack]\nSize: 132 kB\nVmFlags: rd wr mr mw me gd ac\n";
        assert_eq!(
            parse_smaps_vmflags(text),
            vec![(
                0x7ffd4a9d6000,
                ["rd", "wr", "mr", "mw", "me", "gd", "ac"]
                    .map(String::from)
                    .to_vec()
            )]
        );
    }

    #[test]
    fn fdinfo_flags_are_octal() {
        let info = parse_fdinfo("pos:\t4096\nflags:\t02100002\nmnt_id:\t25\nino:\t12\n");
        assert_eq!(
            info,
            FdInfo {
                pos: 4096,
                flags: 0o2100002,
                mnt_id: 25
            }
        );
    }

    #[test]
    fn status_fields_are_found_by_key() {
        let status = "Name:\tcat\nUmask:\t0022\nSigBlk:\t0000000000010000\n";
        assert_eq!(status_field(status, "Umask"), Some("0022"));
        assert_eq!(status_field(status, "SigBlk"), Some("0000000000010000"));
        assert_eq!(status_field(status, "Nope"), None);
    }
}
