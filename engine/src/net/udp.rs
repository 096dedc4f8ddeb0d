//! UDP sockets: address, peer, options and the datagrams waiting in the
//! receive queue.
//!
//! Collect peeks each queued datagram with its sender (`MSG_PEEK` stepping
//! `SO_PEEK_OFF`, restored afterwards), so the target loses nothing. Restore
//! binds every socket first, then requeues each datagram by sending it again
//! from a throwaway socket bound to its original sender's address
//! (`SO_REUSEADDR` lets it share the address with a restored socket;
//! `IP_FREEBIND`/`IP_TRANSPARENT` let it take one this host does not have),
//! so the program sees the same data and the same sender.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::fds::table::Opened;
use crate::net::inet::{
    addr_text, apply_opts, collect_opts, get_int, set_int, sock_name, InetOpts, SockOptError,
};

/// A UDP socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UdpSock {
    pub inode: u64,
    pub family: i32,
    /// The bound `sockaddr_in`/`sockaddr_in6`, raw (port 0: never bound).
    #[serde(with = "crate::image::hex_bytes")]
    pub local: Vec<u8>,
    /// The connected peer, raw.
    #[serde(default, with = "crate::image::hex_bytes")]
    pub peer: Vec<u8>,
    pub queue: Vec<Datagram>,
    pub opts: InetOpts,
    /// Status flags (O_NONBLOCK).
    pub flags: i32,
}

/// One datagram waiting to be read, with its sender.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Datagram {
    #[serde(with = "crate::image::hex_bytes")]
    pub from: Vec<u8>,
    #[serde(with = "crate::image::hex_bytes")]
    pub data: Vec<u8>,
}

fn port(raw: &[u8]) -> u16 {
    raw.get(2..4)
        .map_or(0, |b| u16::from_be_bytes([b[0], b[1]]))
}

/// Describes UDP socket `fd` of `pid` (`sock` is crest's copy).
pub fn collect(pid: i32, fd: i32, sock: &OwnedFd, family: i32, flags: i32) -> Result<UdpSock> {
    let s = sock.as_raw_fd();
    let sys = |what: &str, e: std::io::Error| {
        Error::sys(
            pid,
            format!("fd {fd}: UDP socket: {what}"),
            nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(0)),
        )
    };
    let local = sock_name(s, false).map_err(|e| sys("getsockname", e))?;
    let peer = match sock_name(s, true) {
        Ok(p) => p,
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Vec::new(),
        Err(e) => return Err(sys("getpeername", e)),
    };
    // SAFETY: fstat writes into a stat we own.
    let inode = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(s, &mut st) < 0 {
            return Err(sys("fstat", std::io::Error::last_os_error()));
        }
        st.st_ino
    };
    let queue = peek_all(s).map_err(|e| sys("peeking its queue", e))?;
    Ok(UdpSock {
        inode,
        family,
        local,
        peer,
        queue,
        opts: collect_opts(s, family),
        flags,
    })
}

/// Every queued datagram with its sender, without consuming any.
fn peek_all(s: i32) -> std::io::Result<Vec<Datagram>> {
    let old = get_int(s, libc::SOL_SOCKET, libc::SO_PEEK_OFF).unwrap_or(0);
    set_int(s, libc::SOL_SOCKET, libc::SO_PEEK_OFF, 0)?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 65536];
    let result = loop {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: msghdr points at our iovec and address buffer, both live.
        let (n, from, flags) = unsafe {
            let mut ss: libc::sockaddr_storage = std::mem::zeroed();
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_name = (&mut ss as *mut libc::sockaddr_storage).cast();
            msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            let n = libc::recvmsg(s, &mut msg, libc::MSG_PEEK | libc::MSG_DONTWAIT);
            let len = (msg.msg_namelen as usize).min(std::mem::size_of::<libc::sockaddr_storage>());
            let from = std::slice::from_raw_parts(
                (&ss as *const libc::sockaddr_storage).cast::<u8>(),
                len,
            )
            .to_vec();
            (n, from, msg.msg_flags)
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            break if e.raw_os_error() == Some(libc::EAGAIN) {
                Ok(())
            } else {
                Err(e)
            };
        }
        if out.len() >= 1 << 20 {
            break Err(std::io::Error::other(
                "more than a million queued datagrams",
            ));
        }
        if flags & libc::MSG_TRUNC != 0 {
            break Err(std::io::Error::other(
                "a queued datagram is larger than 64 KiB",
            ));
        }
        out.push(Datagram {
            from,
            data: buf[..n as usize].to_vec(),
        });
    };
    let _ = set_int(s, libc::SOL_SOCKET, libc::SO_PEEK_OFF, old);
    result.map(|()| out)
}

/// The UDP sockets the restorer makes: all of them at once, when the first
/// is restored (every socket bound before any datagram is requeued: a
/// datagram's sender may be another of them).
pub struct Sockets<'a> {
    socks: Vec<&'a UdpSock>,
    made: Option<Vec<(u64, OwnedFd)>>,
}

impl<'a> Sockets<'a> {
    /// For `socks`, every UDP socket of the image.
    pub fn new(socks: Vec<&'a UdpSock>) -> Sockets<'a> {
        Sockets { socks, made: None }
    }

    /// Socket `u`, made with all the others on first use.
    pub fn restore(&mut self, u: &UdpSock) -> Result<Opened, UdpError> {
        if self.made.is_none() {
            self.made = Some(create(&self.socks)?);
        }
        let (_, sock) = self
            .made
            .iter()
            .flatten()
            .find(|(i, _)| *i == u.inode)
            .ok_or(UdpError::NotCreated { inode: u.inode })?;
        let copy = sock.try_clone().map_err(|source| UdpError::Dup {
            inode: u.inode,
            source,
        })?;
        Ok(Opened::new(copy, Some(u.flags)))
    }
}

impl UdpSock {
    pub fn describe(&self, shared: bool, cloexec: &str) -> String {
        if !shared {
            return format!("UDP socket {}{cloexec}", addr_text(&self.local));
        }
        let peer = if self.peer.is_empty() {
            String::new()
        } else {
            format!(" → {}", addr_text(&self.peer))
        };
        format!(
            "UDP socket {}{peer} ({} datagrams queued{cloexec})",
            addr_text(&self.local),
            self.queue.len()
        )
    }
}

/// Recreates every UDP socket of the image in the restorer, queues refilled:
/// returns each one's inode with its socket.
fn create(socks: &[&UdpSock]) -> Result<Vec<(u64, OwnedFd)>, UdpError> {
    let err = |u: &UdpSock, what: &str, source: std::io::Error| UdpError::Sys {
        inode: u.inode,
        local: addr_text(&u.local),
        what: what.to_string(),
        source,
    };
    let mut out = Vec::new();
    for u in socks {
        // SAFETY: a socket we create and own from here on.
        let sock = unsafe {
            let s = libc::socket(u.family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
            if s < 0 {
                return Err(err(u, "socket", std::io::Error::last_os_error()));
            }
            OwnedFd::from_raw_fd(s)
        };
        let s = sock.as_raw_fd();
        if u.family == libc::AF_INET6 {
            set_int(
                s,
                libc::IPPROTO_IPV6,
                libc::IPV6_V6ONLY,
                u.opts.v6only.into(),
            )
            .map_err(|e| err(u, "IPV6_V6ONLY", e))?;
        }
        // Shared with the senders of its queued datagrams until they are requeued.
        set_int(s, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)
            .map_err(|e| err(u, "SO_REUSEADDR", e))?;
        if u.opts.reuseport {
            set_int(s, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)
                .map_err(|e| err(u, "SO_REUSEPORT", e))?;
        }
        apply_opts(
            s,
            &InetOpts {
                reuseaddr: true,
                ..u.opts.clone()
            },
            "UDP socket",
        )?;
        if port(&u.local) != 0 {
            // SAFETY: bind reads the saved address bytes, of their saved length.
            if unsafe { libc::bind(s, u.local.as_ptr().cast(), u.local.len() as u32) } < 0 {
                return Err(err(u, "bind", std::io::Error::last_os_error()));
            }
        }
        out.push((u.inode, sock));
    }
    for (u, (_, sock)) in socks.iter().zip(&out) {
        for d in &u.queue {
            requeue(u, d).map_err(|e| {
                err(
                    u,
                    &format!("requeueing a datagram from {}", addr_text(&d.from)),
                    e,
                )
            })?;
        }
        let s = sock.as_raw_fd();
        if !u.peer.is_empty() {
            // SAFETY: connect reads the saved peer address bytes.
            if unsafe { libc::connect(s, u.peer.as_ptr().cast(), u.peer.len() as u32) } < 0 {
                return Err(err(u, "connect", std::io::Error::last_os_error()));
            }
        }
        set_int(
            s,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            u.opts.reuseaddr.into(),
        )
        .map_err(|e| err(u, "SO_REUSEADDR", e))?;
    }
    Ok(out)
}

/// Why a UDP socket could not be recreated.
#[derive(Debug, thiserror::Error)]
pub enum UdpError {
    #[error("UDP socket {inode}: it was not created")]
    NotCreated { inode: u64 },
    #[error("socket {inode}: dup: {source}")]
    Dup {
        inode: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("UDP socket {inode} ({local}): {what}: {source}")]
    Sys {
        inode: u64,
        local: String,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    SockOpt(#[from] SockOptError),
}

/// Sends `d` to `u`'s address from a socket bound to `d`'s sender.
fn requeue(u: &UdpSock, d: &Datagram) -> std::io::Result<()> {
    let family = d
        .from
        .get(..2)
        .map_or(u.family, |b| u16::from_ne_bytes([b[0], b[1]]) as i32);
    // SAFETY: a socket we create and own.
    let tmp = unsafe {
        let s = libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if s < 0 {
            return Err(std::io::Error::last_os_error());
        }
        OwnedFd::from_raw_fd(s)
    };
    let t = tmp.as_raw_fd();
    set_int(t, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    if family == libc::AF_INET6 {
        let _ = set_int(t, libc::IPPROTO_IPV6, libc::IPV6_FREEBIND, 1);
        let _ = set_int(t, libc::IPPROTO_IPV6, libc::IPV6_TRANSPARENT, 1);
    } else {
        let _ = set_int(t, libc::IPPROTO_IP, libc::IP_FREEBIND, 1);
        let _ = set_int(t, libc::IPPROTO_IP, libc::IP_TRANSPARENT, 1);
    }
    // SAFETY: bind/sendto read saved address bytes and the datagram, of their lengths.
    unsafe {
        if libc::bind(t, d.from.as_ptr().cast(), d.from.len() as u32) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let n = libc::sendto(
            t,
            d.data.as_ptr().cast(),
            d.data.len(),
            libc::MSG_DONTWAIT,
            u.local.as_ptr().cast(),
            u.local.len() as u32,
        );
        if n != d.data.len() as isize {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Collect, restore, collect again: the same socket (under a new inode),
    /// bound where it was, its datagrams queued with their senders.
    #[test]
    fn round_trip() {
        let me = std::process::id() as i32;
        let collect_own = |sock: &OwnedFd| {
            let copy = sock.try_clone().unwrap();
            collect(me, sock.as_raw_fd(), &copy, libc::AF_INET, libc::O_NONBLOCK).unwrap()
        };
        let receiver = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = receiver.local_addr().unwrap();
        sender.send_to(b"first", to).unwrap();
        sender.send_to(b"second", to).unwrap();
        let receiver = OwnedFd::from(receiver);
        // Both queued before the peek.
        while collect_own(&receiver).queue.len() < 2 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let saved = collect_own(&receiver);
        drop((receiver, sender));
        let mut socks = Sockets::new(vec![&saved]);
        let restored = socks.restore(&saved).unwrap();
        assert_eq!(restored.status_flags, Some(libc::O_NONBLOCK));
        let again = collect_own(&restored.fd);
        assert_eq!(
            again,
            UdpSock {
                inode: again.inode,
                ..saved
            }
        );
    }

    #[test]
    fn the_port_of_a_saved_address() {
        let mut v4 = (libc::AF_INET as u16).to_ne_bytes().to_vec();
        v4.extend_from_slice(&5353u16.to_be_bytes());
        v4.extend_from_slice(&[127, 0, 0, 1]);
        assert_eq!(port(&v4), 5353);
        assert_eq!(port(&[]), 0);
    }

    #[test]
    fn a_queue_is_peeked_whole_and_left_in_place() {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = a.local_addr().unwrap();
        for m in [b"one".as_slice(), b"two two", b""] {
            b.send_to(m, to).unwrap();
        }
        let q = peek_all(a.as_raw_fd()).unwrap();
        let data: Vec<&[u8]> = q.iter().map(|d| d.data.as_slice()).collect();
        assert_eq!(data, [b"one".as_slice(), b"two two", b""]);
        assert_eq!(addr_text(&q[0].from), b.local_addr().unwrap().to_string());
        let mut buf = [0u8; 16];
        let (n, from) = a.recv_from(&mut buf).unwrap();
        assert_eq!(
            (&buf[..n], from),
            (b"one".as_slice(), b.local_addr().unwrap())
        );
    }
}
