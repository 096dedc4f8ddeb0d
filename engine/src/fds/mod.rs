//! Descriptors, in CRIU's shape ([`table`]): per process an fd table (fd
//! number, close-on-exec, file id), per dump one table of open files
//! ([`OpenFiles`]: id → the kind's state, [`FileKind`]), and per kind one
//! module with its state, its collect, its restore and its description:
//! [`regular`] (regular files, directories, devices), [`unlinked`],
//! [`inherited`] (stdio rebound to the restorer's), [`pipe`] (pipes and
//! FIFOs), [`memfd`], [`eventfd`], [`signalfd`], [`timerfd`], [`epoll`],
//! [`tty`]; sockets are in [`crate::net`], shared memory objects in
//! [`crate::mm::shmem`]. [`locks`] (file locks) and [`savefiles`]
//! (`--save-files`) work on these tables.
//!
//! Each operation dispatches on [`FileKind`] once, in one place: telling a
//! descriptor's kind at collect ([`collect`], here), deciding which open
//! files processes share once all are collected ([`resolve`]), the restore
//! loops in the restorer and in each restore child ([`restore`]), whose
//! kinds answer "done" or "not yet", and [`describe`] for `crest show`
//! (here).

pub mod epoll;
pub mod eventfd;
pub mod inherited;
pub mod locks;
pub mod memfd;
pub mod pipe;
pub mod regular;
pub mod resolve;
pub mod restore;
pub mod savefiles;
pub mod signalfd;
pub mod table;
pub mod timerfd;
pub mod tty;
pub mod unlinked;

use std::os::unix::fs::{FileTypeExt, MetadataExt};

use serde::{Deserialize, Serialize};

use crate::error::{CollectError, Error, Result};
use crate::mm::shmem::Shmem;
use crate::net::{self, tcp, udp, unix};
use crate::sys::proc;
use table::{status_flags, FdEntry, FdTable, FileId, REOPEN_MASK};

/// The state of one open file, by kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum FileKind {
    Regular(regular::Regular),
    Unlinked(unlinked::Unlinked),
    Directory(regular::Directory),
    Device(regular::Device),
    Inherited(inherited::Inherited),
    Eventfd(eventfd::Eventfd),
    Signalfd(signalfd::Signalfd),
    Memfd(memfd::Memfd),
    Timerfd(timerfd::Timerfd),
    Epoll(epoll::Epoll),
    Shmem(Shmem),
    UnixPair(unix::UnixEnd),
    TcpListen(tcp::TcpListen),
    TcpConn(tcp::TcpConn),
    Udp(udp::UdpSock),
    Pty(tty::PtyEnd),
    UnixListen(unix::UnixListen),
    Pipe(pipe::PipeEnd),
    InFlight(unix::PassedFile),
}

/// One entry of the dump's table of open files.
// No deny_unknown_fields here: serde cannot combine it with `flatten`; the
// flattened kinds deny unknown fields themselves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenFile {
    pub id: FileId,
    /// Created by the restorer and inherited by every process that holds it
    /// (so they share one open file description), rather than opened by each
    /// process itself: pipes, sockets, ptys, eventfds… always, files opened
    /// by path when several processes share them.
    #[serde(default)]
    pub shared: bool,
    #[serde(flatten)]
    pub kind: FileKind,
}

/// A table of open files read from an image that does not hold together.
#[derive(Debug, thiserror::Error)]
pub enum BadTable {
    #[error("open file {id} is listed as number {index}")]
    Misnumbered { id: FileId, index: usize },
    #[error("open file {id} refers to a missing file {missing}")]
    Dangling { id: FileId, missing: FileId },
}

/// The dump's table of open files: a file's id is its index.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OpenFiles(Vec<OpenFile>);

impl OpenFiles {
    /// A table from its entries, as read from an image: ids must be their
    /// indices, and every id a file refers to must exist.
    pub fn from_entries(files: Vec<OpenFile>) -> Result<OpenFiles, BadTable> {
        for (index, f) in files.iter().enumerate() {
            if f.id.index() != index {
                return Err(BadTable::Misnumbered { id: f.id, index });
            }
        }
        let t = OpenFiles(files);
        for f in &t.0 {
            for missing in f.kind.refers_to() {
                if t.get(missing).is_none() {
                    return Err(BadTable::Dangling { id: f.id, missing });
                }
            }
        }
        Ok(t)
    }

    /// Replaces the table (its ids must be the entries' indices).
    pub(crate) fn set_entries(&mut self, files: Vec<OpenFile>) {
        debug_assert!(files.iter().enumerate().all(|(i, f)| f.id.index() == i));
        self.0 = files;
    }

    pub fn add(&mut self, kind: FileKind) -> FileId {
        let id = FileId(self.0.len() as u32);
        self.0.push(OpenFile {
            id,
            shared: false,
            kind,
        });
        id
    }

    pub fn get(&self, id: FileId) -> Option<&OpenFile> {
        self.0.get(id.index())
    }

    /// The open file `id` (an id the table was checked to hold).
    pub fn file(&self, id: FileId) -> &OpenFile {
        &self.0[id.index()]
    }

    pub fn file_mut(&mut self, id: FileId) -> &mut OpenFile {
        &mut self.0[id.index()]
    }

    pub fn iter(&self) -> impl Iterator<Item = &OpenFile> {
        self.0.iter()
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut OpenFile> {
        self.0.iter_mut()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FileKind {
    /// The other open files this one refers to (the files in flight on a
    /// unix socket).
    pub(crate) fn refers_to(&self) -> Vec<FileId> {
        match self {
            FileKind::UnixPair(e) => e.passed.iter().flat_map(|p| p.files.clone()).collect(),
            _ => Vec::new(),
        }
    }

    pub(crate) fn remap(&mut self, map: &dyn Fn(FileId) -> FileId) {
        if let FileKind::UnixPair(e) = self {
            for p in &mut e.passed {
                for f in &mut p.files {
                    *f = map(*f);
                }
            }
        }
    }

    /// The path it is opened or reopened by, for `restore --relocate`.
    pub fn path_mut(&mut self) -> Option<&mut String> {
        match self {
            FileKind::Regular(regular::Regular { path, .. })
            | FileKind::Directory(regular::Directory { path, .. })
            | FileKind::Device(regular::Device { path, .. })
            | FileKind::Unlinked(unlinked::Unlinked { path, .. }) => Some(path),
            FileKind::Pipe(pipe::PipeEnd {
                fifo: Some(path), ..
            }) => Some(path),
            _ => None,
        }
    }
}

/// What a descriptor's link in `/proc/PID/fd` says it is: told once, then
/// each kind collects its state.
enum Link<'a> {
    Pipe(u64),
    Socket,
    AnonInode(&'a str),
    Memfd,
    Deleted(&'a str),
    Path,
    Other,
}

impl<'a> Link<'a> {
    fn of(link: &'a str) -> Link<'a> {
        if let Some(inode) = link
            .strip_prefix("pipe:[")
            .and_then(|l| l.trim_end_matches(']').parse().ok())
        {
            Link::Pipe(inode)
        } else if link.starts_with("socket:") {
            Link::Socket
        } else if let Some(name) = link.strip_prefix("anon_inode:") {
            Link::AnonInode(name.trim_matches(['[', ']']))
        } else if link.starts_with("/memfd:") {
            Link::Memfd
        } else if let Some(path) = link
            .strip_suffix(" (deleted)")
            .filter(|p| p.starts_with('/'))
        {
            Link::Deleted(path)
        } else if link.starts_with('/') {
            Link::Path
        } else {
            Link::Other
        }
    }
}

/// Collects the descriptors of the frozen process `pid`: its fd table, each
/// open file new to it added to `files` (a dup of an earlier descriptor of
/// the process gets that one's id).
pub fn collect(pid: i32, files: &mut OpenFiles, sockets: &mut net::DumpSockets) -> Result<FdTable> {
    let mut fds = Vec::new();
    // The first descriptor of each open file of this process.
    let mut firsts: Vec<(i32, FileId)> = Vec::new();
    for fd in proc::fds_of(pid)? {
        let link = proc::readlink(pid, &format!("fd/{fd}"))?
            .to_string_lossy()
            .into_owned();
        let text = proc::read(pid, &format!("fdinfo/{fd}"))?;
        let info = proc::parse_fdinfo(&text);
        let cloexec = info.flags & libc::O_CLOEXEC != 0;
        if let Some(&(_, file)) = firsts
            .iter()
            .find(|(first, _)| crate::sys::fd::same_file(pid, *first, pid, fd))
        {
            fds.push(FdEntry { fd, cloexec, file });
            continue;
        }
        let kind = match collect_one(pid, fd, &link, &text, &info, files, sockets) {
            Ok(kind) => kind,
            Err(CollectError::NotCarried(what)) => {
                return Err(Error::unsupported(pid, format!("fd {fd} is {what}")))
            }
            Err(CollectError::Failed(e)) => return Err(e),
        };
        let file = files.add(kind);
        firsts.push((fd, file));
        fds.push(FdEntry { fd, cloexec, file });
    }
    Ok(FdTable {
        fds,
        cwd: proc::readlink(pid, "cwd")?.to_string_lossy().into_owned(),
        root: proc::readlink(pid, "root")?.to_string_lossy().into_owned(),
    })
}

/// The state of descriptor `fd` of `pid`, or why crest cannot carry it.
fn collect_one(
    pid: i32,
    fd: i32,
    link: &str,
    fdinfo: &str,
    info: &proc::FdInfo,
    files: &mut OpenFiles,
    sockets: &mut net::DumpSockets,
) -> Result<FileKind, CollectError> {
    let stdio = fd <= 2;
    let reopen = info.flags & REOPEN_MASK;
    let fd_meta = || {
        let path = format!("/proc/{pid}/fd/{fd}");
        std::fs::metadata(&path).map_err(|e| Error::io(&path, e))
    };
    Ok(match Link::of(link) {
        // Whether the other end is in the dump is decided once every process
        // is collected (see `resolve`).
        Link::Pipe(inode) => FileKind::Pipe(pipe::PipeEnd::collect(inode, info.flags, None)),
        // stdio on a socket is collected too (a launcher hands its children
        // socket pairs as stdin); one whose peer turns out to be outside the
        // dump is rebound by `resolve`.
        Link::Socket => {
            // A file in flight is opened by the restorer, to be sent again.
            let mut in_flight = |f| {
                let id = files.add(FileKind::InFlight(f));
                files.file_mut(id).shared = true;
                id
            };
            match net::collect(pid, fd, status_flags(info.flags), sockets, &mut in_flight) {
                Ok(net::Socket::UnixPair(end)) => FileKind::UnixPair(end),
                Ok(net::Socket::TcpConn(c)) => FileKind::TcpConn(c),
                Err(CollectError::Failed(e)) => return Err(CollectError::Failed(e)),
                _ if stdio => FileKind::Inherited(inherited::Inherited {
                    was: link.to_string(),
                }),
                Ok(net::Socket::TcpListen(l)) => FileKind::TcpListen(l),
                Ok(net::Socket::Udp(u)) => FileKind::Udp(u),
                Ok(net::Socket::UnixListen(l)) => FileKind::UnixListen(l),
                Err(not) => return Err(not),
            }
        }
        Link::AnonInode(name) => match name {
            "eventfd" => FileKind::Eventfd(eventfd::Eventfd::from_fdinfo(
                fdinfo,
                status_flags(info.flags),
                &|count| eventfd::is_semaphore(pid, fd, count),
            )?),
            "signalfd" => FileKind::Signalfd(
                signalfd::Signalfd::from_fdinfo(fdinfo, status_flags(info.flags))
                    .map_err(CollectError::not_carried)?,
            ),
            "timerfd" => FileKind::Timerfd(
                timerfd::parse(fdinfo, status_flags(info.flags))
                    .map_err(CollectError::not_carried)?,
            ),
            "eventpoll" => FileKind::Epoll(
                epoll::Epoll::from_fdinfo(fdinfo, status_flags(info.flags))
                    .map_err(CollectError::not_carried)?,
            ),
            other => {
                return Err(CollectError::not_carried(Unknown::AnonInode {
                    name: other.to_string(),
                }))
            }
        },
        Link::Memfd => match memfd::Memfd::from_fd(fd_meta()?.ino(), link, reopen, info.pos) {
            Some(m) => FileKind::Memfd(m),
            None => {
                return Err(CollectError::not_carried(Unknown::MemfdName {
                    link: link.to_string(),
                }))
            }
        },
        Link::Deleted(path) => FileKind::Unlinked(unlinked::Unlinked::collect(
            pid, fd, path, reopen, info.pos,
        )?),
        Link::Path => {
            let meta = std::fs::metadata(format!("/proc/{pid}/fd/{fd}"))
                .map_err(|e| Error::io(link, e))?;
            let ft = meta.file_type();
            let device = ft.is_char_device();
            if ft.is_file() {
                FileKind::Regular(regular::Regular::collect(
                    link.to_string(),
                    &meta,
                    reopen,
                    info.pos,
                ))
            } else if device && link == "/dev/ptmx" {
                FileKind::Pty(
                    tty::collect_master(pid, fd, fdinfo, status_flags(info.flags))
                        .map_err(CollectError::not_carried)?,
                )
            } else if let Some(index) = tty::slave_index(link).filter(|_| device) {
                // Whether its master is in the dump is decided once every
                // process is collected (see `resolve`).
                FileKind::Pty(tty::PtyEnd {
                    index,
                    master: false,
                    flags: status_flags(info.flags),
                    state: None,
                })
            } else if device
                && (regular::STATELESS_DEVICES.contains(&link) || (link == "/dev/tty" && !stdio))
            {
                FileKind::Device(regular::Device {
                    path: link.to_string(),
                    flags: reopen,
                })
            } else if device && stdio {
                FileKind::Inherited(inherited::Inherited {
                    was: link.to_string(),
                })
            } else if ft.is_dir() {
                FileKind::Directory(regular::Directory {
                    path: link.to_string(),
                    flags: reopen,
                    pos: info.pos,
                })
            } else if ft.is_fifo() {
                FileKind::Pipe(pipe::PipeEnd::collect(
                    meta.ino(),
                    info.flags,
                    Some(link.to_string()),
                ))
            } else if device {
                return Err(CollectError::not_carried(Unknown::Device {
                    path: link.to_string(),
                }));
            } else {
                return Err(CollectError::not_carried(Unknown::File {
                    path: link.to_string(),
                }));
            }
        }
        Link::Other => {
            return Err(CollectError::not_carried(Unknown::Link {
                link: link.to_string(),
            }))
        }
    })
}

/// A descriptor of a kind crest does not know.
#[derive(Debug, thiserror::Error)]
enum Unknown {
    #[error("{} {name}", article(name))]
    AnonInode { name: String },
    #[error("a memfd with an unexpected name ({link})")]
    MemfdName { link: String },
    #[error("a character device ({path})")]
    Device { path: String },
    #[error("{path}, a file of a kind crest does not know")]
    File { path: String },
    #[error("{link}")]
    Link { link: String },
}

/// "a" or "an", for a name said in English.
fn article(name: &str) -> &'static str {
    if name.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

/// How `crest show` describes descriptor number `index` of `table`.
pub fn describe(table: &FdTable, index: usize, files: &OpenFiles, pipes: &[pipe::Pipe]) -> String {
    let e = table.fds[index];
    let cloexec = if e.cloexec { ", cloexec" } else { "" };
    if let Some(first) = table.fds[..index].iter().find(|o| o.file == e.file) {
        return format!("same open file as fd {}{cloexec}", first.fd);
    }
    let Some(f) = files.get(e.file) else {
        return format!("shared file {} (missing from the image)", e.file);
    };
    let shared = f.shared;
    let missing = || format!("shared file {} (missing from the image)", f.id);
    match &f.kind {
        FileKind::Regular(r) => r.describe(shared, cloexec),
        FileKind::Directory(d) => d.describe(shared, cloexec),
        FileKind::Device(d) => d.describe(shared, cloexec),
        FileKind::Eventfd(ev) => ev.describe(shared, cloexec),
        FileKind::Signalfd(s) => s.describe(shared, cloexec),
        FileKind::Timerfd(t) => t.describe(shared, cloexec),
        FileKind::Memfd(m) => m.describe(shared, cloexec),
        FileKind::Pty(p) => p.describe(shared, cloexec),
        FileKind::Pipe(p) => p.describe(shared, cloexec, pipes),
        FileKind::UnixPair(u) => u.describe(shared, cloexec),
        FileKind::UnixListen(l) => l.describe(shared, cloexec),
        FileKind::TcpListen(l) => l.describe(shared, cloexec),
        FileKind::TcpConn(c) => c.describe_open(shared, cloexec),
        FileKind::Udp(u) => u.describe(shared, cloexec),
        _ if shared => missing(),
        FileKind::Unlinked(u) => u.describe(cloexec),
        FileKind::Inherited(i) => i.describe(),
        FileKind::Epoll(ep) => ep.describe(cloexec),
        FileKind::Shmem(s) => s.describe(),
        FileKind::InFlight(p) => format!("{}, in flight", p.path),
    }
}
