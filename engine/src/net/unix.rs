//! Unix sockets: connected pairs with both ends in the dump (the data queued
//! in each direction, and the regular files in flight on it), and listening
//! sockets on a path or an abstract name.
//!
//! Collect duplicates the socket into crest (`pidfd_getfd`), finds its peer
//! with sock_diag (UNIX_DIAG_PEER), and reads each receive queue without
//! consuming it: `MSG_PEEK` stepping `SO_PEEK_OFF` (restored afterwards).
//! Regular files in flight (SCM_RIGHTS, as CRIU carries them) arrive in
//! crest with the peek: each is described (path, flags, offset) unless a
//! process of the dump also holds it (reopened apart, they would no longer
//! share it: refused). On a stream, the bytes a peek returns with the files
//! (those queued before them are glued on, as a read does) stay one message.
//! The files in flight are open files of their own ([`PassedFile`]): restore
//! creates each pair once in the restorer, as soon as the files in flight on
//! it are open again ("not yet" before), sends every queued message from the
//! peer end again (with its files), and every process inherits its ends.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use serde::{Deserialize, Serialize};

use crate::error::{CollectError, Error, Result};
use crate::fds::table::{FileId, Opened, Restored};
use crate::net::inet::{get_int, last_err};

/// One end of a connected unix socket pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnixEnd {
    pub inode: u64,
    pub peer: u64,
    /// SOCK_STREAM, SOCK_DGRAM or SOCK_SEQPACKET.
    pub ty: i32,
    /// Status flags (O_NONBLOCK).
    pub flags: i32,
    /// Messages waiting in this end's receive queue (one blob for a stream).
    pub queue: Vec<Message>,
    /// The name it shares with its listener when it was accepted (`sun_path`
    /// bytes; empty for an unnamed end).
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        with = "crate::image::hex_bytes"
    )]
    pub name: Vec<u8>,
    /// Files in flight (SCM_RIGHTS) on queued messages, not yet received.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub passed: Vec<InFlight>,
}

/// The files one queued message carries (SCM_RIGHTS), in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InFlight {
    /// Index into the end's `queue`.
    pub message: usize,
    /// Open files of kind [`PassedFile`].
    pub files: Vec<FileId>,
}

/// A regular file in flight on a unix socket (an open file no descriptor
/// holds): reopened at restore and sent again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PassedFile {
    pub path: String,
    /// Open flags (access mode and status flags; not close-on-exec).
    pub flags: i32,
    pub pos: u64,
    /// The socket it is in flight on, for messages.
    pub on: u64,
}

impl PassedFile {
    /// Opens it again at its offset, in the restorer.
    pub fn restore(&self) -> Result<Opened, UnixError> {
        let err = |what: &'static str, source: std::io::Error| UnixError::InFlight {
            on: self.on,
            path: self.path.clone(),
            what,
            source,
        };
        let path = std::ffi::CString::new(self.path.as_str())
            .map_err(|e| err("path", std::io::Error::other(e)))?;
        let flags = self.flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC | libc::O_NOCTTY);
        // SAFETY: open reads a NUL-terminated path; the fd is ours from here on.
        let fd = unsafe {
            let fd = libc::open(path.as_ptr(), flags | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(err("open", std::io::Error::last_os_error()));
            }
            OwnedFd::from_raw_fd(fd)
        };
        // SAFETY: lseek takes integers.
        if unsafe { libc::lseek(fd.as_raw_fd(), self.pos as libc::off_t, libc::SEEK_SET) } < 0 {
            return Err(err("lseek", std::io::Error::last_os_error()));
        }
        Ok(Opened::new(fd, None))
    }
}

/// Describes the file crest received as `own` (from a peek of `pid`'s fd
/// `fd`), or says why it cannot be carried. `earlier`: files already in
/// flight; `dump_pids`: the processes of the dump.
fn passed_file(
    pid: i32,
    fd: i32,
    inode: u64,
    own: i32,
    earlier: &[i32],
    dump_pids: &[i32],
) -> Result<PassedFile> {
    let me = std::process::id() as i32;
    let refuse = |what: String| {
        Err(Error::unsupported(
            pid,
            format!("fd {fd} has {what} in flight (SCM_RIGHTS)"),
        ))
    };
    let link = std::fs::read_link(format!("/proc/self/fd/{own}"))
        .map(|l| l.to_string_lossy().into_owned())
        .unwrap_or_default();
    // SAFETY: fstat writes into a stat we own.
    let st = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        (libc::fstat(own, &mut st) == 0).then_some(st)
    };
    let regular = st.is_some_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFREG);
    if !regular || !link.starts_with('/') || link.ends_with(" (deleted)") {
        return refuse(format!("a file descriptor of {link}"));
    }
    let same = |p: i32, theirs: i32| crate::sys::fd::same_file(me, own, p, theirs);
    if earlier.iter().any(|&e| same(me, e)) {
        return refuse(format!("{link} twice"));
    }
    for &p in dump_pids {
        let fds = std::fs::read_dir(format!("/proc/{p}/fd"))
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        if let Some(theirs) = fds.into_iter().find(|&t| same(p, t)) {
            return refuse(format!(
                "{link}, which pid {p} also holds open as fd {theirs} (this sharing)"
            ));
        }
    }
    let info = crate::sys::proc::parse_fdinfo(
        &std::fs::read_to_string(format!("/proc/self/fdinfo/{own}")).unwrap_or_default(),
    );
    Ok(PassedFile {
        path: link,
        flags: info.flags & !libc::O_CLOEXEC,
        pos: info.pos,
        on: inode,
    })
}

/// A listening unix socket (stream or seqpacket) bound to a path or an
/// abstract name. Its accept queue must be empty.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnixListen {
    pub inode: u64,
    pub ty: i32,
    /// `sun_path` as bound: an absolute path, or a NUL then an abstract name.
    #[serde(with = "crate::image::hex_bytes")]
    pub name: Vec<u8>,
    pub backlog: i32,
    /// Status flags (O_NONBLOCK).
    pub flags: i32,
    /// The socket file's mode, owner and group (a path socket whose file is still there).
    pub file: Option<(u32, u32, u32)>,
}

/// A unix socket name as text: the path, or `@name` for an abstract one.
pub fn unix_name_text(name: &[u8]) -> String {
    match name.split_first() {
        None => "(unnamed)".into(),
        Some((0, rest)) => format!("@{}", String::from_utf8_lossy(rest)),
        Some(_) => String::from_utf8_lossy(name.split(|&b| b == 0).next().unwrap_or(name)).into(),
    }
}

/// `sockaddr_un` for a saved name, and its length.
fn sockaddr_un(name: &[u8]) -> std::io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: sockaddr_un is plain data; all zeroes is valid.
    let mut a: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if name.len() > a.sun_path.len() {
        return Err(std::io::Error::other("name too long"));
    }
    a.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in a.sun_path.iter_mut().zip(name) {
        *d = *s as libc::c_char;
    }
    // A path is NUL-terminated; an abstract name is exactly its bytes.
    let path_len = if name.first() == Some(&0) {
        name.len()
    } else {
        name.iter().position(|&b| b == 0).unwrap_or(name.len())
    };
    Ok((
        a,
        (std::mem::size_of::<libc::sa_family_t>() + path_len) as libc::socklen_t,
    ))
}

fn path_of(name: &[u8]) -> Option<std::path::PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    (name.first().is_some_and(|&b| b != 0)).then(|| {
        std::path::PathBuf::from(std::ffi::OsStr::from_bytes(
            name.split(|&b| b == 0).next().unwrap_or(name),
        ))
    })
}

/// Removes the socket file a dead process left at `name`'s path (a path in
/// use by a live socket, or a file that is not a socket, is an error).
fn unlink_stale(name: &[u8], ty: i32) -> std::io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Some(path) = path_of(name) else {
        return Ok(());
    };
    let meta = match std::fs::symlink_metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(std::io::Error::other(format!(
            "{} exists and is not a socket",
            path.display()
        )));
    }
    let probe = new_unix(ty)?;
    let (a, len) = sockaddr_un(name)?;
    // SAFETY: connect reads `len` bytes of the sockaddr_un we built.
    let r = unsafe {
        libc::connect(
            probe.as_raw_fd(),
            (&a as *const libc::sockaddr_un).cast(),
            len,
        )
    };
    if r == 0 {
        return Err(std::io::Error::other(format!(
            "{} is in use by a live socket",
            path.display()
        )));
    }
    std::fs::remove_file(&path)
}

fn new_unix(ty: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: socket returns a new fd we then own.
    let s = unsafe { libc::socket(libc::AF_UNIX, ty | libc::SOCK_CLOEXEC, 0) };
    if s < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `s` is a fresh fd.
    Ok(unsafe { OwnedFd::from_raw_fd(s) })
}

/// A socket of type `ty` bound to `name` and listening.
fn bind_listen(name: &[u8], ty: i32, backlog: i32) -> std::io::Result<OwnedFd> {
    unlink_stale(name, ty)?;
    let s = new_unix(ty)?;
    let (a, len) = sockaddr_un(name)?;
    // SAFETY: bind reads `len` bytes of the sockaddr_un we built; listen takes no pointer.
    unsafe {
        if libc::bind(s.as_raw_fd(), (&a as *const libc::sockaddr_un).cast(), len) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::listen(s.as_raw_fd(), backlog) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(s)
}

/// A connected pair whose server end carries `name` (as an accepted socket
/// does): made through a throwaway listener at that name, which is removed
/// again so the real listener can take it. Returns (server end, client end).
fn accepted_pair(name: &[u8], ty: i32) -> std::io::Result<(OwnedFd, OwnedFd)> {
    let l = bind_listen(name, ty, 1)?;
    let c = new_unix(ty)?;
    let (a, len) = sockaddr_un(name)?;
    // SAFETY: connect reads the sockaddr_un we built; accept4 takes no address buffer.
    let sv = unsafe {
        if libc::connect(c.as_raw_fd(), (&a as *const libc::sockaddr_un).cast(), len) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let sv = libc::accept4(
            l.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        );
        if sv < 0 {
            return Err(std::io::Error::last_os_error());
        }
        OwnedFd::from_raw_fd(sv)
    };
    drop(l);
    if let Some(p) = path_of(name) {
        std::fs::remove_file(p)?;
    }
    Ok((sv, c))
}

impl UnixListen {
    /// Recreated in the restorer (its socket file with its mode and owner).
    pub fn restore(&self) -> Result<Opened, UnixError> {
        Ok(Opened::new(restore_listen(self)?, Some(self.flags)))
    }

    pub fn describe(&self, shared: bool, cloexec: &str) -> String {
        if shared {
            format!(
                "listening unix socket {}, backlog {} (shared{cloexec})",
                unix_name_text(&self.name),
                self.backlog
            )
        } else {
            format!(
                "listening unix socket {}{cloexec}",
                unix_name_text(&self.name)
            )
        }
    }
}

/// Recreates a listening unix socket in the restorer.
fn restore_listen(l: &UnixListen) -> Result<OwnedFd, UnixError> {
    let err = |what: &'static str, source: std::io::Error| UnixError::Listen {
        name: unix_name_text(&l.name),
        what,
        source,
    };
    let s = bind_listen(&l.name, l.ty, l.backlog).map_err(|e| err("bind", e))?;
    if let Some(path) = path_of(&l.name) {
        match l.file {
            Some((mode, uid, gid)) => {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                    .map_err(|e| err("chmod", e))?;
                std::os::unix::fs::lchown(&path, Some(uid), Some(gid))
                    .map_err(|e| err("chown", e))?;
            }
            // Its file had been removed: reachable only by those already connected.
            None => std::fs::remove_file(&path).map_err(|e| err("unlink", e))?,
        }
    }
    Ok(s)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Message(#[serde(with = "crate::image::hex_bytes")] pub Vec<u8>);

/// A receive queue as peeked: its messages, and the files in flight on some
/// of them (by message index).
type Peeked = (Vec<Message>, Vec<(usize, Vec<PassedFile>)>);

/// Reads a receive queue without consuming it, with the regular files in
/// flight on its messages (SCM_RIGHTS, which the peek installs in crest: each
/// is described, then closed). Other descriptors or credentials in flight
/// are refused.
fn peek_queue(
    pid: i32,
    fd: i32,
    inode: u64,
    sock: &OwnedFd,
    stream: bool,
    dump_pids: &[i32],
) -> Result<Peeked> {
    let s = sock.as_raw_fd();
    let old_off = get_int(s, libc::SOL_SOCKET, libc::SO_PEEK_OFF).unwrap_or(0);
    let set_off = |v: libc::c_int| {
        // SAFETY: setsockopt reads one int.
        unsafe {
            libc::setsockopt(
                s,
                libc::SOL_SOCKET,
                libc::SO_PEEK_OFF,
                (&v as *const libc::c_int).cast(),
                4,
            )
        }
    };
    if set_off(0) < 0 {
        return Err(last_err(pid, "SO_PEEK_OFF"));
    }
    let mut out: Vec<Message> = Vec::new();
    let mut passed: Vec<(usize, Vec<PassedFile>)> = Vec::new();
    let mut held: Vec<OwnedFd> = Vec::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut control = [0u8; 256];
    let result = loop {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: msghdr points at our iovec and control buffer, both live.
        let (n, flags, clen) = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = control.len();
            let n = libc::recvmsg(
                s,
                &mut msg,
                libc::MSG_PEEK | libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
            );
            (n, msg.msg_flags, msg.msg_controllen)
        };
        if n < 0 {
            let e = nix::errno::Errno::last();
            break if e == nix::errno::Errno::EAGAIN {
                Ok(())
            } else {
                Err(Error::sys(pid, format!("fd {fd}: peeking its queue"), e))
            };
        }
        let mut received: Vec<OwnedFd> = Vec::new();
        let mut other_cmsg = false;
        if clen > 0 {
            // SAFETY: walking the control buffer the kernel filled, clen bytes;
            // the SCM_RIGHTS fds are crest's own from here on.
            unsafe {
                let mut msg: libc::msghdr = std::mem::zeroed();
                msg.msg_control = control.as_mut_ptr().cast();
                msg.msg_controllen = clen;
                let mut c = libc::CMSG_FIRSTHDR(&msg);
                while !c.is_null() {
                    if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                        let data = libc::CMSG_DATA(c).cast::<i32>();
                        let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / 4;
                        for i in 0..count {
                            received.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                        }
                    } else {
                        other_cmsg = true;
                    }
                    c = libc::CMSG_NXTHDR(&msg, c);
                }
            }
        }
        if other_cmsg || flags & libc::MSG_CTRUNC != 0 {
            break Err(Error::unsupported(
                pid,
                format!("fd {fd} has credentials or too many file descriptors in flight"),
            ));
        }
        let mut files = Vec::new();
        let mut failed = None;
        for (i, r) in received.iter().enumerate() {
            let earlier: Vec<i32> = received[..i]
                .iter()
                .map(|o| o.as_raw_fd())
                .chain(held.iter().map(|o| o.as_raw_fd()))
                .collect();
            match passed_file(pid, fd, inode, r.as_raw_fd(), &earlier, dump_pids) {
                Ok(f) => files.push(f),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = failed {
            break Err(e);
        }
        // Kept open until the whole queue is read, to tell the same file apart.
        held.extend(received);
        if flags & libc::MSG_TRUNC != 0 {
            break Err(Error::unsupported(
                pid,
                format!(
                    "fd {fd} has a queued message larger than {} bytes",
                    buf.len()
                ),
            ));
        }
        if n == 0 && stream {
            break Ok(());
        }
        // A stream's bytes are one blob, except where files ride on them: the
        // kernel attaches those to the bytes of one send, so they stay a message.
        let last = out.len().wrapping_sub(1);
        let merge =
            stream && files.is_empty() && !out.is_empty() && !passed.iter().any(|p| p.0 == last);
        match out.last_mut() {
            Some(blob) if merge => blob.0.extend_from_slice(&buf[..n as usize]),
            _ => {
                out.push(Message(buf[..n as usize].to_vec()));
                if !files.is_empty() {
                    passed.push((out.len() - 1, files));
                }
            }
        }
    };
    set_off(old_off);
    drop(held);
    result.map(|()| (out, passed))
}

/// A unix socket crest can carry.
pub enum Socket {
    Pair(UnixEnd),
    Listen(UnixListen),
}

/// Describes unix socket `fd` of `pid` (`sock`: crest's copy; `ty`: its
/// type), or says why crest cannot carry it ([`NotCarried`]). Each regular file
/// in flight on it becomes an open file through `in_flight`; `dump_pids`:
/// the processes of the dump.
pub fn collect(
    pid: i32,
    fd: i32,
    sock: &OwnedFd,
    ty: i32,
    flags: i32,
    dump_pids: &[i32],
    in_flight: &mut dyn FnMut(PassedFile) -> FileId,
) -> Result<Socket, CollectError> {
    let s = sock.as_raw_fd();
    let tyname = type_name(ty);
    // SAFETY: fstat writes into a stat we own.
    let inode = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(s, &mut st) < 0 {
            return Err(last_err(pid, "fstat of a socket").into());
        }
        st.st_ino
    };
    let d = crate::sys::sockdiag::unix(pid, inode)?;
    let not_carried = |why| Err(CollectError::not_carried(why));
    let shown = unix_name_text(&d.name);
    if !d.name.is_empty() && d.name[0] != 0 && d.name[0] != b'/' {
        return not_carried(NotCarried::RelativePath { ty: tyname, shown });
    }
    if get_int(s, libc::SOL_SOCKET, libc::SO_ACCEPTCONN).unwrap_or(0) != 0 {
        let (waiting, backlog) = d.rqlen.unwrap_or((0, libc::SOMAXCONN as u32));
        if waiting > 0 {
            return not_carried(NotCarried::Backlog { shown, waiting });
        }
        if d.name.is_empty() {
            return not_carried(NotCarried::UnnamedListen { ty: tyname });
        }
        // The socket file, if the one at the path is still this socket's.
        let file = path_of(&d.name).and_then(|p| {
            use std::os::unix::fs::MetadataExt;
            let m = std::fs::symlink_metadata(p).ok()?;
            (Some(m.ino()) == d.vfs_ino).then(|| (m.mode() & 0o7777, m.uid(), m.gid()))
        });
        return Ok(Socket::Listen(UnixListen {
            inode,
            ty,
            name: d.name,
            backlog: backlog as i32,
            flags,
            file,
        }));
    }
    if d.peer == 0 {
        return not_carried(if d.name.is_empty() {
            NotCarried::Unconnected { ty: tyname }
        } else {
            NotCarried::NotConnected { ty: tyname, shown }
        });
    }
    if !d.name.is_empty() && ty == libc::SOCK_DGRAM {
        return not_carried(NotCarried::DatagramBound { shown });
    }
    let (queue, passed) = peek_queue(pid, fd, inode, sock, ty == libc::SOCK_STREAM, dump_pids)?;
    let passed = passed
        .into_iter()
        .map(|(message, files)| InFlight {
            message,
            files: files.into_iter().map(&mut *in_flight).collect(),
        })
        .collect();
    Ok(Socket::Pair(UnixEnd {
        inode,
        peer: d.peer,
        ty,
        flags,
        queue,
        name: d.name,
        passed,
    }))
}

/// A unix socket crest does not carry.
#[derive(Debug, thiserror::Error)]
pub enum NotCarried {
    #[error("a unix {ty} socket bound to the relative path {shown}")]
    RelativePath { ty: &'static str, shown: String },
    #[error("a listening unix socket {shown} with {waiting} connection(s) waiting to be accepted")]
    Backlog { shown: String, waiting: u32 },
    #[error("an unnamed listening unix {ty} socket")]
    UnnamedListen { ty: &'static str },
    #[error("an unconnected unix {ty} socket")]
    Unconnected { ty: &'static str },
    #[error("a unix {ty} socket bound to {shown}, not connected")]
    NotConnected { ty: &'static str, shown: String },
    #[error("a connected unix datagram socket bound to {shown}")]
    DatagramBound { shown: String },
}

/// A socket type's name, for messages.
pub fn type_name(ty: i32) -> &'static str {
    match ty {
        libc::SOCK_STREAM => "stream",
        libc::SOCK_DGRAM => "datagram",
        libc::SOCK_SEQPACKET => "seqpacket",
        _ => "raw",
    }
}

/// The unix socket pairs the restorer has made: each pair once, when the
/// first of its ends is restored.
pub struct Pairs<'a> {
    ends: Vec<&'a UnixEnd>,
    made: Vec<(u64, OwnedFd)>,
}

impl<'a> Pairs<'a> {
    /// For the pairs of `ends` (every end in the image).
    pub fn new(ends: Vec<&'a UnixEnd>) -> Pairs<'a> {
        Pairs {
            ends,
            made: Vec::new(),
        }
    }

    /// End `end`: its pair is made (both ends, both queues refilled) once
    /// the files in flight on either end are open (`opened` gives them;
    /// "not yet" before).
    pub fn restore(
        &mut self,
        end: &UnixEnd,
        opened: &dyn Fn(FileId) -> Option<RawFd>,
    ) -> Result<Restored<Opened>, UnixError> {
        if !self.made.iter().any(|(i, _)| *i == end.inode) {
            let peer =
                *self
                    .ends
                    .iter()
                    .find(|e| e.inode == end.peer)
                    .ok_or(UnixError::MissingPeer {
                        inode: end.inode,
                        peer: end.peer,
                    })?;
            let waiting = [end, peer]
                .iter()
                .flat_map(|e| e.passed.iter().flat_map(|p| &p.files))
                .any(|&f| opened(f).is_none());
            if waiting {
                return Ok(Restored::NotYet);
            }
            let (a, b) = create(end, peer, opened)?;
            self.made.push((end.inode, a));
            self.made.push((peer.inode, b));
        }
        let (_, sock) = self
            .made
            .iter()
            .find(|(i, _)| *i == end.inode)
            .expect("made above");
        let copy = sock.try_clone().map_err(|source| UnixError::Dup {
            inode: end.inode,
            source,
        })?;
        Ok(Restored::Done(Opened::new(copy, Some(end.flags))))
    }
}

/// Creates the pair of ends `a` and `b` in the restorer, each queue refilled
/// (what waited in a's queue was sent by b, and the other way round).
fn create(
    a: &UnixEnd,
    b: &UnixEnd,
    opened: &dyn Fn(FileId) -> Option<RawFd>,
) -> Result<(OwnedFd, OwnedFd), UnixError> {
    let named = |e: &UnixEnd| !e.name.is_empty();
    if named(a) && named(b) {
        return Err(UnixError::BothNamed {
            a: a.inode,
            b: b.inode,
        });
    }
    let mut fds = [0i32; 2];
    let pair = if named(a) || named(b) {
        let (server, _) = if named(a) { (a, b) } else { (b, a) };
        let (sv, cl) =
            accepted_pair(&server.name, server.ty).map_err(|source| UnixError::Accepted {
                inode: server.inode,
                name: unix_name_text(&server.name),
                source,
            })?;
        Some(if named(a) { (sv, cl) } else { (cl, sv) })
    } else {
        None
    };
    let (fa, fb) = if let Some(p) = pair {
        p
    } else {
        // SAFETY: socketpair writes two fds we then own.
        unsafe {
            if libc::socketpair(
                libc::AF_UNIX,
                a.ty | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            ) < 0
            {
                return Err(UnixError::Sys {
                    inode: a.inode,
                    what: "socketpair".into(),
                    source: std::io::Error::last_os_error(),
                });
            }
            (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))
        }
    };
    for (receiver, sender) in [(a, &fb), (b, &fa)] {
        for (i, m) in receiver.queue.iter().enumerate() {
            let files: Vec<RawFd> = receiver
                .passed
                .iter()
                .filter(|p| p.message == i)
                .flat_map(|p| &p.files)
                .map(|&f| opened(f).expect("checked by the caller"))
                .collect();
            let n = send_with_files(sender.as_raw_fd(), &m.0, &files);
            if n != m.0.len() as isize {
                let source = std::io::Error::last_os_error();
                return Err(UnixError::Sys {
                    inode: receiver.inode,
                    what: format!("requeueing {} bytes", m.0.len()),
                    source,
                });
            }
        }
    }
    Ok((fa, fb))
}

/// Why a unix socket could not be recreated.
#[derive(Debug, thiserror::Error)]
pub enum UnixError {
    #[error("unix socket {on}: {path} in flight: {what}: {source}")]
    InFlight {
        on: u64,
        path: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("listening unix socket {name}: {what}: {source}")]
    Listen {
        name: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("unix socket {inode}: its peer {peer} is missing from the image")]
    MissingPeer { inode: u64, peer: u64 },
    #[error("socket {inode}: dup: {source}")]
    Dup {
        inode: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("unix sockets {a} and {b}: both ends of the connection have a name")]
    BothNamed { a: u64, b: u64 },
    #[error("unix socket {inode} (accepted at {name}): {source}")]
    Accepted {
        inode: u64,
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("unix socket {inode}: {what}: {source}")]
    Sys {
        inode: u64,
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl UnixEnd {
    pub fn describe(&self, shared: bool, cloexec: &str) -> String {
        if !shared {
            return format!(
                "unix socket {} paired with {}{cloexec}",
                self.inode, self.peer
            );
        }
        let queued: usize = self.queue.iter().map(|m| m.0.len()).sum();
        let ty = match self.ty {
            libc::SOCK_STREAM => "stream",
            libc::SOCK_DGRAM => "datagram",
            _ => "seqpacket",
        };
        let at = if self.name.is_empty() {
            String::new()
        } else {
            format!(" at {}", unix_name_text(&self.name))
        };
        format!(
            "unix {ty} socket{at} paired with {} ({} messages, {queued} bytes queued{cloexec})",
            self.peer,
            self.queue.len()
        )
    }
}

/// Sends `data` on `s` with `files` attached (SCM_RIGHTS); returns what send returns.
fn send_with_files(s: i32, data: &[u8], files: &[RawFd]) -> isize {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let bytes = std::mem::size_of_val(files) as u32;
    let space = if files.is_empty() {
        0
    } else {
        // SAFETY: CMSG_SPACE is a pure computation.
        unsafe { libc::CMSG_SPACE(bytes) as usize }
    };
    let mut control = vec![0u8; space];
    // SAFETY: msghdr points at our iovec and control buffer, both live; the
    // cmsg header and its fds are written inside `control`.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !files.is_empty() {
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = space;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(bytes) as usize;
            let data = libc::CMSG_DATA(c).cast::<i32>();
            for (i, f) in files.iter().enumerate() {
                data.add(i).write_unaligned(*f);
            }
        }
        libc::sendmsg(s, &msg, libc::MSG_DONTWAIT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    /// What collect makes of our own socket `sock` (its files in flight
    /// are added to `files`).
    fn collect_own(sock: &OwnedFd, files: &mut Vec<PassedFile>) -> UnixEnd {
        let fd = sock.as_raw_fd();
        let ty = get_int(fd, libc::SOL_SOCKET, libc::SO_TYPE).unwrap();
        let copy = sock.try_clone().unwrap();
        let mut in_flight = |f: PassedFile| {
            files.push(f);
            FileId(files.len() as u32 - 1)
        };
        let me = std::process::id() as i32;
        match collect(me, fd, &copy, ty, libc::O_NONBLOCK, &[], &mut in_flight) {
            Ok(Socket::Pair(end)) => end,
            Ok(Socket::Listen(_)) => panic!("a pair collected as a listener"),
            Err(e) => panic!("{e}"),
        }
    }

    /// Collect, restore, collect again: the same pair (under new inodes),
    /// its messages queued both ways, a file in flight at its offset.
    #[test]
    fn a_pair_round_trips() {
        let mut fds = [0i32; 2];
        // SAFETY: socketpair writes two descriptors we then own.
        let (a, b) = unsafe {
            assert_eq!(
                libc::socketpair(
                    libc::AF_UNIX,
                    libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                    0,
                    fds.as_mut_ptr()
                ),
                0
            );
            (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in-flight");
        std::fs::write(&path, b"0123456789").unwrap();
        let file = std::fs::File::open(&path).unwrap();
        // SAFETY: lseek on a file we own.
        unsafe { libc::lseek(file.as_raw_fd(), 5, libc::SEEK_SET) };
        assert_eq!(send_with_files(b.as_raw_fd(), b"to a", &[]), 4);
        assert_eq!(
            send_with_files(b.as_raw_fd(), b"a file", &[file.as_raw_fd()]),
            6
        );
        assert_eq!(send_with_files(a.as_raw_fd(), b"to b", &[]), 4);
        drop(file);
        let mut files = Vec::new();
        let saved = [collect_own(&a, &mut files), collect_own(&b, &mut files)];
        assert_eq!(saved[0].queue.len(), 2);
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].pos, 5);
        drop((a, b));

        // The file in flight first, then the pair.
        let opened: Vec<Opened> = files.iter().map(|f| f.restore().unwrap()).collect();
        let raw = |id: FileId| opened.get(id.index()).map(|o| o.fd.as_raw_fd());
        let mut pairs = Pairs::new(saved.iter().collect());
        let mut restored = Vec::new();
        for end in &saved {
            match pairs.restore(end, &raw).unwrap() {
                Restored::Done(o) => restored.push(o),
                Restored::NotYet => panic!("its file in flight is open"),
            }
        }
        drop(opened);

        let mut files_again = Vec::new();
        for (end, o) in saved.iter().zip(&restored) {
            let again = collect_own(&o.fd, &mut files_again);
            assert_eq!(
                again,
                UnixEnd {
                    inode: again.inode,
                    peer: again.peer,
                    ..end.clone()
                }
            );
        }
        let on = |f: &PassedFile| PassedFile { on: 0, ..f.clone() };
        assert_eq!(
            files_again.iter().map(on).collect::<Vec<_>>(),
            files.iter().map(on).collect::<Vec<_>>()
        );
    }

    #[rstest]
    #[case(b"/tmp/a.sock", "/tmp/a.sock", 2 + 11)]
    #[case(b"\0crest-wl-1", "@crest-wl-1", 2 + 11)]
    #[case(b"/tmp/b\0\0\0", "/tmp/b", 2 + 6)]
    fn unix_names(#[case] raw: &[u8], #[case] text: &str, #[case] len: u32) {
        assert_eq!(unix_name_text(raw), text);
        assert_eq!(sockaddr_un(raw).unwrap().1, len);
    }

    #[test]
    fn an_accepted_pair_carries_the_name_and_frees_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let name = path.as_os_str().as_encoded_bytes().to_vec();
        let (sv, cl) = accepted_pair(&name, libc::SOCK_STREAM).unwrap();
        let sv = std::os::unix::net::UnixStream::from(sv);
        let cl = std::os::unix::net::UnixStream::from(cl);
        assert_eq!(sv.local_addr().unwrap().as_pathname(), Some(path.as_path()));
        assert_eq!(cl.peer_addr().unwrap().as_pathname(), Some(path.as_path()));
        assert!(!path.exists(), "the throwaway listener's file is removed");
        let l = bind_listen(&name, libc::SOCK_STREAM, 4).unwrap();
        drop(l);
        // Left behind by a dead listener: removed and bound again.
        bind_listen(&name, libc::SOCK_STREAM, 4).unwrap();
    }
}
