//! Restoring descriptors: the restorer creates the open files processes
//! share, each at its slot ([`restore_in_restorer`]), and each restore
//! child puts its own descriptors in place ([`restore_in_child`]); in both
//! loops a kind answers "done" or "not yet", and the loop comes back to
//! those. Before anything, the regular files are checked to be the ones
//! dumped ([`verify_unchanged`]).

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::Instant;

use crate::fds::memfd::MemfdError;
use crate::fds::pipe::PipeError;
use crate::fds::regular::FileChanged;
use crate::fds::table::{ChildFds, FdEntry, FdTable, FileId, OpenError, Opened, Restored};
use crate::fds::tty::PtyError;
use crate::fds::{pipe, timerfd, tty, FileKind, OpenFiles};
use crate::mm::shmem::ShmemError;
use crate::net::tcp::TcpError;
use crate::net::udp::UdpError;
use crate::net::unix::UnixError;
use crate::net::{tcp, udp, unix};

/// Why the descriptors of a restored process could not be put in place.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error("cannot reserve fd {at} for a shared file: {source}")]
    Reserve {
        at: i32,
        #[source]
        source: std::io::Error,
    },
    #[error("shared file {id}: cannot place it at fd {at}: {source}")]
    Place {
        id: FileId,
        at: i32,
        #[source]
        source: std::io::Error,
    },
    #[error("shared file {id} is neither a file nor a device")]
    NotAFile { id: FileId },
    #[error("open files {ids:?} wait for each other")]
    FilesWait { ids: Vec<FileId> },
    #[error("fds {fds:?} wait for each other")]
    FdsWait { fds: Vec<i32> },
    #[error("fd {fd}: nothing to open")]
    NothingToOpen { fd: i32 },
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error(transparent)]
    Pipe(#[from] PipeError),
    #[error(transparent)]
    Pty(#[from] PtyError),
    #[error(transparent)]
    Memfd(#[from] MemfdError),
    #[error(transparent)]
    Shmem(#[from] ShmemError),
    #[error(transparent)]
    Unix(#[from] UnixError),
    #[error(transparent)]
    Tcp(#[from] TcpError),
    #[error(transparent)]
    Udp(#[from] UdpError),
}

/// Checks before a restore that every regular file process `pid` holds is
/// still the file that was dumped.
pub fn verify_unchanged(pid: i32, table: &FdTable, files: &OpenFiles) -> Result<(), FileChanged> {
    for e in table.firsts() {
        if let FileKind::Regular(r) = &files.file(e.file).kind {
            r.verify(pid, e.fd)?;
        }
    }
    Ok(())
}

/// Where the restorer holds the open files it creates: slot `base + n` for
/// the n-th of them, inherited by every restore child.
#[derive(Debug, Clone, Default)]
pub struct Slots {
    slots: HashMap<FileId, i32>,
}

impl Slots {
    /// Slots from `base` for the files the restorer creates.
    pub fn new(files: &OpenFiles, base: i32) -> Slots {
        Slots {
            slots: files
                .iter()
                .filter(|f| f.shared)
                .enumerate()
                .map(|(n, f)| (f.id, base + n as i32))
                .collect(),
        }
    }

    pub fn of(&self, id: FileId) -> Option<i32> {
        self.slots.get(&id).copied()
    }

    pub fn count(&self) -> i32 {
        self.slots.len() as i32
    }

    /// Every slot, in no order.
    pub fn all(&self) -> impl Iterator<Item = i32> + '_ {
        self.slots.values().copied()
    }
}

/// Holds fd `at` with a close-on-exec /dev/null until the open file is
/// placed there (dup3 replaces it atomically).
fn reserve_slot(at: i32) -> Result<(), FilesError> {
    raise_nofile_for(at);
    // SAFETY: open of a constant path; dup3 and close on fds we own.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
        if null < 0 || libc::dup3(null, at, libc::O_CLOEXEC) < 0 {
            let e = std::io::Error::last_os_error();
            if null >= 0 {
                libc::close(null);
            }
            return Err(FilesError::Reserve { at, source: e });
        }
        libc::close(null);
    }
    Ok(())
}

/// Raises our own soft fd limit when `at` is beyond it (the hard limit allowing).
pub fn raise_nofile_for(at: i32) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on ourselves with a struct we own.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        if lim.rlim_cur <= at as u64 && lim.rlim_max > at as u64 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Places `opened` at exactly `at` (raising our own soft fd limit if needed).
fn place(id: FileId, opened: Opened, at: i32) -> Result<OwnedFd, FilesError> {
    raise_nofile_for(at);
    let fd = opened.fd.into_raw_fd();
    // SAFETY: dup3, fcntl and close on fds we own.
    unsafe {
        if libc::dup3(fd, at, libc::O_CLOEXEC) < 0 {
            let e = std::io::Error::last_os_error();
            libc::close(fd);
            return Err(FilesError::Place { id, at, source: e });
        }
        libc::close(fd);
        if let Some(flags) = opened.status_flags {
            // Status flags belong to the open file description, shared by every holder.
            libc::fcntl(at, libc::F_SETFL, flags);
        }
        Ok(OwnedFd::from_raw_fd(at))
    }
}

/// Creates every open file the restorer holds (the shared ones), each at its
/// slot, where the restore children inherit them. Each kind answers "done"
/// or "not yet" and the loop comes back to those: a pty slave after its
/// master, a unix socket pair after the files in flight on it, TCP
/// connections after every other file (a listener binds its port normally,
/// an accepted connection on the same port then binds it in repair mode),
/// UDP sockets after them all (their queues are refilled from the senders'
/// addresses, which may be another socket's), listening unix sockets after
/// the socket pairs (an accepted end gets its name through a throwaway
/// listener at the same address). `pipes`: the dump's pipes;
/// `dir`: the image, for contents saved apart. Returns the descriptors at
/// the slots, to be closed once the children have them.
pub fn restore_in_restorer(
    files: &OpenFiles,
    slots: &Slots,
    pipes: &[pipe::Pipe],
    dir: &Path,
    port_deadline: Instant,
) -> Result<Vec<OwnedFd>, FilesError> {
    // Every slot reserved first, so that the pipes, sockets and connections
    // created below never get a slot's number: placing a shared file there
    // would close one of them under its owner (a job with many shared files,
    // like an MPI tree, reaches that far).
    let mut ids: Vec<FileId> = files
        .iter()
        .filter_map(|f| slots.of(f.id).map(|_| f.id))
        .collect();
    for &id in &ids {
        reserve_slot(slots.of(id).expect("a slot"))?;
    }
    let of_kind = |pick: fn(&FileKind) -> bool| files.iter().filter(move |f| pick(&f.kind));
    let mut pipes = pipe::Pipes::new(pipes);
    let mut pairs = unix::Pairs::new(
        of_kind(|k| matches!(k, FileKind::UnixPair(_)))
            .filter_map(|f| match &f.kind {
                FileKind::UnixPair(e) => Some(e),
                _ => None,
            })
            .collect(),
    );
    let mut ptys = tty::Masters::default();
    let mut conns = tcp::Connections::new(
        files
            .iter()
            .filter(|f| f.shared)
            .filter_map(|f| match &f.kind {
                FileKind::TcpConn(c) => Some(c),
                _ => None,
            })
            .collect(),
    );
    let mut udp = udp::Sockets::new(
        files
            .iter()
            .filter(|f| f.shared)
            .filter_map(|f| match &f.kind {
                FileKind::Udp(u) => Some(u),
                _ => None,
            })
            .collect(),
    );
    let mut placed: HashMap<FileId, OwnedFd> = HashMap::new();
    while !ids.is_empty() {
        let pending_kinds: Vec<&FileKind> = ids.iter().map(|&id| &files.file(id).kind).collect();
        let others_pending = |also: fn(&FileKind) -> bool| {
            pending_kinds
                .iter()
                .any(|k| !matches!(k, FileKind::Udp(_)) && !also(k))
        };
        let tcp_waits = others_pending(|k| matches!(k, FileKind::TcpConn(_)));
        let udp_waits = others_pending(|_| false);
        let pairs_wait = pending_kinds
            .iter()
            .any(|k| matches!(k, FileKind::UnixPair(_)));
        let mut not_yet = Vec::new();
        for &id in &ids {
            let at = slots.of(id).expect("a slot");
            let opened_fd = |f: FileId| placed.get(&f).map(|fd| fd.as_raw_fd());
            let r = match &files.file(id).kind {
                FileKind::Regular(r) => Restored::Done(from_raw(r.open(at)?)),
                FileKind::Directory(d) => Restored::Done(from_raw(d.open(at)?)),
                FileKind::Device(d) => Restored::Done(from_raw(d.open(at)?)),
                FileKind::Unlinked(u) => Restored::Done(from_raw(u.open(at)?)),
                FileKind::Eventfd(e) => Restored::Done(e.restore(at)?),
                FileKind::Signalfd(s) => Restored::Done(s.restore(at)?),
                FileKind::Timerfd(t) => Restored::Done(t.restore(at)?),
                FileKind::Memfd(m) => Restored::Done(m.restore(dir)?),
                FileKind::Shmem(s) => Restored::Done(s.restore(dir)?),
                FileKind::Pipe(end) => Restored::Done(pipes.restore(id, end)?),
                FileKind::Pty(end) => ptys.restore(end)?,
                FileKind::InFlight(f) => Restored::Done(f.restore()?),
                FileKind::UnixPair(end) => pairs.restore(end, &opened_fd)?,
                FileKind::UnixListen(_) if pairs_wait => Restored::NotYet,
                FileKind::UnixListen(l) => Restored::Done(l.restore()?),
                FileKind::TcpListen(l) => Restored::Done(l.restore(port_deadline)?),
                FileKind::TcpConn(_) if tcp_waits => Restored::NotYet,
                FileKind::TcpConn(c) => Restored::Done(conns.restore(c)?),
                FileKind::Udp(_) if udp_waits => Restored::NotYet,
                FileKind::Udp(u) => Restored::Done(udp.restore(u)?),
                FileKind::Inherited(_) | FileKind::Epoll(_) => {
                    return Err(FilesError::NotAFile { id })
                }
            };
            match r {
                Restored::Done(opened) => {
                    placed.insert(id, place(id, opened, at)?);
                }
                Restored::NotYet => not_yet.push(id),
            }
        }
        if not_yet.len() == ids.len() {
            return Err(FilesError::FilesWait { ids: not_yet });
        }
        ids = not_yet;
    }
    Ok(placed.into_values().collect())
}

/// A descriptor a kind's `open` returned, as the restorer's open file.
fn from_raw(fd: RawFd) -> Opened {
    // SAFETY: a descriptor just opened and owned by nothing else.
    Opened::new(unsafe { OwnedFd::from_raw_fd(fd) }, None)
}

/// What a restore child does with its own descriptors, in descriptor
/// order: a dup of an earlier one is `dup2`ed from it, a shared open file
/// from its slot (`slots`), the others opened by their kind ("not yet" for
/// an epoll until every descriptor it watches is in place; its number is
/// held meanwhile so nothing else is opened there). Then stdio the process
/// did not have is closed.
pub fn restore_in_child(
    table: &FdTable,
    files: &OpenFiles,
    slots: &Slots,
) -> Result<(), FilesError> {
    let mut cx = ChildFds {
        done: Vec::new(),
        pending: table.fds.iter().map(|e| e.fd).collect(),
    };
    // Where each open file is in place in this process.
    let mut placed: Vec<(FileId, i32)> = Vec::new();
    let mut todo: Vec<FdEntry> = table.fds.clone();
    let mut first_pass = true;
    while !todo.is_empty() {
        let mut not_yet = Vec::new();
        for e in &todo {
            // A dup waits for the first descriptor of its file.
            let first = table.first_fd_of(e.file) == Some(e.fd);
            let done = if first || placed.iter().any(|(f, _)| *f == e.file) {
                restore_fd(e, files, slots, &placed, &cx)?
            } else {
                false
            };
            if done {
                cx.pending.retain(|&p| p != e.fd);
                cx.done.push(e.fd);
                if !placed.iter().any(|(f, _)| *f == e.file) {
                    placed.push((e.file, e.fd));
                }
            } else {
                if first_pass {
                    hold(e.fd);
                }
                not_yet.push(*e);
            }
            // SAFETY: fcntl on a descriptor of ours.
            unsafe {
                libc::fcntl(
                    e.fd,
                    libc::F_SETFD,
                    if e.cloexec { libc::FD_CLOEXEC } else { 0 },
                )
            };
        }
        if not_yet.len() == todo.len() && !first_pass {
            let fds: Vec<i32> = not_yet.iter().map(|e| e.fd).collect();
            return Err(FilesError::FdsWait { fds });
        }
        if first_pass {
            for fd in 0..=2 {
                if !table.fds.iter().any(|e| e.fd == fd) {
                    // SAFETY: closing stdio the process did not have.
                    unsafe { libc::close(fd) };
                }
            }
        }
        first_pass = false;
        todo = not_yet;
    }
    Ok(())
}

/// Holds descriptor number `fd` with /dev/null until its file is placed there.
fn hold(fd: i32) {
    // SAFETY: open, dup2 and close on our own descriptors.
    unsafe {
        let n = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY);
        if n != fd {
            libc::dup2(n, fd);
            libc::close(n);
        }
    }
}

/// Puts descriptor `e` in place in the restore child; false: not yet.
fn restore_fd(
    e: &FdEntry,
    files: &OpenFiles,
    slots: &Slots,
    placed: &[(FileId, i32)],
    cx: &ChildFds,
) -> Result<bool, FilesError> {
    let dup = |from: i32, what: &str| {
        // SAFETY: dup2 between descriptors of ours.
        if unsafe { libc::dup2(from, e.fd) } < 0 {
            return Err(OpenError::last(e.fd, what).into());
        }
        Ok(true)
    };
    if let Some(&(_, first)) = placed.iter().find(|(f, _)| *f == e.file) {
        return dup(first, &format!("dup of fd {first}"));
    }
    if let Some(slot) = slots.of(e.file) {
        return dup(slot, &format!("shared file {}", e.file));
    }
    let opened = match &files.file(e.file).kind {
        FileKind::Inherited(i) => {
            i.restore_in_child(e.fd);
            return Ok(true);
        }
        FileKind::Epoll(ep) => {
            return Ok(matches!(
                ep.restore_in_child(e.fd, e.cloexec, cx)?,
                Restored::Done(())
            ))
        }
        FileKind::Regular(r) => r.open(e.fd)?,
        FileKind::Directory(d) => d.open(e.fd)?,
        FileKind::Device(d) => d.open(e.fd)?,
        FileKind::Unlinked(u) => u.open(e.fd)?,
        FileKind::Eventfd(ev) => ev.open(e.fd)?,
        FileKind::Signalfd(s) => s.open(e.fd)?,
        FileKind::Timerfd(t) => timerfd::open(e.fd, t)?,
        _ => return Err(FilesError::NothingToOpen { fd: e.fd }),
    };
    if opened != e.fd {
        // SAFETY: dup2 and close on descriptors of ours.
        unsafe {
            if libc::dup2(opened, e.fd) < 0 {
                return Err(OpenError::last(e.fd, "dup2").into());
            }
            libc::close(opened);
        }
    }
    Ok(true)
}
