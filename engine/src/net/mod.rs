//! Sockets and the network lock: unix sockets ([`unix`]), TCP listeners and
//! established connections ([`tcp`], with `TCP_REPAIR`), UDP ([`udp`]), what
//! inet sockets share ([`inet`]), and the nftables lock that holds the
//! traffic of connections to peers outside the dump ([`netlock`]).
//!
//! [`collect`] tells a socket descriptor's kind by its domain and type, once.

pub mod inet;
pub mod netlock;
pub mod tcp;
pub mod udp;
pub mod unix;

use std::os::fd::AsRawFd;

use crate::error::{CollectError, Result};
use crate::fds::table::FileId;
use crate::net::inet::get_int;

/// What collecting one dump's sockets needs from the dump.
pub struct DumpSockets<'a> {
    /// The processes of the dump: a file in flight that one of them also
    /// holds cannot be reopened apart (they would no longer share it).
    pub pids: &'a [i32],
    /// The dump's network lock, for connections to peers outside it.
    pub lock: &'a mut netlock::Session,
    /// The sockets the dump put in repair mode.
    pub repaired: &'a mut tcp::Repaired,
}

/// A socket crest can carry.
pub enum Socket {
    UnixPair(unix::UnixEnd),
    UnixListen(unix::UnixListen),
    TcpListen(tcp::TcpListen),
    TcpConn(tcp::TcpConn),
    Udp(udp::UdpSock),
}

/// Describes socket `fd` of `pid` (opened with status `flags`), or says why
/// crest cannot carry it ("a netlink socket"…). Regular files in
/// flight on a unix socket become open files through `in_flight`.
pub fn collect(
    pid: i32,
    fd: i32,
    flags: i32,
    cx: &mut DumpSockets,
    in_flight: &mut dyn FnMut(unix::PassedFile) -> FileId,
) -> Result<Socket, CollectError> {
    let sock = crate::sys::fd::pidfd_getfd(pid, fd)?;
    let s = sock.as_raw_fd();
    let domain = get_int(s, libc::SOL_SOCKET, libc::SO_DOMAIN).unwrap_or(0);
    let ty = get_int(s, libc::SOL_SOCKET, libc::SO_TYPE).unwrap_or(0);
    Ok(match domain {
        libc::AF_UNIX => match unix::collect(pid, fd, &sock, ty, flags, cx.pids, in_flight)? {
            unix::Socket::Pair(end) => Socket::UnixPair(end),
            unix::Socket::Listen(l) => Socket::UnixListen(l),
        },
        libc::AF_INET | libc::AF_INET6 if ty == libc::SOCK_STREAM => {
            let listening = get_int(s, libc::SOL_SOCKET, libc::SO_ACCEPTCONN).unwrap_or(0) != 0;
            if !listening && !tcp::never_connected(s) {
                Socket::TcpConn(tcp::collect(
                    pid,
                    fd,
                    &sock,
                    domain,
                    flags,
                    cx.lock,
                    cx.repaired,
                )?)
            } else {
                Socket::TcpListen(tcp::collect_listen(pid, &sock, domain, flags, listening)?)
            }
        }
        libc::AF_INET | libc::AF_INET6 if ty == libc::SOCK_DGRAM => {
            Socket::Udp(udp::collect(pid, fd, &sock, domain, flags)?)
        }
        libc::AF_NETLINK => return Err(CollectError::not_carried(NotCarried::Netlink)),
        family => {
            return Err(CollectError::not_carried(NotCarried::Family {
                family,
                ty: unix::type_name(ty),
            }))
        }
    })
}

/// A socket of a family crest does not carry.
#[derive(Debug, thiserror::Error)]
pub enum NotCarried {
    #[error("a netlink socket")]
    Netlink,
    #[error("a socket (family {family}, {ty})")]
    Family { family: i32, ty: &'static str },
}
