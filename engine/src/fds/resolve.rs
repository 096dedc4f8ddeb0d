//! Once every process is collected: what each open file becomes and which
//! ones processes share. Ptys and pipes with an end outside the dump, and
//! stdio sockets to peers outside, are rebound to the restorer's stdio or
//! refused; descriptions several processes hold get one id (pipe ends and
//! socket pair ends by inode, the kinds the restorer creates and files
//! shared across fork by `kcmp`); memfds and shared memory objects are
//! saved once; sockets whose peer a restore could not give back are
//! refused; then the table is numbered densely.

use std::collections::HashMap;
use std::path::Path;

use crate::error::{Error, Result};
use crate::fds::table::{FdEntry, FdTable, FileId};
use crate::fds::{inherited, memfd, pipe, tty, FileKind, OpenFile, OpenFiles};
use crate::mm::shmem::Shmem;
use crate::net::{tcp, unix};

/// One process's descriptors, as the dump-wide steps see them.
pub struct ProcFds<'a> {
    pub pid: i32,
    /// A session leader's controlling terminal: its pts index.
    pub ctty: Option<u32>,
    pub table: &'a mut FdTable,
}

/// Once every process is collected: decides what each open file becomes
/// (ptys and pipes whose other end is outside, stdio sockets to peers
/// outside: rebound to the restorer's stdio or refused; see [`tty::resolve`],
/// [`pipe::resolve`]) and which open files processes share, merging their
/// ids (pipe ends by inode, socket pair ends by inode, the other kinds the
/// restorer creates and files shared across fork by `kcmp`). `carry_tcp`
/// keeps stdio TCP connections to the outside (`--tcp-established`).
/// Returns the pipes of the dump.
pub fn resolve(
    procs: &mut [ProcFds],
    files: &mut OpenFiles,
    carry_tcp: bool,
) -> Result<Vec<pipe::Pipe>> {
    // Ptys.
    let ctty: Vec<(i32, Option<u32>)> = procs.iter().map(|p| (p.pid, p.ctty)).collect();
    let held: Vec<(i32, FdEntry)> = procs
        .iter()
        .flat_map(|p| p.table.firsts().into_iter().map(move |e| (p.pid, e)))
        .filter(|(_, e)| matches!(files.file(e.file).kind, FileKind::Pty(_)))
        .collect();
    let ends: Vec<tty::PtyEnd> = held
        .iter()
        .map(|(_, e)| match &files.file(e.file).kind {
            FileKind::Pty(end) => end.clone(),
            _ => unreachable!("filtered above"),
        })
        .collect();
    let holds: Vec<tty::Held> = held
        .iter()
        .zip(&ends)
        .map(|((pid, e), end)| tty::Held {
            pid: *pid,
            fd: e.fd,
            end,
        })
        .collect();
    // `held` is in process order, as tty::resolve walks it.
    let verdicts = tty::resolve(&ctty, &holds)?;
    for ((_, e), verdict) in held.iter().zip(verdicts) {
        if let Some(was) = verdict {
            files.file_mut(e.file).kind = FileKind::Inherited(inherited::Inherited { was });
        }
    }

    // Pipes.
    let dumped: Vec<i32> = procs.iter().map(|p| p.pid).collect();
    let held: Vec<(i32, FdEntry)> = procs
        .iter()
        .flat_map(|p| p.table.firsts().into_iter().map(move |e| (p.pid, e)))
        .filter(|(_, e)| matches!(files.file(e.file).kind, FileKind::Pipe(_)))
        .collect();
    let ends: Vec<pipe::PipeEnd> = held
        .iter()
        .map(|(_, e)| match &files.file(e.file).kind {
            FileKind::Pipe(end) => end.clone(),
            _ => unreachable!("filtered above"),
        })
        .collect();
    let holds: Vec<pipe::Held> = held
        .iter()
        .zip(&ends)
        .map(|((pid, e), end)| pipe::Held {
            pid: *pid,
            fd: e.fd,
            end,
        })
        .collect();
    let (pipes, verdicts) = pipe::resolve(&holds, &dumped)?;
    for ((_, e), verdict) in held.iter().zip(verdicts) {
        if let pipe::Resolved::Outside(was) = verdict {
            files.file_mut(e.file).kind = FileKind::Inherited(inherited::Inherited { was });
        }
    }

    rebind_outside_stdio(procs, files, carry_tcp);
    merge_shared(procs, files);
    Ok(pipes)
}

/// stdin/stdout/stderr on a socket whose peer is not in the dump (a login's
/// or a launcher's outside) is rebound to the restorer's own, as for pipes.
/// `carry_tcp` keeps stdio TCP connections to the outside (`--tcp-established`).
fn rebind_outside_stdio(procs: &[ProcFds], files: &mut OpenFiles, carry_tcp: bool) {
    let held: Vec<FileId> = procs
        .iter()
        .flat_map(|p| p.table.firsts())
        .map(|e| e.file)
        .collect();
    let unix_here: Vec<u64> = held
        .iter()
        .filter_map(|&f| match &files.file(f).kind {
            FileKind::UnixPair(e) => Some(e.inode),
            _ => None,
        })
        .collect();
    let tcp_here: Vec<tcp::TcpConn> = held
        .iter()
        .filter_map(|&f| match &files.file(f).kind {
            FileKind::TcpConn(c) => Some(c.clone()),
            _ => None,
        })
        .collect();
    for p in procs {
        for e in p.table.firsts().iter().filter(|e| e.fd <= 2) {
            let was = match &files.file(e.file).kind {
                FileKind::UnixPair(u) if !unix_here.contains(&u.peer) => {
                    format!("socket:[{}]", u.inode)
                }
                FileKind::TcpConn(c) if !carry_tcp && !tcp_here.iter().any(|o| o.is_peer_of(c)) => {
                    format!("TCP connection {}", c.describe())
                }
                _ => continue,
            };
            files.file_mut(e.file).kind = FileKind::Inherited(inherited::Inherited { was });
        }
    }
}

/// Merges the ids of one open file held by several processes (which then
/// share it), and marks the files the restorer creates.
fn merge_shared(procs: &mut [ProcFds], files: &mut OpenFiles) {
    let mut remap: HashMap<FileId, FileId> = HashMap::new();
    // (id, pid, fd) of the first holder of each file found shared by kcmp.
    let mut owners: Vec<(FileId, i32, i32)> = Vec::new();
    let mut pipes: Vec<((u64, bool), FileId)> = Vec::new();
    let mut pairs: Vec<(u64, FileId)> = Vec::new();
    let held: Vec<(i32, Vec<FdEntry>)> = procs.iter().map(|p| (p.pid, p.table.firsts())).collect();
    for (i, (pid, entries)) in held.iter().enumerate() {
        let pid = *pid;
        for e in entries {
            let id = e.file;
            let merged = match &files.file(id).kind {
                // Every pipe end and socket-pair end is created by the restorer,
                // held by one process or many.
                FileKind::Pipe(end) => Some(intern(&mut pipes, (end.inode, end.write), id)),
                FileKind::UnixPair(end) => Some(intern(&mut pairs, end.inode, id)),
                // Created once by the restorer; held by one process or several.
                FileKind::Eventfd(_)
                | FileKind::Signalfd(_)
                | FileKind::Timerfd(_)
                | FileKind::TcpListen(_)
                | FileKind::TcpConn(_)
                | FileKind::Udp(_)
                | FileKind::Pty(_)
                | FileKind::UnixListen(_) => Some(
                    match owners
                        .iter()
                        .find(|(_, opid, ofd)| crate::sys::fd::same_file(*opid, *ofd, pid, e.fd))
                    {
                        Some(&(owner, _, _)) => owner,
                        None => {
                            owners.push((id, pid, e.fd));
                            id
                        }
                    },
                ),
                // Earlier processes first: is this description one we already saw?
                FileKind::Regular(_)
                | FileKind::Directory(_)
                | FileKind::Device(_)
                | FileKind::Unlinked(_) => {
                    let seen = owners.iter().find(|(_, opid, ofd)| {
                        *opid != pid && crate::sys::fd::same_file(*opid, *ofd, pid, e.fd)
                    });
                    match seen {
                        Some(&(owner, _, _)) => Some(owner),
                        None => {
                            let later = held[i + 1..].iter().any(|(qpid, q)| {
                                q.iter().any(|g| {
                                    matches!(
                                        files.file(g.file).kind,
                                        FileKind::Regular(_)
                                            | FileKind::Directory(_)
                                            | FileKind::Device(_)
                                    ) && crate::sys::fd::same_file(pid, e.fd, *qpid, g.fd)
                                })
                            });
                            later.then(|| {
                                owners.push((id, pid, e.fd));
                                id
                            })
                        }
                    }
                }
                _ => None,
            };
            if let Some(target) = merged {
                files.file_mut(target).shared = true;
                if target != id {
                    remap.insert(id, target);
                }
            }
        }
    }
    apply_remap(procs, files, &|id| remap.get(&id).copied().unwrap_or(id));
}

/// The id `key` was first seen with, or `id` (now its first).
fn intern<K: PartialEq>(seen: &mut Vec<(K, FileId)>, key: K, id: FileId) -> FileId {
    if let Some((_, first)) = seen.iter().find(|(k, _)| *k == key) {
        return *first;
    }
    seen.push((key, id));
    id
}

fn apply_remap(procs: &mut [ProcFds], files: &mut OpenFiles, map: &dyn Fn(FileId) -> FileId) {
    for p in procs.iter_mut() {
        for e in &mut p.table.fds {
            e.file = map(e.file);
        }
    }
    for f in files.iter_mut() {
        f.kind.remap(map);
    }
}

/// Saves every memfd of the dump once into `dir` (each held object, then
/// each one only `mapped`: pid, start, end, inode and name of a mapping),
/// all its descriptors one shared open file. A second, separately opened
/// description of one memfd is refused.
pub fn save_memfds(
    procs: &mut [ProcFds],
    files: &mut OpenFiles,
    mapped: &[(i32, u64, u64, u64, String)],
    dir: &Path,
) -> Result<()> {
    // (inode, id, first holder pid and fd, or -1 when only mapped)
    let mut objects: Vec<(u64, FileId, i32, i32)> = Vec::new();
    let mut remap: HashMap<FileId, FileId> = HashMap::new();
    for p in procs.iter() {
        let pid = p.pid;
        for e in p.table.firsts() {
            let FileKind::Memfd(m) = &files.file(e.file).kind else {
                continue;
            };
            let what = format!("fd {} (memfd {})", e.fd, m.name);
            match objects.iter().find(|o| o.0 == m.inode) {
                Some(&(_, id, hpid, hfd)) => {
                    if !crate::sys::fd::same_file(hpid, hfd, pid, e.fd) {
                        return Err(Error::unsupported(
                            pid,
                            format!("{what} is a second open file description of a memfd held by pid {hpid} fd {hfd}"),
                        ));
                    }
                    remap.insert(e.file, id);
                }
                None => {
                    let mut m = m.clone();
                    memfd::save(pid, &what, &format!("/proc/{pid}/fd/{}", e.fd), dir, &mut m)?;
                    objects.push((m.inode, e.file, pid, e.fd));
                    let f = files.file_mut(e.file);
                    f.kind = FileKind::Memfd(m);
                    f.shared = true;
                }
            }
        }
    }
    apply_remap(procs, files, &|id| remap.get(&id).copied().unwrap_or(id));
    for (pid, start, end, inode, name) in mapped {
        if objects.iter().any(|o| o.0 == *inode) {
            continue;
        }
        let m = memfd::Memfd::mapped(*pid, *start, *end, *inode, name, dir)?;
        let id = files.add(FileKind::Memfd(m));
        files.file_mut(id).shared = true;
        objects.push((*inode, id, -1, -1));
    }
    Ok(())
}

/// Adds shared memory objects (saved by [`crate::mm::shmem`]) to the table:
/// the restorer creates each, and processes map it through its slot.
pub fn add_shmem(files: &mut OpenFiles, objects: Vec<Shmem>) {
    for s in objects {
        let id = files.add(FileKind::Shmem(s));
        files.file_mut(id).shared = true;
    }
}

/// The unlinked files processes hold open: (pid, path).
pub fn unlinked_paths(procs: &[ProcFds], files: &OpenFiles) -> Vec<(i32, String)> {
    procs
        .iter()
        .flat_map(|p| {
            p.table
                .fds
                .iter()
                .filter_map(move |e| match &files.file(e.file).kind {
                    FileKind::Unlinked(u) => Some((p.pid, u.path.clone())),
                    _ => None,
                })
        })
        .collect()
}

/// Refuses what the restore could not give back: a unix socket connected to
/// a process outside the dump, or with both ends bound to a name; a TCP
/// connection to a peer outside the dump unless `carry_tcp`.
pub fn check_peers(procs: &[ProcFds], files: &OpenFiles, carry_tcp: bool, root: i32) -> Result<()> {
    // The first process and fd holding file `id`, for messages.
    let holder = |id: FileId| {
        procs
            .iter()
            .find_map(|p| p.table.first_fd_of(id).map(|fd| (p.pid, fd)))
            .unwrap_or((root, -1))
    };
    for f in files.iter().filter(|f| f.shared) {
        match &f.kind {
            FileKind::UnixPair(end) => {
                let peer = files.iter().find_map(|o| match &o.kind {
                    FileKind::UnixPair(e) if e.inode == end.peer => Some(e),
                    _ => None,
                });
                if peer.is_some_and(|p| !p.name.is_empty() && !end.name.is_empty()) {
                    let (pid, fd) = holder(f.id);
                    return Err(Error::unsupported(
                        pid,
                        format!(
                            "fd {fd} is a unix socket connected to {}, both ends bound to a name",
                            unix::unix_name_text(&end.name)
                        ),
                    ));
                }
                if peer.is_none() {
                    let (pid, fd) = holder(f.id);
                    return Err(Error::unsupported(
                        pid,
                        format!("fd {fd} is a unix socket connected to a process outside the dump"),
                    ));
                }
            }
            FileKind::TcpConn(c) if !carry_tcp => {
                let peer_here = files
                    .iter()
                    .any(|o| matches!(&o.kind, FileKind::TcpConn(p) if p.is_peer_of(c)));
                if !peer_here {
                    let (pid, fd) = holder(f.id);
                    return Err(Error::unsupported(
                        pid,
                        format!(
                            "fd {fd} is a TCP connection {} to a peer outside the dump \
                             (--tcp-established carries it)",
                            c.describe()
                        ),
                    ));
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// Drops the open files nothing refers to any more (files in flight on a
/// socket that was rebound) and numbers the rest densely: first as the
/// processes hold them, then those no descriptor holds.
pub fn compact(procs: &mut [ProcFds], files: &mut OpenFiles) {
    let mut order: Vec<FileId> = Vec::new();
    for p in procs.iter() {
        for e in &p.table.fds {
            if !order.contains(&e.file) {
                order.push(e.file);
            }
        }
    }
    let held = order.clone();
    for f in files.iter() {
        let fdless = match &f.kind {
            FileKind::Shmem(_) | FileKind::Memfd(_) => true,
            FileKind::InFlight(_) => held
                .iter()
                .any(|&h| files.file(h).kind.refers_to().contains(&f.id)),
            _ => false,
        };
        if fdless && !order.contains(&f.id) {
            order.push(f.id);
        }
    }
    let new_id: HashMap<FileId, FileId> = order
        .iter()
        .enumerate()
        .map(|(i, &old)| (old, FileId(i as u32)))
        .collect();
    let mut kept: Vec<OpenFile> = order.iter().map(|&old| files.file(old).clone()).collect();
    for (i, f) in kept.iter_mut().enumerate() {
        f.id = FileId(i as u32);
    }
    files.set_entries(kept);
    apply_remap(procs, files, &|id| new_id[&id]);
}

/// `crest dump --verify-files=hash`: records the contents' checksum of every
/// regular file the processes hold open (`root` names the shared ones).
pub fn record_hashes(procs: &[ProcFds], files: &mut OpenFiles, root: i32) -> Result<()> {
    let ids: Vec<(FileId, i32)> = procs
        .iter()
        .flat_map(|p| p.table.firsts().into_iter().map(move |e| (e.file, p.pid)))
        .collect();
    let mut done: Vec<FileId> = Vec::new();
    for (id, pid) in ids {
        if done.contains(&id) {
            continue;
        }
        done.push(id);
        let f = files.file_mut(id);
        let pid = if f.shared { root } else { pid };
        if let FileKind::Regular(r) = &mut f.kind {
            r.record_hash(pid)?;
        }
    }
    Ok(())
}
