//! Planning a restore, before any process exists: for each process, its
//! part of the tree ([`tree::plan`]), the slots where the restorer holds the
//! open files it creates, the descriptors its mappings map from, and the
//! address of the trampoline the restorer drives it through.

use std::ffi::CString;

use crate::restore::error::RestoreError;

type Result<T, E = RestoreError> = std::result::Result<T, E>;
use crate::fds::restore::Slots;
use crate::fds::table::FileId;
use crate::fds::{FileKind, OpenFiles};
use crate::mm::{find_gap, Backing};
use crate::model::{Checkpoint, ProcessImage};
use crate::sys::proc;
use crate::sys::PAGE_SIZE;
use crate::tree::{self, TreePlan};

/// The trampoline mapped in each restore child: a `syscall` instruction,
/// then a scratch page.
pub const TRAMPOLINE_LEN: u64 = 2 * PAGE_SIZE;

/// What one restore child does beyond the tree, computed before any clone.
#[derive(Debug, Clone)]
pub struct ChildPlan {
    /// Files to keep open for mmap, the fd each goes to, and whether for writing.
    pub map_files: Vec<(CString, i32, bool)>,
    /// The descriptor each mapping maps from (image order; `None` for the
    /// mappings that map none).
    pub vma_fds: Vec<Option<i32>>,
    pub exe: (CString, i32, bool),
    pub cwd: CString,
    pub comm: CString,
    /// Where the trampoline goes.
    pub trampoline: u64,
}

/// Every process's plan: the tree's and the child's, image order.
pub struct Plan {
    pub tree: Vec<TreePlan>,
    pub children: Vec<ChildPlan>,
    /// Where the restorer holds the open files it creates, in every child.
    pub slots: Slots,
}

/// Plans every process of the image, in image order (parents first).
pub fn plan(image: &Checkpoint) -> Result<Plan> {
    let base = slots_base(image);
    let slots = Slots::new(&image.files, base);
    for p in &image.processes {
        crate::task::limits::warn_unraisable(p.pid, &p.state.rlimits);
    }
    let own_maps = proc::maps(std::process::id() as i32)?;
    let members: Vec<tree::Member> = image.processes.iter().map(ProcessImage::member).collect();
    let inv = &image.inventory;
    let mut trees = tree::plan(
        &members,
        inv.root_pid,
        &inv.zombies,
        &inv.lost_session_leaders,
        &inv.lost_group_leaders,
    );
    let mut children = Vec::new();
    for (p, t) in image.processes.iter().zip(&mut trees) {
        let (file_fds, exe_fd) = helper_fds(p, &image.files, &slots)?;
        let cstr = |s: &str, what| {
            CString::new(s).map_err(|_| RestoreError::BadString {
                pid: p.pid,
                what,
                value: s.to_string(),
            })
        };
        let map_files = file_fds
            .iter()
            .map(|(path, fd, writable)| Ok((cstr(path, "path")?, *fd, *writable)))
            .collect::<Result<Vec<_>>>()?;
        let vma_fds =
            p.mm.vmas
                .iter()
                .map(|v| {
                    let source = source_of(&v.backing, &image.files, &slots)?;
                    Ok(source.and_then(|s| {
                        file_fds
                            .iter()
                            .find(|(q, _, _)| *q == s)
                            .map(|(_, fd, _)| *fd)
                    }))
                })
                .collect::<Result<Vec<_>>>()?;
        let mut taken: Vec<(u64, u64)> = own_maps.iter().map(|m| (m.start, m.end)).collect();
        taken.extend(p.mm.vmas.iter().map(|v| (v.start, v.end)));
        let trampoline = find_gap(&taken, TRAMPOLINE_LEN, 0x10_0000)
            .ok_or(RestoreError::NoRoomForTrampoline { pid: p.pid })?;
        t.err_fd = exe_fd + 1;
        debug_assert!(t.err_fd < base);
        // A session leader's controlling terminal: the slot of a slave of
        // that pty, made the controlling terminal right after setsid().
        t.ctty_slot = p.ctty.and_then(|index| {
            image.files.iter().find_map(|f| match &f.kind {
                FileKind::Pty(e) if !e.master && e.index == index => slots.of(f.id),
                _ => None,
            })
        });
        children.push(ChildPlan {
            map_files,
            vma_fds,
            exe: (cstr(&p.mm.exe, "exe")?, exe_fd, false),
            cwd: cstr(&p.files.cwd, "cwd")?,
            comm: cstr(&p.state.comm, "comm")?,
            trampoline,
        });
    }
    Ok(Plan {
        tree: trees,
        children,
        slots,
    })
}

/// The path a mapping is mapped from in its restore child: a file's own, or
/// (a shared memory object, a memfd) the slot the restorer holds it at
/// (`/proc/self/fd/SLOT`); `None` for anonymous and special mappings.
fn source_of(backing: &Backing, files: &OpenFiles, slots: &Slots) -> Result<Option<String>> {
    let slot_of = |found: Option<FileId>, what: String| {
        let slot = found
            .and_then(|id| slots.of(id))
            .ok_or(RestoreError::MissingSource { what })?;
        Ok(Some(format!("/proc/self/fd/{slot}")))
    };
    match backing {
        Backing::File { path, .. } => Ok(Some(path.clone())),
        Backing::SharedAnon { inode, .. } => slot_of(
            files
                .iter()
                .find(|f| matches!(&f.kind, FileKind::Shmem(s) if s.inode == *inode))
                .map(|f| f.id),
            format!("shared memory object {inode}"),
        ),
        Backing::Memfd { inode, .. } => slot_of(
            files
                .iter()
                .find(|f| matches!(&f.kind, FileKind::Memfd(m) if m.inode == *inode))
                .map(|f| f.id),
            format!("memfd {inode}"),
        ),
        _ => Ok(None),
    }
}

/// Helper descriptors: (source path, fd, opened for writing) per source, and the exe's fd.
type HelperFds = (Vec<(String, i32, bool)>, i32);

/// The descriptors the restore child keeps open for the restorer: one per
/// mapped file or shared memory object (in order of first appearance), then
/// the executable. They sit just above the process's own highest fd and are
/// closed before it resumes. A shared memory object is reopened from the slot
/// the restorer put it in (`/proc/self/fd/SLOT`).
fn helper_fds(p: &ProcessImage, files: &OpenFiles, slots: &Slots) -> Result<HelperFds> {
    let base = p.files.fds.iter().map(|f| f.fd).max().unwrap_or(2).max(2) + 1;
    let mut out: Vec<(String, i32, bool)> = Vec::new();
    for v in &p.mm.vmas {
        let writable = match &v.backing {
            Backing::File {
                shared, may_write, ..
            }
            | Backing::Memfd {
                shared, may_write, ..
            } => *shared && *may_write,
            Backing::SharedAnon { .. } => true,
            _ => continue,
        };
        let Some(source) = source_of(&v.backing, files, slots)? else {
            continue;
        };
        match out.iter_mut().find(|(q, _, _)| *q == source) {
            Some(entry) => entry.2 |= writable,
            None => out.push((source, base + out.len() as i32, writable)),
        }
    }
    let exe = base + out.len() as i32;
    Ok((out, exe))
}

/// The first fd number free in every restore child above its own descriptors,
/// helper descriptors and report pipe: where the restorer's slots begin.
fn slots_base(image: &Checkpoint) -> i32 {
    image
        .processes
        .iter()
        .map(|p| {
            let max_fd = p.files.fds.iter().map(|f| f.fd).max().unwrap_or(2).max(2);
            let mut sources: Vec<String> = Vec::new();
            for v in &p.mm.vmas {
                let key = match &v.backing {
                    Backing::File { path, .. } => path.clone(),
                    Backing::SharedAnon { inode, .. } => format!("shmem {inode}"),
                    Backing::Memfd { inode, .. } => format!("memfd {inode}"),
                    _ => continue,
                };
                if !sources.contains(&key) {
                    sources.push(key);
                }
            }
            // fds, helper fds, the exe, the report pipe
            max_fd + 1 + sources.len() as i32 + 2
        })
        .max()
        .unwrap_or(8)
}
