//! File descriptors: regular files, character devices, descriptors that share
//! one open file description, and stdio that points outside the dump.
//!
//! Collect reads `/proc/PID/fd` and `fdinfo`; restore runs in the restore
//! child (it opens files as itself, before it becomes the target).

use std::os::unix::fs::MetadataExt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::sys::proc;

/// What a file looked like at dump time, to notice it changed before a restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileIdentity {
    pub dev: u64,
    pub inode: u64,
    pub size: u64,
    pub mtime_ns: i64,
    /// crc32c of the contents (`crest dump --verify-files=hash`): when set,
    /// the file counts as unchanged if its contents are, whatever its inode
    /// or mtime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crc32c: Option<u32>,
}

impl FileIdentity {
    pub fn of(meta: &std::fs::Metadata) -> FileIdentity {
        FileIdentity {
            dev: meta.dev(),
            inode: meta.ino(),
            size: meta.size(),
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
            crc32c: None,
        }
    }

    /// crc32c of the file at `path`, read in 1 MiB pieces.
    pub fn content_crc(path: &str) -> std::io::Result<u32> {
        use std::io::Read;
        let mut f = std::fs::File::open(path)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut crc = 0u32;
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                return Ok(crc);
            }
            crc = crc32c::crc32c_append(crc, &buf[..n]);
        }
    }
}

/// `crest dump --verify-files=hash`: records the contents' checksum of every
/// regular file the processes hold open.
pub fn record_hashes<'a>(kinds: impl Iterator<Item = (i32, &'a mut FdKind)>) -> Result<()> {
    for (pid, k) in kinds {
        if let FdKind::Regular { path, identity, .. } = k {
            identity.crc32c =
                Some(FileIdentity::content_crc(path).map_err(|e| Error::Refused {
                    pid,
                    reason: format!("cannot read {path} to hash it: {e}"),
                })?);
        }
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum FdKind {
    /// A regular file, reopened by path at its offset.
    Regular {
        path: String,
        /// open(2) flags: access mode, O_APPEND, O_NONBLOCK, O_DIRECT…
        flags: i32,
        pos: u64,
        identity: FileIdentity,
    },
    /// A regular file that was unlinked while open: its contents are saved;
    /// restore recreates it (at its old path when free), opens it and unlinks it.
    Unlinked {
        path: String,
        flags: i32,
        pos: u64,
        #[serde(with = "crate::image::hex_bytes")]
        contents: Vec<u8>,
    },
    /// An open directory, reopened by path at its readdir position (the
    /// filesystem's own cookie, which lseek takes back).
    Directory { path: String, flags: i32, pos: u64 },
    /// A character device reopened by path (/dev/null, /dev/zero, /dev/urandom…).
    Device { path: String, flags: i32 },
    /// Shares the open file description of a lower descriptor (dup, or inherited across fork).
    Dup { of: i32 },
    /// stdin/stdout/stderr pointing outside the dump (a terminal, or a pipe or
    /// socket to a process not dumped): rebound to the restorer's own.
    Inherited { was: String },
    /// One open file description held by several processes (inherited across
    /// fork): the image's shared file `id`, opened once by the restorer and
    /// inherited by every process that holds it, so they share one offset.
    Shared { id: u32 },
    /// An eventfd with its counter (created by the restorer, inherited).
    Eventfd {
        count: u64,
        semaphore: bool,
        flags: i32,
    },
    /// A signalfd with its mask (created by the restorer, inherited).
    Signalfd { mask: u64, flags: i32 },
    /// A memfd (as a shared file: created by the restorer with its contents,
    /// sealed once every process has mapped it; see `memfd`).
    Memfd(crate::memfd::Memfd),
    /// A timerfd with its timer and unread expirations (created by the restorer, inherited).
    Timerfd(crate::timers::Timerfd),
    /// An epoll instance and its watch set, rebuilt by its process once every
    /// other descriptor is in place.
    Epoll {
        flags: i32,
        watches: Vec<EpollWatch>,
    },
    /// A shared anonymous memory object (as a shared file): its contents are
    /// in `shmem-INODE.img`; the restorer recreates it and every process maps it.
    /// With `path`, an unlinked file mapped shared: recreated under that name
    /// (when free) and unlinked again, so /proc shows "PATH (deleted)" as before.
    Shmem {
        inode: u64,
        size: u64,
        crc32c: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        path: Option<String>,
    },
    /// One end of a connected unix socket pair (as a shared file: the restorer
    /// creates each pair once and requeues its data).
    UnixPair(crate::sockets::UnixEnd),
    /// A listening TCP socket (as a shared file: recreated by the restorer).
    TcpListen(crate::sockets::TcpListen),
    /// An established TCP connection (as a shared file: recreated by the
    /// restorer with TCP_REPAIR, once every connection of the image exists).
    TcpConn(crate::tcp::TcpConn),
    /// A UDP socket with its queued datagrams (as a shared file: recreated by the restorer).
    Udp(crate::udp::UdpSock),
    /// One end of a pty whose master is in the dump (as a shared file: the
    /// restorer recreates the pair with the same index; see `tty`).
    Pty(crate::tty::PtyEnd),
    /// A listening unix socket (as a shared file: recreated by the restorer).
    UnixListen(crate::sockets::UnixListen),
    /// One end of a pipe (only as the description of a shared file: the
    /// restorer creates each pipe once and fills it with its unread data).
    Pipe {
        inode: u64,
        write: bool,
        /// Status flags of this end (O_NONBLOCK, O_DIRECT…).
        flags: i32,
        /// It was stdin/stdout/stderr of some process (so may be rebound if its
        /// other end is outside the dump).
        #[serde(default)]
        was_stdio: bool,
        /// A named FIFO: reopened by this path rather than created anew.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fifo: Option<String>,
    },
}

/// An open file description shared between processes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedFile {
    pub id: u32,
    /// `Regular` or `Device`: how to open it.
    pub file: FdKind,
}

/// Finds open file descriptions that several processes share (kcmp) and
/// moves them into `shared`, leaving `FdKind::Shared` in each process.
pub fn find_shared(procs: &mut [(i32, &mut FilesImage)], shared: &mut Vec<SharedFile>) {
    let mut owners: Vec<(u32, i32, i32)> = Vec::new(); // (id, pid, fd) of the first holder
    for i in 0..procs.len() {
        let (pid, _) = procs[i];
        for k in 0..procs[i].1.fds.len() {
            let f = procs[i].1.fds[k].clone();
            // Every pipe end and socket-pair end becomes a shared object, held by
            // one process or many: the restorer creates it, all inherit it.
            let id = match &f.kind {
                FdKind::Pipe { inode, write, .. } => Some(intern(
                    shared,
                    &f.kind,
                    |k| matches!(k, FdKind::Pipe { inode: i, write: w, .. } if i == inode && w == write),
                )),
                FdKind::UnixPair(end) => Some(intern(
                    shared,
                    &f.kind,
                    |k| matches!(k, FdKind::UnixPair(e) if e.inode == end.inode),
                )),
                _ => None,
            };
            if let Some(id) = id {
                procs[i].1.fds[k].kind = FdKind::Shared { id };
                continue;
            }
            if matches!(
                f.kind,
                FdKind::Eventfd { .. }
                    | FdKind::Signalfd { .. }
                    | FdKind::Timerfd(_)
                    | FdKind::TcpListen(_)
                    | FdKind::TcpConn(_)
                    | FdKind::Udp(_)
                    | FdKind::Pty(_)
                    | FdKind::UnixListen(_)
            ) {
                // Created once by the restorer; held by one process or several.
                let seen = owners
                    .iter()
                    .find(|(_, opid, ofd)| crate::sys::fd::same_file(*opid, *ofd, pid, f.fd));
                let id = match seen {
                    Some(&(id, _, _)) => id,
                    None => {
                        let id = shared.len() as u32;
                        shared.push(SharedFile {
                            id,
                            file: f.kind.clone(),
                        });
                        owners.push((id, pid, f.fd));
                        id
                    }
                };
                procs[i].1.fds[k].kind = FdKind::Shared { id };
                continue;
            }
            if !matches!(
                f.kind,
                FdKind::Regular { .. }
                    | FdKind::Directory { .. }
                    | FdKind::Device { .. }
                    | FdKind::Unlinked { .. }
            ) {
                continue;
            }
            // Earlier processes first: is this description one we already saw?
            let seen = owners.iter().find(|(_, opid, ofd)| {
                *opid != pid && crate::sys::fd::same_file(*opid, *ofd, pid, f.fd)
            });
            let id = match seen {
                Some(&(id, _, _)) => Some(id),
                None => {
                    let later = procs[i + 1..].iter().any(|(qpid, q)| {
                        q.fds.iter().any(|g| {
                            matches!(
                                g.kind,
                                FdKind::Regular { .. }
                                    | FdKind::Directory { .. }
                                    | FdKind::Device { .. }
                            ) && crate::sys::fd::same_file(pid, f.fd, *qpid, g.fd)
                        })
                    });
                    later.then(|| {
                        let id = shared.len() as u32;
                        shared.push(SharedFile {
                            id,
                            file: f.kind.clone(),
                        });
                        owners.push((id, pid, f.fd));
                        id
                    })
                }
            };
            if let Some(id) = id {
                procs[i].1.fds[k].kind = FdKind::Shared { id };
            }
        }
    }
}

/// The id of the shared object `same` recognises, added as `kind` when new.
fn intern(shared: &mut Vec<SharedFile>, kind: &FdKind, same: impl Fn(&FdKind) -> bool) -> u32 {
    if let Some(s) = shared.iter().find(|s| same(&s.file)) {
        return s.id;
    }
    let id = shared.len() as u32;
    shared.push(SharedFile {
        id,
        file: kind.clone(),
    });
    id
}

/// Whether eventfd `fd` of the frozen `pid` is in semaphore mode, for
/// kernels whose fdinfo does not say (before 6.6): see [`probe_eventfd_mode`].
/// The descriptor probed is crest's duplicate of the target's open file, so
/// the target's fd table does not change.
fn eventfd_is_semaphore(pid: i32, fd: i32, before: u64) -> std::result::Result<bool, String> {
    let efd = crate::sys::fd::pidfd_getfd(pid, fd)
        .map_err(|e| format!("an eventfd whose mode could not be probed ({e})"))?;
    let semaphore = probe_eventfd_mode(&efd, before)
        .map_err(|(what, e)| format!("an eventfd whose mode could not be probed ({what}: {e})"))?;
    let info = proc::read(pid, &format!("fdinfo/{fd}")).map_err(|e| e.to_string())?;
    let after = eventfd_count(&info)?;
    if after != before {
        return Err(format!(
            "an eventfd whose counter changed while its mode was probed ({before} before, {after} after: is it shared with a process outside the dump?)"
        ));
    }
    Ok(semaphore)
}

/// The counter of an eventfd, from its fdinfo (the kernel prints it in hex,
/// "%16llx").
fn eventfd_count(fdinfo: &str) -> std::result::Result<u64, String> {
    fdinfo
        .lines()
        .find_map(|l| l.strip_prefix("eventfd-count:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .ok_or_else(|| "an eventfd without a readable count".to_string())
}

/// Probes the mode of eventfd `efd` whose counter is `count`: a read returns
/// 1 in semaphore mode and the whole counter otherwise. The counter is raised
/// to at least 2 (so that the two answers differ), read once, and put back to
/// `count`; no read ever waits. epoll reports nothing for the moment the
/// counter was raised (it re-checks readiness before reporting), though a
/// poll(2) waiter outside the dump may wake once.
fn probe_eventfd_mode(
    efd: &std::os::fd::OwnedFd,
    count: u64,
) -> std::result::Result<bool, (&'static str, std::io::Error)> {
    use std::io::{Read, Write};
    // Near the top of its range a write would wait (or fail).
    if count > u64::MAX - 4 {
        return Err((
            "its counter is at its maximum",
            std::io::Error::from_raw_os_error(libc::EOVERFLOW),
        ));
    }
    let mut f = std::fs::File::from(efd.try_clone().map_err(|e| ("dup", e))?);
    let add = 2u64.saturating_sub(count);
    if add > 0 {
        f.write_all(&add.to_ne_bytes()).map_err(|e| ("write", e))?;
    }
    let mut v = [0u8; 8];
    f.read_exact(&mut v).map_err(|e| ("read", e))?;
    let semaphore = u64::from_ne_bytes(v) == 1;
    if semaphore {
        // The counter is now count + add - 1.
        if add == 0 {
            f.write_all(&1u64.to_ne_bytes()).map_err(|e| ("write", e))?;
        }
        for _ in 1..add {
            f.read_exact(&mut v).map_err(|e| ("read", e))?;
        }
    } else if count > 0 {
        // The read emptied it.
        f.write_all(&count.to_ne_bytes())
            .map_err(|e| ("write", e))?;
    }
    Ok(semaphore)
}

// No deny_unknown_fields here: serde cannot combine it with `flatten`; the
// flattened FdKind variants deny unknown fields themselves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FdImage {
    pub fd: i32,
    pub cloexec: bool,
    #[serde(flatten)]
    pub kind: FdKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilesImage {
    pub fds: Vec<FdImage>,
    pub cwd: String,
    pub root: String,
}

/// stdin/stdout/stderr on a socket whose peer is not in the dump (a login's
/// or a launcher's outside) is rebound to the restorer's own, as for pipes.
/// Socket ends in the dump are listed as they were collected; `carry_tcp`
/// keeps stdio TCP connections to the outside (`--tcp-established`).
pub fn rebind_outside_stdio(procs: &mut [(i32, &mut FilesImage)], carry_tcp: bool) {
    let unix_here: Vec<u64> = procs
        .iter()
        .flat_map(|(_, f)| f.fds.iter())
        .filter_map(|f| match &f.kind {
            FdKind::UnixPair(e) => Some(e.inode),
            _ => None,
        })
        .collect();
    let tcp_here: Vec<crate::tcp::TcpConn> = procs
        .iter()
        .flat_map(|(_, f)| f.fds.iter())
        .filter_map(|f| match &f.kind {
            FdKind::TcpConn(c) => Some(c.clone()),
            _ => None,
        })
        .collect();
    for (_, files) in procs.iter_mut() {
        for f in files.fds.iter_mut().filter(|f| f.fd <= 2) {
            let outside = match &f.kind {
                FdKind::UnixPair(e) => !unix_here.contains(&e.peer),
                FdKind::TcpConn(c) => !carry_tcp && !tcp_here.iter().any(|o| o.is_peer_of(c)),
                _ => false,
            };
            if outside {
                let was = match &f.kind {
                    FdKind::UnixPair(e) => format!("socket:[{}]", e.inode),
                    FdKind::TcpConn(c) => format!("TCP connection {}", c.describe()),
                    _ => unreachable!("only sockets are rebound"),
                };
                f.kind = FdKind::Inherited { was };
            }
        }
    }
}

/// Largest unlinked file whose contents a dump saves.
const MAX_UNLINKED: u64 = 64 << 20;

/// Devices reopened by path: they carry no state of their own.
const STATELESS_DEVICES: &[&str] = &[
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
];

/// Flags kept when reopening: everything but creation-time and close-on-exec.
const REOPEN_MASK: i32 =
    !(libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC | libc::O_NOCTTY | libc::O_CLOEXEC);

pub fn collect(pid: i32, sockets: &mut crate::sockets::DumpSockets) -> Result<FilesImage> {
    let dir = format!("/proc/{pid}/fd");
    let mut fds: Vec<i32> = std::fs::read_dir(&dir)
        .map_err(|e| Error::io(&dir, e))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort_unstable();
    let mut out: Vec<FdImage> = Vec::new();
    for &fd in &fds {
        let link = proc::readlink(pid, &format!("fd/{fd}"))?
            .to_string_lossy()
            .into_owned();
        let info = proc::parse_fdinfo(&proc::read(pid, &format!("fdinfo/{fd}"))?);
        let cloexec = info.flags & libc::O_CLOEXEC != 0;
        let refuse = |what: String| Err(Error::unsupported(pid, format!("fd {fd} is {what}")));
        if let Some(first) = out.iter().find(|o| {
            !matches!(o.kind, FdKind::Dup { .. }) && crate::sys::fd::same_file(pid, o.fd, pid, fd)
        }) {
            out.push(FdImage {
                fd,
                cloexec,
                kind: FdKind::Dup { of: first.fd },
            });
            continue;
        }
        let stdio = fd <= 2;
        let kind = if let Some(inode) = link
            .strip_prefix("pipe:[")
            .and_then(|l| l.trim_end_matches(']').parse().ok())
        {
            // Whether the other end is in the dump is decided once every process
            // is collected (see `pipes::resolve`).
            FdKind::Pipe {
                inode,
                write: info.flags & libc::O_ACCMODE == libc::O_WRONLY,
                flags: info.flags & REOPEN_MASK & !libc::O_ACCMODE,
                was_stdio: stdio,
                fifo: None,
            }
        } else if link.starts_with("socket:") {
            // stdio on a socket is collected too (a launcher hands its
            // children socket pairs as stdin); one whose peer turns out to be
            // outside the dump is rebound by `rebind_outside_stdio`.
            use crate::sockets::Collected;
            match crate::sockets::collect(
                pid,
                fd,
                info.flags & REOPEN_MASK & !libc::O_ACCMODE,
                sockets,
            )? {
                Ok(Collected::Unix(end)) => FdKind::UnixPair(end),
                Ok(Collected::TcpConn(c)) => FdKind::TcpConn(c),
                _ if stdio => FdKind::Inherited { was: link },
                Ok(Collected::TcpListen(l)) => FdKind::TcpListen(l),
                Ok(Collected::Udp(u)) => FdKind::Udp(u),
                Ok(Collected::UnixListen(l)) => FdKind::UnixListen(l),
                Err(what) => return refuse(what),
            }
        } else if let Some(name) = link.strip_prefix("anon_inode:") {
            let text = proc::read(pid, &format!("fdinfo/{fd}"))?;
            let flags = info.flags & REOPEN_MASK & !libc::O_ACCMODE;
            let probe = |count| eventfd_is_semaphore(pid, fd, count);
            match anon_kind(name.trim_matches(['[', ']']), &text, flags, &probe) {
                Ok(kind) => kind,
                Err(what) => return refuse(what),
            }
        } else if link.starts_with("/memfd:") {
            let fdpath = format!("/proc/{pid}/fd/{fd}");
            let meta = std::fs::metadata(&fdpath).map_err(|e| Error::io(&fdpath, e))?;
            match crate::memfd::Memfd::from_fd(
                meta.ino(),
                &link,
                info.flags & REOPEN_MASK,
                info.pos,
            ) {
                Some(m) => FdKind::Memfd(m),
                None => return refuse(format!("a memfd with an unexpected name ({link})")),
            }
        } else if let Some(path) = link
            .strip_suffix(" (deleted)")
            .filter(|p| p.starts_with('/'))
        {
            let fdpath = format!("/proc/{pid}/fd/{fd}");
            let meta = std::fs::metadata(&fdpath).map_err(|e| Error::io(&fdpath, e))?;
            if !meta.file_type().is_file() {
                return refuse(format!("a deleted {link}, not a regular file"));
            }
            if meta.len() > MAX_UNLINKED {
                return refuse(format!(
                    "an unlinked file of {} bytes (more than {MAX_UNLINKED} are not saved yet)",
                    meta.len()
                ));
            }
            let contents = std::fs::read(&fdpath).map_err(|e| Error::io(&fdpath, e))?;
            FdKind::Unlinked {
                path: path.to_string(),
                flags: info.flags & REOPEN_MASK,
                pos: info.pos,
                contents,
            }
        } else if link.starts_with('/') {
            let meta = std::fs::metadata(format!("/proc/{pid}/fd/{fd}"))
                .map_err(|e| Error::io(&link, e))?;
            let ft = meta.file_type();
            use std::os::unix::fs::FileTypeExt;
            if ft.is_file() {
                FdKind::Regular {
                    path: link,
                    flags: info.flags & REOPEN_MASK,
                    pos: info.pos,
                    identity: FileIdentity::of(&meta),
                }
            } else if ft.is_char_device() && link == "/dev/ptmx" {
                match crate::tty::collect_master(
                    pid,
                    fd,
                    &proc::read(pid, &format!("fdinfo/{fd}"))?,
                    info.flags & REOPEN_MASK & !libc::O_ACCMODE,
                ) {
                    Ok(end) => FdKind::Pty(end),
                    Err(what) => return refuse(what),
                }
            } else if let Some(index) =
                crate::tty::slave_index(&link).filter(|_| ft.is_char_device())
            {
                // Whether its master is in the dump is decided once every
                // process is collected (see `tty::resolve`).
                FdKind::Pty(crate::tty::PtyEnd {
                    index,
                    master: false,
                    flags: info.flags & REOPEN_MASK & !libc::O_ACCMODE,
                    state: None,
                })
            } else if ft.is_char_device()
                && (STATELESS_DEVICES.contains(&link.as_str()) || (link == "/dev/tty" && !stdio))
            {
                FdKind::Device {
                    path: link,
                    flags: info.flags & REOPEN_MASK,
                }
            } else if ft.is_char_device() && stdio {
                FdKind::Inherited { was: link }
            } else if ft.is_dir() {
                FdKind::Directory {
                    path: link,
                    flags: info.flags & REOPEN_MASK,
                    pos: info.pos,
                }
            } else if ft.is_fifo() {
                FdKind::Pipe {
                    inode: meta.ino(),
                    write: info.flags & libc::O_ACCMODE == libc::O_WRONLY,
                    flags: info.flags & REOPEN_MASK & !libc::O_ACCMODE,
                    was_stdio: stdio,
                    fifo: Some(link),
                }
            } else if ft.is_char_device() {
                return refuse(format!("a character device ({link})"));
            } else {
                return refuse(format!("{link}, a file of a kind crest does not know"));
            }
        } else {
            return refuse(link);
        };
        out.push(FdImage { fd, cloexec, kind });
    }
    Ok(FilesImage {
        fds: out,
        cwd: proc::readlink(pid, "cwd")?.to_string_lossy().into_owned(),
        root: proc::readlink(pid, "root")?.to_string_lossy().into_owned(),
    })
}

/// An epoll watch: the watched fd (in the owner's table), events and user data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EpollWatch {
    pub fd: i32,
    pub events: u32,
    pub data: u64,
}

/// Classifies an `anon_inode:` descriptor from its fdinfo. `semaphore_probe`
/// tells an eventfd's mode, given its counter, where fdinfo does not (before
/// Linux 6.6).
fn anon_kind(
    name: &str,
    fdinfo: &str,
    flags: i32,
    semaphore_probe: &dyn Fn(u64) -> std::result::Result<bool, String>,
) -> std::result::Result<FdKind, String> {
    let field = |key: &str| {
        fdinfo
            .lines()
            .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
    };
    match name {
        "eventfd" => {
            let count = eventfd_count(fdinfo)?;
            // Linux 6.6 added the semaphore flag to fdinfo; before that the
            // mode is found by reading the counter (and putting it back).
            let semaphore = match field("eventfd-semaphore:") {
                Some(v) => v == "1",
                None => semaphore_probe(count)?,
            };
            Ok(FdKind::Eventfd {
                count,
                semaphore,
                flags,
            })
        }
        "signalfd" => {
            let mask = field("sigmask:")
                .and_then(|v| u64::from_str_radix(&v, 16).ok())
                .ok_or("a signalfd without a readable mask")?;
            Ok(FdKind::Signalfd { mask, flags })
        }
        "timerfd" => crate::timers::parse_timerfd(fdinfo, flags).map(FdKind::Timerfd),
        "eventpoll" => {
            let mut watches = Vec::new();
            for line in fdinfo.lines().filter(|l| l.starts_with("tfd:")) {
                let words: Vec<&str> = line.split_whitespace().collect();
                let after = |k: &str| {
                    words
                        .iter()
                        .position(|w| *w == k)
                        .and_then(|i| words.get(i + 1))
                        .copied()
                };
                let w = (|| {
                    Some(EpollWatch {
                        fd: after("tfd:")?.parse().ok()?,
                        events: u32::from_str_radix(after("events:")?, 16).ok()?,
                        data: u64::from_str_radix(after("data:")?, 16).ok()?,
                    })
                })();
                watches.push(w.ok_or_else(|| {
                    format!("an epoll instance with an unreadable watch ({line})")
                })?);
            }
            Ok(FdKind::Epoll { flags, watches })
        }
        other => {
            let article = if other.starts_with(['a', 'e', 'i', 'o', 'u']) {
                "an"
            } else {
                "a"
            };
            Err(format!("{article} {other}"))
        }
    }
}

/// Checks before a restore that every regular file is still the file that was
/// dumped (same inode, size and mtime).
pub fn verify_unchanged(pid: i32, files: &FilesImage, shared: &[SharedFile]) -> Result<()> {
    let kinds = files.fds.iter().map(|f| {
        let kind = match &f.kind {
            FdKind::Shared { id } => shared
                .iter()
                .find(|s| s.id == *id)
                .map(|s| &s.file)
                .unwrap_or(&f.kind),
            k => k,
        };
        (f, kind)
    });
    for (f, kind) in kinds {
        if let FdKind::Regular { path, identity, .. } = kind {
            let meta = std::fs::metadata(path)
                .map_err(|e| Error::Restore(format!("pid {pid}: fd {}: {path}: {e}", f.fd)))?;
            if let Some(crc) = identity.crc32c {
                let now = FileIdentity::content_crc(path)
                    .map_err(|e| Error::Restore(format!("pid {pid}: fd {}: {path}: {e}", f.fd)))?;
                if now != crc {
                    return Err(Error::Restore(format!(
                        "pid {pid}: fd {}: {path}: its contents changed since the dump (their hash differs)",
                        f.fd
                    )));
                }
                continue;
            }
            let now = FileIdentity::of(&meta);
            if now != *identity {
                let how = if now.inode != identity.inode || now.dev != identity.dev {
                    "was replaced by another file".to_string()
                } else if now.size != identity.size {
                    format!("size changed from {} to {} bytes", identity.size, now.size)
                } else {
                    "was modified (mtime changed)".to_string()
                };
                return Err(Error::Restore(format!(
                    "pid {pid}: fd {}: {path} {how} since the dump",
                    f.fd
                )));
            }
        }
    }
    Ok(())
}

/// Recreates an unlinked file: written under its old name when that is free
/// (so /proc shows the same "PATH (deleted)"), else beside it, then opened
/// with its flags and offset, and unlinked again.
fn open_unlinked(
    at: i32,
    path: &str,
    flags: i32,
    pos: u64,
    contents: &[u8],
) -> std::result::Result<i32, String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut name = path.to_string();
    let created = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&name)
        .or_else(|_| {
            name = format!("{path}.crest-{}", std::process::id());
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&name)
        });
    let mut file = created.map_err(|e| format!("fd {at}: recreating unlinked {path}: {e}"))?;
    file.write_all(contents)
        .map_err(|e| format!("fd {at}: recreating unlinked {path}: {e}"))?;
    drop(file);
    let probe = FdImage {
        fd: at,
        cloexec: false,
        kind: FdKind::Regular {
            path: name.clone(),
            flags,
            pos,
            identity: FileIdentity {
                dev: 0,
                inode: 0,
                size: 0,
                mtime_ns: 0,
                crc32c: None,
            },
        },
    };
    let fd = open_for_restore(&probe);
    let _ = std::fs::remove_file(&name);
    fd?.ok_or_else(|| format!("fd {at}: reopening unlinked {path}"))
}

fn open_eventfd(
    at: i32,
    count: u64,
    semaphore: bool,
    flags: i32,
) -> std::result::Result<i32, String> {
    let sem = if semaphore { libc::EFD_SEMAPHORE } else { 0 };
    let initial = count.min(u32::MAX as u64);
    // SAFETY: eventfd takes integers and returns a new fd; the write adds the
    // part of the counter above eventfd(2)'s 32-bit initial value.
    unsafe {
        let fd = libc::eventfd(
            initial as libc::c_uint,
            sem | libc::EFD_CLOEXEC | (flags & libc::O_NONBLOCK),
        );
        if fd < 0 {
            return Err(format!(
                "fd {at}: eventfd: {}",
                std::io::Error::last_os_error()
            ));
        }
        if count > initial {
            let rest = count - initial;
            libc::write(fd, (&rest as *const u64).cast(), 8);
        }
        Ok(fd)
    }
}

fn open_signalfd(at: i32, mask: u64, flags: i32) -> std::result::Result<i32, String> {
    // SAFETY: a sigset_t we fill ourselves; signalfd returns a new fd.
    let fd = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in 1..=64 {
            if mask & (1u64 << (sig - 1)) != 0 {
                libc::sigaddset(&mut set, sig);
            }
        }
        libc::signalfd(-1, &set, libc::SFD_CLOEXEC | (flags & libc::O_NONBLOCK))
    };
    if fd < 0 {
        return Err(format!(
            "fd {at}: signalfd: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(fd)
}

/// Opens one descriptor as the image says, in the restore child. Returns the
/// new fd (not yet at its final number) or `None` when nothing needs opening.
pub fn open_for_restore(f: &FdImage) -> std::result::Result<Option<i32>, String> {
    let (path, flags, pos) = match &f.kind {
        FdKind::Regular {
            path, flags, pos, ..
        } => (path, *flags, Some(*pos)),
        FdKind::Device { path, flags } => (path, *flags, None),
        FdKind::Directory { path, flags, pos } => (path, *flags, Some(*pos)),
        FdKind::Unlinked {
            path,
            flags,
            pos,
            contents,
        } => return open_unlinked(f.fd, path, *flags, *pos, contents).map(Some),
        FdKind::Eventfd {
            count,
            semaphore,
            flags,
        } => return open_eventfd(f.fd, *count, *semaphore, *flags).map(Some),
        FdKind::Signalfd { mask, flags } => return open_signalfd(f.fd, *mask, *flags).map(Some),
        FdKind::Timerfd(t) => return crate::timers::open_timerfd(f.fd, t).map(Some),
        FdKind::Dup { .. }
        | FdKind::Inherited { .. }
        | FdKind::Shared { .. }
        | FdKind::Pipe { .. }
        | FdKind::UnixPair(_)
        | FdKind::TcpListen(_)
        | FdKind::TcpConn(_)
        | FdKind::Udp(_)
        | FdKind::Pty(_)
        | FdKind::UnixListen(_)
        | FdKind::Shmem { .. }
        | FdKind::Memfd(_)
        | FdKind::Epoll { .. } => return Ok(None),
    };
    let c = std::ffi::CString::new(path.as_str()).map_err(|_| format!("fd {}: bad path", f.fd))?;
    // SAFETY: `c` is a valid NUL-terminated string; open returns a new fd or -1.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(format!(
            "fd {}: open {path}: {}",
            f.fd,
            std::io::Error::last_os_error()
        ));
    }
    if let Some(pos) = pos {
        // SAFETY: lseek on the fd we just opened.
        if unsafe { libc::lseek(fd, pos as i64, libc::SEEK_SET) } < 0 {
            return Err(format!(
                "fd {}: seek {path} to {pos}: {}",
                f.fd,
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(Some(fd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    fn eventfd(count: u32, semaphore: bool) -> OwnedFd {
        let flags = libc::EFD_CLOEXEC | if semaphore { libc::EFD_SEMAPHORE } else { 0 };
        // SAFETY: eventfd returns a new descriptor we then own.
        let fd = unsafe { libc::eventfd(count, flags) };
        assert!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
        // SAFETY: fd is a fresh descriptor nothing else owns.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    fn count_of(fd: &OwnedFd) -> u64 {
        let info =
            std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).unwrap();
        eventfd_count(&info).unwrap()
    }

    #[rstest]
    fn eventfd_mode_probe_keeps_the_counter(
        #[values(0, 1, 2, 3, 1000)] count: u32,
        #[values(false, true)] semaphore: bool,
    ) {
        let fd = eventfd(count, semaphore);
        assert_eq!(probe_eventfd_mode(&fd, count.into()).unwrap(), semaphore);
        assert_eq!(count_of(&fd), u64::from(count));
        // Probing twice answers the same.
        assert_eq!(probe_eventfd_mode(&fd, count.into()).unwrap(), semaphore);
        assert_eq!(count_of(&fd), u64::from(count));
    }
}
