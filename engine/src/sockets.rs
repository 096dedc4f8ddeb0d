//! Unix socket pairs: both ends in the dump, with the data queued in each
//! direction.
//!
//! Collect duplicates the socket into crest (`pidfd_getfd`), finds its peer
//! with sock_diag (UNIX_DIAG_PEER), and reads each receive queue without
//! consuming it: `MSG_PEEK` stepping `SO_PEEK_OFF` (restored afterwards).
//! Restore creates each pair once in the restorer, sends every queued message
//! from the peer end again, and every process inherits its ends.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

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
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Message(#[serde(with = "crate::image::hex_bytes")] pub Vec<u8>);

fn sys_err(pid: i32, what: &str) -> Error {
    Error::sys(pid, what.to_string(), nix::errno::Errno::last())
}

fn sockopt(fd: i32, level: i32, name: i32) -> i32 {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `v`.
    unsafe {
        libc::getsockopt(
            fd,
            level,
            name,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    v
}

/// The peer inode of unix socket `inode` and whether it has a name, from sock_diag.
fn diag(pid: i32, inode: u64) -> Result<(u64, bool)> {
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const UDIAG_SHOW_NAME: u32 = 0x1;
    const UDIAG_SHOW_PEER: u32 = 0x4;
    const UNIX_DIAG_NAME: u16 = 0;
    const UNIX_DIAG_PEER: u16 = 2;
    #[repr(C)]
    struct Req {
        len: u32,
        ty: u16,
        flags: u16,
        seq: u32,
        pid: u32,
        family: u8,
        protocol: u8,
        pad: u16,
        states: u32,
        ino: u32,
        show: u32,
        cookie: [u32; 2],
    }
    let req = Req {
        len: std::mem::size_of::<Req>() as u32,
        ty: SOCK_DIAG_BY_FAMILY,
        flags: libc::NLM_F_REQUEST as u16,
        seq: 1,
        pid: 0,
        family: libc::AF_UNIX as u8,
        protocol: 0,
        pad: 0,
        states: u32::MAX,
        ino: inode as u32,
        show: UDIAG_SHOW_PEER | UDIAG_SHOW_NAME,
        cookie: [u32::MAX; 2],
    };
    let mut buf = [0u8; 8192];
    // SAFETY: a netlink socket we own; send reads `req`, recv writes into `buf`.
    let n = unsafe {
        let s = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        );
        if s < 0 {
            return Err(sys_err(pid, "sock_diag socket"));
        }
        let s = OwnedFd::from_raw_fd(s);
        if libc::send(
            s.as_raw_fd(),
            (&req as *const Req).cast(),
            std::mem::size_of::<Req>(),
            0,
        ) < 0
        {
            return Err(sys_err(pid, "sock_diag send"));
        }
        libc::recv(s.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0)
    };
    if n < 16 + 16 {
        return Err(Error::Refused {
            pid,
            reason: format!("sock_diag gave no answer for socket {inode}"),
        });
    }
    let msg_type = u16::from_ne_bytes([buf[4], buf[5]]);
    if msg_type == libc::NLMSG_ERROR as u16 {
        return Err(Error::unsupported(
            pid,
            format!("unix socket {inode}: this kernel cannot report its peer (sock_diag for AF_UNIX, CONFIG_UNIX_DIAG, is not loaded)"),
        ));
    }
    let total = (u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize).min(n as usize);
    let mut off = 16 + 16; // nlmsghdr + unix_diag_msg
    let (mut peer, mut named) = (0u64, false);
    while off + 4 <= total {
        let len = u16::from_ne_bytes([buf[off], buf[off + 1]]) as usize;
        let ty = u16::from_ne_bytes([buf[off + 2], buf[off + 3]]);
        if len < 4 || off + len > total {
            break;
        }
        match ty {
            UNIX_DIAG_PEER if len >= 8 => {
                peer = u32::from_ne_bytes([buf[off + 4], buf[off + 5], buf[off + 6], buf[off + 7]])
                    as u64
            }
            UNIX_DIAG_NAME => named = len > 4,
            _ => {}
        }
        off += (len + 3) & !3;
    }
    Ok((peer, named))
}

/// Reads a receive queue without consuming it. Refuses file descriptors or
/// credentials in flight (SCM_RIGHTS), which are not carried yet.
fn peek_queue(pid: i32, fd: i32, sock: &OwnedFd, stream: bool) -> Result<Vec<Message>> {
    let s = sock.as_raw_fd();
    let old_off = sockopt(s, libc::SOL_SOCKET, libc::SO_PEEK_OFF);
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
        return Err(sys_err(pid, "SO_PEEK_OFF"));
    }
    let mut out: Vec<Message> = Vec::new();
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
        if clen > 0 {
            // Close whatever SCM_RIGHTS the peek installed in crest, then refuse.
            // SAFETY: walking the control buffer the kernel filled, clen bytes.
            unsafe {
                let mut msg: libc::msghdr = std::mem::zeroed();
                msg.msg_control = control.as_mut_ptr().cast();
                msg.msg_controllen = clen;
                let mut c = libc::CMSG_FIRSTHDR(&msg);
                while !c.is_null() {
                    if (*c).cmsg_type == libc::SCM_RIGHTS {
                        let data = libc::CMSG_DATA(c).cast::<i32>();
                        let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / 4;
                        for i in 0..count {
                            libc::close(*data.add(i));
                        }
                    }
                    c = libc::CMSG_NXTHDR(&msg, c);
                }
            }
            break Err(Error::unsupported(
                pid,
                format!("fd {fd} has file descriptors or credentials in flight (SCM_RIGHTS)"),
            ));
        }
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
        if stream {
            match out.first_mut() {
                Some(blob) => blob.0.extend_from_slice(&buf[..n as usize]),
                None => out.push(Message(buf[..n as usize].to_vec())),
            }
        } else {
            out.push(Message(buf[..n as usize].to_vec()));
        }
    };
    set_off(old_off);
    result.map(|()| out)
}

/// Describes socket `fd` of `pid` as a unix pair end, or says why it is not one
/// crest can carry (its refusal message, "a TCP socket" …).
/// What a socket descriptor is, when crest can carry it.
pub enum Collected {
    Unix(UnixEnd),
    TcpListen(TcpListen),
    TcpConn(crate::tcp::TcpConn),
    Udp(crate::udp::UdpSock),
}

pub fn collect(pid: i32, fd: i32, flags: i32) -> Result<std::result::Result<Collected, String>> {
    let sock = crate::files::pidfd_getfd(pid, fd)?;
    let s = sock.as_raw_fd();
    let (domain, ty) = (
        sockopt(s, libc::SOL_SOCKET, libc::SO_DOMAIN),
        sockopt(s, libc::SOL_SOCKET, libc::SO_TYPE),
    );
    let tyname = match ty {
        libc::SOCK_STREAM => "stream",
        libc::SOCK_DGRAM => "datagram",
        libc::SOCK_SEQPACKET => "seqpacket",
        _ => "raw",
    };
    match domain {
        libc::AF_UNIX => {}
        libc::AF_INET | libc::AF_INET6 if ty == libc::SOCK_STREAM => {
            if sockopt(s, libc::SOL_SOCKET, libc::SO_ACCEPTCONN) == 0 {
                return Ok(
                    crate::tcp::collect(pid, fd, &sock, domain, flags)?.map(Collected::TcpConn)
                );
            }
            return Ok(collect_listen(pid, &sock, domain, flags)?.map(Collected::TcpListen));
        }
        libc::AF_INET | libc::AF_INET6 if ty == libc::SOCK_DGRAM => {
            return Ok(Ok(Collected::Udp(crate::udp::collect(
                pid, fd, &sock, domain, flags,
            )?)))
        }
        libc::AF_NETLINK => return Ok(Err("a netlink socket".into())),
        d => return Ok(Err(format!("a socket (family {d}, {tyname})"))),
    }
    // SAFETY: fstat writes into a stat we own.
    let inode = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(s, &mut st) < 0 {
            return Err(sys_err(pid, "fstat of a socket"));
        }
        st.st_ino
    };
    let (peer, named) = diag(pid, inode)?;
    if named {
        return Ok(Err(format!("a bound unix {tyname} socket")));
    }
    if peer == 0 {
        return Ok(Err(format!("an unconnected unix {tyname} socket")));
    }
    let queue = peek_queue(pid, fd, &sock, ty == libc::SOCK_STREAM)?;
    Ok(Ok(Collected::Unix(UnixEnd {
        inode,
        peer,
        ty,
        flags,
        queue,
    })))
}

/// Creates every pair of the image in the restorer: returns each end's inode
/// with its socket, queues refilled.
pub fn create(ends: &[UnixEnd]) -> Result<Vec<(u64, OwnedFd)>> {
    let mut out: Vec<(u64, OwnedFd)> = Vec::new();
    for a in ends {
        if out.iter().any(|(i, _)| *i == a.inode) {
            continue;
        }
        let b = ends.iter().find(|e| e.inode == a.peer).ok_or_else(|| {
            Error::Restore(format!(
                "unix socket {}: its peer {} is missing from the image",
                a.inode, a.peer
            ))
        })?;
        let mut fds = [0i32; 2];
        // SAFETY: socketpair writes two fds we then own.
        let (fa, fb) = unsafe {
            if libc::socketpair(
                libc::AF_UNIX,
                a.ty | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            ) < 0
            {
                return Err(Error::Restore(format!(
                    "unix socket {}: socketpair: {}",
                    a.inode,
                    std::io::Error::last_os_error()
                )));
            }
            (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))
        };
        // What waited in a's queue was sent by b, and the other way round.
        for (receiver, sender) in [(a, &fb), (b, &fa)] {
            for m in &receiver.queue {
                // SAFETY: send of our buffer on a socket we own.
                let n = unsafe {
                    libc::send(
                        sender.as_raw_fd(),
                        m.0.as_ptr().cast(),
                        m.0.len(),
                        libc::MSG_DONTWAIT,
                    )
                };
                if n != m.0.len() as isize {
                    return Err(Error::Restore(format!(
                        "unix socket {}: requeueing {} bytes: {}",
                        receiver.inode,
                        m.0.len(),
                        std::io::Error::last_os_error()
                    )));
                }
            }
        }
        out.push((a.inode, fa));
        out.push((b.inode, fb));
    }
    Ok(out)
}

/// A listening TCP socket: address, backlog and the options that matter for
/// binding. Its accept queue must be empty (pending connections are refused).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpListen {
    pub inode: u64,
    pub family: i32,
    /// The bound `sockaddr_in`/`sockaddr_in6`, raw.
    #[serde(with = "crate::image::hex_bytes")]
    pub addr: Vec<u8>,
    pub backlog: i32,
    pub reuseaddr: bool,
    pub reuseport: bool,
    pub v6only: bool,
    pub nodelay: bool,
    /// Status flags (O_NONBLOCK).
    pub flags: i32,
}

/// The accept queue length and backlog of listening TCP socket `inode`, from inet_diag.
fn listen_queue(pid: i32, family: i32, inode: u64) -> Result<Option<(u32, u32)>> {
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const TCP_LISTEN: u32 = 10;
    const REQ_LEN: usize = 16 + 56;
    let mut req = [0u8; REQ_LEN];
    req[0..4].copy_from_slice(&(REQ_LEN as u32).to_ne_bytes());
    req[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req[6..8].copy_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    req[16] = family as u8;
    req[17] = libc::IPPROTO_TCP as u8;
    req[20..24].copy_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes());
    // SAFETY: a netlink socket we own; send reads `req`, recv writes into `buf`.
    unsafe {
        let s = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        );
        if s < 0 {
            return Err(sys_err(pid, "inet_diag socket"));
        }
        let s = OwnedFd::from_raw_fd(s);
        if libc::send(s.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) < 0 {
            return Err(sys_err(pid, "inet_diag send"));
        }
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = libc::recv(s.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0);
            if n <= 0 {
                return Ok(None);
            }
            let mut off = 0usize;
            while off + 16 <= n as usize {
                let len = u32::from_ne_bytes(buf[off..off + 4].try_into().expect("4")) as usize;
                let ty = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().expect("2"));
                if ty == libc::NLMSG_DONE as u16 || ty == libc::NLMSG_ERROR as u16 {
                    return Ok(None);
                }
                if len < 16 + 72 || off + len > n as usize {
                    return Ok(None);
                }
                let m = &buf[off + 16..off + len];
                let u32_at = |i: usize| u32::from_ne_bytes(m[i..i + 4].try_into().expect("4"));
                // inet_diag_msg: 4 bytes, id (48), expires, rqueue, wqueue, uid, inode.
                if u32_at(68) as u64 == inode {
                    return Ok(Some((u32_at(56), u32_at(60))));
                }
                off += (len + 3) & !3;
            }
        }
    }
}

fn collect_listen(
    pid: i32,
    sock: &OwnedFd,
    family: i32,
    flags: i32,
) -> Result<std::result::Result<TcpListen, String>> {
    let s = sock.as_raw_fd();
    // SAFETY: fstat and getsockname write into buffers we own.
    let (inode, addr) = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(s, &mut st) < 0 {
            return Err(sys_err(pid, "fstat of a socket"));
        }
        let mut ss: libc::sockaddr_storage = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        if libc::getsockname(s, (&mut ss as *mut libc::sockaddr_storage).cast(), &mut len) < 0 {
            return Err(sys_err(pid, "getsockname"));
        }
        let bytes = std::slice::from_raw_parts(
            (&ss as *const libc::sockaddr_storage).cast::<u8>(),
            len as usize,
        )
        .to_vec();
        (st.st_ino, bytes)
    };
    let (waiting, backlog) =
        listen_queue(pid, family, inode)?.unwrap_or((0, libc::SOMAXCONN as u32));
    if waiting > 0 {
        return Ok(Err(format!(
            "a listening TCP socket with {waiting} connection(s) waiting to be accepted"
        )));
    }
    Ok(Ok(TcpListen {
        inode,
        family,
        addr,
        backlog: backlog as i32,
        reuseaddr: sockopt(s, libc::SOL_SOCKET, libc::SO_REUSEADDR) != 0,
        reuseport: sockopt(s, libc::SOL_SOCKET, libc::SO_REUSEPORT) != 0,
        v6only: family == libc::AF_INET6 && sockopt(s, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY) != 0,
        nodelay: sockopt(s, libc::IPPROTO_TCP, libc::TCP_NODELAY) != 0,
        flags,
    }))
}

/// Recreates a listening socket in the restorer.
pub fn restore_listen(l: &TcpListen) -> Result<i32> {
    let set = |s: i32, level: i32, name: i32, on: bool| {
        let v: libc::c_int = on.into();
        // SAFETY: setsockopt reads one int.
        unsafe { libc::setsockopt(s, level, name, (&v as *const libc::c_int).cast(), 4) }
    };
    let err = |what: &str| {
        Error::Restore(format!(
            "listening TCP socket {}: {what}: {}",
            l.inode,
            std::io::Error::last_os_error()
        ))
    };
    // SAFETY: a socket we create and own; bind reads the saved address bytes.
    unsafe {
        let s = libc::socket(l.family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if s < 0 {
            return Err(err("socket"));
        }
        let owned = OwnedFd::from_raw_fd(s);
        if l.family == libc::AF_INET6 {
            set(s, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, l.v6only);
        }
        // Connections the old socket accepted may linger in TIME_WAIT on this port.
        set(s, libc::SOL_SOCKET, libc::SO_REUSEADDR, true);
        set(s, libc::SOL_SOCKET, libc::SO_REUSEPORT, l.reuseport);
        set(s, libc::IPPROTO_TCP, libc::TCP_NODELAY, l.nodelay);
        if libc::bind(s, l.addr.as_ptr().cast(), l.addr.len() as libc::socklen_t) < 0 {
            return Err(err("bind"));
        }
        if libc::listen(s, l.backlog) < 0 {
            return Err(err("listen"));
        }
        set(s, libc::SOL_SOCKET, libc::SO_REUSEADDR, l.reuseaddr);
        use std::os::fd::IntoRawFd;
        Ok(owned.into_raw_fd())
    }
}
