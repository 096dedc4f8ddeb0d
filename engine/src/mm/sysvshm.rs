//! SysV shared memory segments attached by the dumped processes.
//!
//! Collect: every segment some process has attached (a `/SYSV<key>` mapping
//! whose inode is the shmid) is looked up in `/proc/sysvipc/shm` (key, mode,
//! size, owner, attach count) and saved once in `sysvshm-ID.img`. A segment
//! also attached by a process outside the dump, or attached only in part, is
//! refused: its other users would see it change under them, or there is no
//! shmat(2) that recreates the mapping.
//!
//! Restore: before any process is created, the restorer gives each segment
//! back under its old ID. The dumped (and killed) process usually left it
//! behind, unattached: then it is reused, its contents rewritten; otherwise it
//! is created with that ID (`/proc/sys/kernel/shm_next_id`). Each process
//! then attaches it at its old address (remote shmat, see `mm::restore`),
//! and a segment that was marked for removal (IPC_RMID) is marked again once
//! everyone is attached.

use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::image::Blob;
use crate::mm::vma::{Backing, Vma};
use crate::sys::PAGE_SIZE;

/// SHM_DEST in a segment's mode: removed once the last process detaches.
const SHM_DEST: u32 = 0o1000;
/// SHM_LOCKED in a segment's mode.
const SHM_LOCKED: u32 = 0o2000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SysvShm {
    pub id: i32,
    pub key: i32,
    /// The key it was created with: its mappings are named after it, even
    /// once IPC_RMID has made `key` private.
    pub name_key: i32,
    /// Permission bits, with SHM_DEST and SHM_LOCKED.
    pub mode: u32,
    pub size: u64,
    pub uid: u32,
    pub gid: u32,
    /// crc32c of the `size` bytes in `sysvshm-ID.img`.
    pub crc32c: u32,
}

/// One row of `/proc/sysvipc/shm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Row {
    key: i32,
    id: i32,
    mode: u32,
    size: u64,
    nattch: u64,
    uid: u32,
    gid: u32,
}

/// Parses `/proc/sysvipc/shm`: `key shmid perms size cpid lpid nattch uid gid …`.
fn parse_sysvipc(text: &str) -> Vec<Row> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            Some(Row {
                key: w.first()?.parse::<i64>().ok()? as i32,
                id: w.get(1)?.parse().ok()?,
                mode: u32::from_str_radix(w.get(2)?, 8).ok()?,
                size: w.get(3)?.parse().ok()?,
                nattch: w.get(6)?.parse().ok()?,
                uid: w.get(7)?.parse().ok()?,
                gid: w.get(8)?.parse().ok()?,
            })
        })
        .collect()
}

/// The blob holding segment `id`'s contents.
pub fn contents(id: i32) -> Blob {
    Blob::new("sysvshm", id as u64)
}

fn round_up(size: u64) -> u64 {
    size.div_ceil(PAGE_SIZE) * PAGE_SIZE
}

/// The attachments of segments in one process (its `vmas`), each as the
/// indices of its VMAs (split by mprotect, say); `Err` names a partial
/// attachment.
pub fn attachments(
    vmas: &[Vma],
    sizes: &[(i32, u64)],
) -> Result<Vec<Vec<usize>>, PartialAttachment> {
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut open: Option<(i32, u64, u64)> = None; // (shmid, next address, end)
    for (i, v) in vmas.iter().enumerate() {
        let Backing::SysvShm { shmid, offset, .. } = v.backing else {
            continue;
        };
        if let Some((id, next, end)) = open {
            if id == shmid
                && v.start == next
                && offset == next - (end - round_up(size_of(sizes, id)))
            {
                out.last_mut().expect("an open attachment").push(i);
                open = (v.end < end).then_some((id, v.end, end));
                continue;
            }
            return Err(PartialAttachment::EndsEarly { id, next });
        }
        let whole = round_up(size_of(sizes, shmid));
        if offset != 0 {
            return Err(PartialAttachment::Part {
                start: v.start,
                end: v.end,
                shmid,
                offset,
            });
        }
        out.push(vec![i]);
        let end = v.start + whole;
        open = (v.end < end).then_some((shmid, v.end, end));
    }
    if let Some((id, next, _)) = open {
        return Err(PartialAttachment::EndsEarly { id, next });
    }
    Ok(out)
}

/// A SysV shm segment a process has attached only in part.
#[derive(Debug, thiserror::Error)]
pub enum PartialAttachment {
    #[error("segment {id}'s attachment ends early at {next:#x}")]
    EndsEarly { id: i32, next: u64 },
    #[error(
        "mapping {start:#x}-{end:#x} is only part of segment {shmid} (from offset {offset:#x})"
    )]
    Part {
        start: u64,
        end: u64,
        shmid: i32,
        offset: u64,
    },
}

fn size_of(sizes: &[(i32, u64)], id: i32) -> u64 {
    sizes.iter().find(|s| s.0 == id).map_or(0, |s| s.1)
}

/// Saves every segment the dumped processes (pid and mappings of each) attach.
pub fn collect(procs: &[(i32, &[Vma])], dir: &Path) -> Result<Vec<SysvShm>> {
    // (shmid, pid, start, end, name key) of each VMA
    let mut used: Vec<(i32, i32, u64, u64, i32)> = Vec::new();
    for &(pid, vmas) in procs {
        for v in vmas {
            if let Backing::SysvShm { shmid, key, .. } = v.backing {
                used.push((shmid, pid, v.start, v.end, key));
            }
        }
    }
    if used.is_empty() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string("/proc/sysvipc/shm")
        .map_err(|e| Error::io("/proc/sysvipc/shm", e))?;
    let rows = parse_sysvipc(&text);
    let mut out: Vec<SysvShm> = Vec::new();
    let mut sizes: Vec<(i32, u64)> = Vec::new();
    for &(id, pid, start, end, name_key) in &used {
        if out.iter().any(|s| s.id == id) {
            continue;
        }
        let row = rows.iter().find(|r| r.id == id).ok_or_else(|| {
            Error::unsupported(
                pid,
                format!("mapping {start:#x}-{end:#x} is SysV shm segment {id}, which crest's IPC namespace does not show (another IPC namespace)"),
            )
        })?;
        // The kernel counts one attach per VMA (a split adds one).
        let ours = used.iter().filter(|u| u.0 == id).count() as u64;
        if row.nattch != ours {
            return Err(Error::unsupported(
                pid,
                format!(
                    "SysV shm segment {id} is attached {} times, {} of them outside the dump",
                    row.nattch,
                    row.nattch.saturating_sub(ours)
                ),
            ));
        }
        sizes.push((id, row.size));
        let src = format!("/proc/{pid}/map_files/{start:x}-{end:x}");
        let f = std::fs::File::open(&src).map_err(|e| Error::io(&src, e))?;
        let mut data = vec![0u8; row.size as usize];
        f.read_exact_at(&mut data, 0)
            .map_err(|e| Error::io(&src, e))?;
        let blob = contents(id);
        use std::io::Write;
        blob.create(dir)?
            .write_all(&data)
            .map_err(|e| Error::io(blob.path(dir), e))?;
        out.push(SysvShm {
            id,
            key: row.key,
            name_key,
            mode: row.mode,
            size: row.size,
            uid: row.uid,
            gid: row.gid,
            crc32c: crc32c::crc32c(&data),
        });
    }
    for &(pid, vmas) in procs {
        attachments(vmas, &sizes).map_err(|e| {
            Error::unsupported(
                pid,
                format!("a SysV shm attachment it partly unmapped ({e})"),
            )
        })?;
    }
    Ok(out)
}

/// Segments the restorer created, removed again if the restore fails.
#[derive(Default)]
pub struct Created {
    ids: Vec<i32>,
    pub armed: bool,
}

impl Drop for Created {
    fn drop(&mut self) {
        if self.armed {
            for &id in &self.ids {
                // SAFETY: IPC_RMID takes no buffer.
                unsafe { libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()) };
            }
        }
    }
}

fn stat(id: i32) -> Option<libc::shmid_ds> {
    // SAFETY: IPC_STAT writes into a struct we own.
    unsafe {
        let mut ds: libc::shmid_ds = std::mem::zeroed();
        (libc::shmctl(id, libc::IPC_STAT, &mut ds) == 0).then_some(ds)
    }
}

/// Gives every segment back under its old ID with its contents, before any
/// process attaches it.
pub fn prepare(dir: &Path, segments: &[SysvShm]) -> Result<Created, SysvShmError> {
    let mut created = Created {
        ids: Vec::new(),
        armed: true,
    };
    for s in segments {
        let path = contents(s.id).path(dir);
        let data = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        if data.len() as u64 != s.size || crc32c::crc32c(&data) != s.crc32c {
            return Err(Error::bad_image(&path, "truncated or checksum mismatch").into());
        }
        let id = s.id;
        let sys = |what: &str| {
            let source = std::io::Error::last_os_error();
            SysvShmError::Sys {
                id,
                what: what.to_string(),
                source,
            }
        };
        let perms = s.mode & 0o777;
        match stat(s.id) {
            // Left behind by the dumped process: the same segment, unattached.
            Some(ds)
                if ds.shm_perm.__key == s.key
                    && ds.shm_segsz as u64 == s.size
                    && ds.shm_nattch == 0
                    && ds.shm_perm.mode as u32 & 0o777 == perms => {}
            Some(ds) => {
                return Err(SysvShmError::IdTaken {
                    id,
                    key: ds.shm_perm.__key,
                    size: ds.shm_segsz,
                    nattch: ds.shm_nattch,
                })
            }
            None => {
                // A removed segment is created under its old key (the name its
                // mappings show), then removed again once attached.
                let key = if s.mode & SHM_DEST != 0 {
                    s.name_key
                } else {
                    s.key
                };
                if key != libc::IPC_PRIVATE {
                    // SAFETY: shmget without IPC_CREAT only looks the key up.
                    let other = unsafe { libc::shmget(key, 0, 0) };
                    if other >= 0 {
                        return Err(SysvShmError::KeyTaken { id, key, other });
                    }
                }
                std::fs::write("/proc/sys/kernel/shm_next_id", s.id.to_string()).map_err(
                    |source| SysvShmError::Sys {
                        id,
                        what: "/proc/sys/kernel/shm_next_id".into(),
                        source,
                    },
                )?;
                // SAFETY: shmget takes integers.
                let got = unsafe {
                    libc::shmget(
                        key,
                        s.size as usize,
                        libc::IPC_CREAT | libc::IPC_EXCL | perms as i32,
                    )
                };
                if got < 0 {
                    return Err(sys("shmget"));
                }
                created.ids.push(got);
                if got != id {
                    return Err(SysvShmError::WrongId { id, got });
                }
            }
        }
        // SAFETY: attaching the segment in the restorer to fill it; detached below.
        unsafe {
            let at = libc::shmat(s.id, std::ptr::null(), 0);
            if at as isize == -1 {
                return Err(sys("shmat"));
            }
            std::ptr::copy_nonoverlapping(data.as_ptr(), at.cast::<u8>(), data.len());
            libc::shmdt(at);
            let mut ds = stat(s.id).ok_or(SysvShmError::Gone { id })?;
            ds.shm_perm.uid = s.uid;
            ds.shm_perm.gid = s.gid;
            ds.shm_perm.mode = perms as _;
            if libc::shmctl(s.id, libc::IPC_SET, &mut ds) < 0 {
                return Err(sys("IPC_SET of owner and mode"));
            }
            if s.mode & SHM_LOCKED != 0
                && libc::shmctl(s.id, libc::SHM_LOCK, std::ptr::null_mut()) < 0
            {
                return Err(sys("SHM_LOCK"));
            }
        }
    }
    Ok(created)
}

/// Marks segments that were marked for removal again, once every process is attached.
pub fn finish(segments: &[SysvShm]) -> Result<(), SysvShmError> {
    for s in segments.iter().filter(|s| s.mode & SHM_DEST != 0) {
        // SAFETY: IPC_RMID takes no buffer.
        if unsafe { libc::shmctl(s.id, libc::IPC_RMID, std::ptr::null_mut()) } < 0 {
            return Err(SysvShmError::Sys {
                id: s.id,
                what: "IPC_RMID".into(),
                source: std::io::Error::last_os_error(),
            });
        }
    }
    Ok(())
}

/// Why a SysV shm segment could not be given back under its old ID.
#[derive(Debug, thiserror::Error)]
pub enum SysvShmError {
    #[error("SysV shm segment {id}: the ID is taken by another segment (key {key:#x}, {size} bytes, attached {nattch} times)")]
    IdTaken {
        id: i32,
        key: libc::key_t,
        size: libc::size_t,
        nattch: libc::shmatt_t,
    },
    #[error("SysV shm segment {id}: its key {key:#x} is taken by segment {other}")]
    KeyTaken {
        id: i32,
        key: libc::key_t,
        other: i32,
    },
    #[error("SysV shm segment {id}: created as segment {got}")]
    WrongId { id: i32, got: i32 },
    #[error("SysV shm segment {id}: gone")]
    Gone { id: i32 },
    #[error("SysV shm segment {id}: {what}: {source}")]
    Sys {
        id: i32,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Image(#[from] Error),
}

/// The shmat flags and the protection one attachment starts with.
pub fn attach_flags(vmas: &[&Vma]) -> (i32, i32) {
    let write = vmas.iter().any(|v| {
        v.prot & libc::PROT_WRITE != 0
            || matches!(
                v.backing,
                Backing::SysvShm {
                    may_write: true,
                    ..
                }
            )
    });
    let exec = vmas.iter().any(|v| v.prot & libc::PROT_EXEC != 0);
    let flags =
        (if write { 0 } else { libc::SHM_RDONLY }) | (if exec { libc::SHM_EXEC } else { 0 });
    let prot = libc::PROT_READ
        | (if write { libc::PROT_WRITE } else { 0 })
        | (if exec { libc::PROT_EXEC } else { 0 });
    (flags, prot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysvipc_rows_parse() {
        let text = "       key      shmid perms                  size  cpid  lpid nattch   uid   gid  cuid  cgid      atime      dtime      ctime                   rss                  swap\n\
                    1129578496     458815  1600                 65536 20368 20368      1     0     0     0     0 1795641044          0 1795641044                  4096                     0\n";
        let rows = parse_sysvipc(text);
        assert_eq!(
            rows,
            vec![Row {
                key: 1_129_578_496,
                id: 458_815,
                mode: 0o1600,
                size: 65536,
                nattch: 1,
                uid: 0,
                gid: 0,
            }]
        );
    }
}
