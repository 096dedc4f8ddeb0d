//! sock_diag (`NETLINK_SOCK_DIAG`): what the kernel tells about a socket
//! that the socket itself does not: a unix socket's peer, name, socket file
//! and accept queue ([`unix`]); a listening TCP socket's accept queue
//! ([`tcp_listen_queue`]).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::error::{Error, Result};

fn last_err(pid: i32, what: &str) -> Error {
    Error::sys(pid, what.to_string(), nix::errno::Errno::last())
}

/// What sock_diag tells about a unix socket.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct UnixDiag {
    /// The peer's inode (0: none).
    pub peer: u64,
    /// `sun_path` as bound (empty: unnamed; a leading NUL: abstract).
    pub name: Vec<u8>,
    /// The inode of the socket file it is bound to.
    pub vfs_ino: Option<u64>,
    /// Listening: connections waiting to be accepted, and the backlog.
    pub rqlen: Option<(u32, u32)>,
}

/// Parses the attributes that follow a `unix_diag_msg`.
fn parse_unix_attrs(mut b: &[u8]) -> UnixDiag {
    const UNIX_DIAG_NAME: u16 = 0;
    const UNIX_DIAG_VFS: u16 = 1;
    const UNIX_DIAG_PEER: u16 = 2;
    const UNIX_DIAG_RQLEN: u16 = 4;
    let u32_at = |b: &[u8], i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let mut d = UnixDiag::default();
    while b.len() >= 4 {
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let ty = u16::from_ne_bytes([b[2], b[3]]);
        if len < 4 || len > b.len() {
            break;
        }
        let v = &b[4..len];
        match ty {
            UNIX_DIAG_PEER if v.len() >= 4 => d.peer = u32_at(v, 0) as u64,
            UNIX_DIAG_NAME => d.name = v.to_vec(),
            UNIX_DIAG_VFS if v.len() >= 8 => d.vfs_ino = Some(u32_at(v, 0) as u64),
            UNIX_DIAG_RQLEN if v.len() >= 8 => d.rqlen = Some((u32_at(v, 0), u32_at(v, 4))),
            _ => {}
        }
        b = &b[((len + 3) & !3).min(b.len())..];
    }
    d
}

/// sock_diag's view of unix socket `inode` (`pid`: the process holding
/// it, for errors).
pub fn unix(pid: i32, inode: u64) -> Result<UnixDiag> {
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const UDIAG_SHOW_NAME: u32 = 0x1;
    const UDIAG_SHOW_VFS: u32 = 0x2;
    const UDIAG_SHOW_PEER: u32 = 0x4;
    const UDIAG_SHOW_RQLEN: u32 = 0x10;
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
        show: UDIAG_SHOW_PEER | UDIAG_SHOW_NAME | UDIAG_SHOW_VFS | UDIAG_SHOW_RQLEN,
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
            return Err(last_err(pid, "sock_diag socket"));
        }
        let s = OwnedFd::from_raw_fd(s);
        if libc::send(
            s.as_raw_fd(),
            (&req as *const Req).cast(),
            std::mem::size_of::<Req>(),
            0,
        ) < 0
        {
            return Err(last_err(pid, "sock_diag send"));
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
    // nlmsghdr + unix_diag_msg, then the attributes.
    Ok(parse_unix_attrs(&buf[32..total.max(32)]))
}

/// The accept queue length and backlog of listening TCP socket `inode`
/// (of `family`), from inet_diag; `None` when it does not say.
pub fn tcp_listen_queue(pid: i32, family: i32, inode: u64) -> Result<Option<(u32, u32)>> {
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
            return Err(last_err(pid, "inet_diag socket"));
        }
        let s = OwnedFd::from_raw_fd(s);
        if libc::send(s.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) < 0 {
            return Err(last_err(pid, "inet_diag send"));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(ty: u16, v: &[u8]) -> Vec<u8> {
        let mut a = ((4 + v.len()) as u16).to_ne_bytes().to_vec();
        a.extend_from_slice(&ty.to_ne_bytes());
        a.extend_from_slice(v);
        a.resize((a.len() + 3) & !3, 0);
        a
    }

    #[test]
    fn sock_diag_attributes_are_read_whatever_their_order() {
        let mut b = attr(4, &[3, 0, 0, 0, 128, 0, 0, 0]);
        b.extend(attr(0, b"/run/x.sock"));
        b.extend(attr(2, &77u32.to_ne_bytes()));
        b.extend(attr(1, &[9, 0, 0, 0, 1, 0, 0, 0]));
        b.extend(attr(99, b"ignored"));
        let d = parse_unix_attrs(&b);
        assert_eq!(
            d,
            UnixDiag {
                peer: 77,
                name: b"/run/x.sock".to_vec(),
                vfs_ino: Some(9),
                rqlen: Some((3, 128)),
            }
        );
        assert_eq!(parse_unix_attrs(&[]), UnixDiag::default());
        // A truncated attribute ends the walk instead of reading past the buffer.
        assert_eq!(parse_unix_attrs(&[40, 0, 2, 0, 1]), UnixDiag::default());
    }
}
