//! What TCP and UDP sockets share: their addresses (raw `sockaddr_in` /
//! `sockaddr_in6` bytes, compared and printed), the socket options programs
//! rely on (collected and applied again), and small getsockopt/setsockopt
//! helpers.

use serde::{Deserialize, Serialize};

use crate::error::Error;

/// The socket options of an inet socket that programs rely on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct InetOpts {
    pub reuseaddr: bool,
    pub reuseport: bool,
    pub v6only: bool,
    pub nodelay: bool,
    pub keepalive: bool,
    pub keepidle: i32,
    pub keepintvl: i32,
    pub keepcnt: i32,
    /// SO_SNDBUF / SO_RCVBUF as getsockopt reports them (the kernel's doubled values).
    pub sndbuf: i32,
    pub rcvbuf: i32,
    /// SO_LINGER's timeout when lingering is on.
    pub linger: Option<i32>,
}

pub fn get_int(fd: i32, level: i32, name: i32) -> std::io::Result<i32> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `v`.
    let r = unsafe { libc::getsockopt(fd, level, name, (&mut v as *mut i32).cast(), &mut len) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(v)
}

pub fn set_int(fd: i32, level: i32, name: i32, v: i32) -> std::io::Result<()> {
    set_raw(fd, level, name, &v)
}

pub fn set_raw<T>(fd: i32, level: i32, name: i32, v: &T) -> std::io::Result<()> {
    // SAFETY: setsockopt reads size_of::<T>() bytes from `v`.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (v as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

pub fn ioctl_int(fd: i32, req: libc::c_ulong) -> std::io::Result<i32> {
    let mut v: libc::c_int = 0;
    // SAFETY: these ioctls write one int.
    if unsafe { libc::ioctl(fd, req as _, &mut v) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(v)
}

/// getsockname (`peer` false) or getpeername, raw bytes.
pub fn sock_name(fd: i32, peer: bool) -> std::io::Result<Vec<u8>> {
    // SAFETY: both calls write at most `len` bytes into a sockaddr_storage we own.
    unsafe {
        let mut ss: libc::sockaddr_storage = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        let p = (&mut ss as *mut libc::sockaddr_storage).cast();
        let r = if peer {
            libc::getpeername(fd, p, &mut len)
        } else {
            libc::getsockname(fd, p, &mut len)
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let len = (len as usize).min(std::mem::size_of::<libc::sockaddr_storage>());
        Ok(
            std::slice::from_raw_parts((&ss as *const libc::sockaddr_storage).cast::<u8>(), len)
                .to_vec(),
        )
    }
}

/// A saved sockaddr_in/sockaddr_in6 as text ("127.0.0.1:80", "\[::1\]:80").
pub fn addr_text(raw: &[u8]) -> String {
    let family = raw
        .get(..2)
        .map(|b| u16::from_ne_bytes([b[0], b[1]]) as i32);
    let port = raw
        .get(2..4)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
        .unwrap_or(0);
    match family {
        Some(libc::AF_INET) if raw.len() >= 8 => format!(
            "{}:{port}",
            std::net::Ipv4Addr::new(raw[4], raw[5], raw[6], raw[7])
        ),
        Some(libc::AF_INET6) if raw.len() >= 24 => {
            let a: [u8; 16] = raw[8..24].try_into().expect("16 bytes");
            format!("[{}]:{port}", std::net::Ipv6Addr::from(a))
        }
        _ => "?".into(),
    }
}

/// The same endpoint, ignoring padding and IPv6 flow info: family, port, address.
pub fn same_endpoint(a: &[u8], b: &[u8]) -> bool {
    let key = |r: &[u8]| -> Option<Vec<u8>> {
        let family = u16::from_ne_bytes([*r.first()?, *r.get(1)?]) as i32;
        let (lo, hi) = match family {
            libc::AF_INET => (4, 8),
            libc::AF_INET6 => (8, 24),
            _ => return None,
        };
        let mut k = r.get(..4)?.to_vec();
        k.extend_from_slice(r.get(lo..hi)?);
        Some(k)
    };
    matches!((key(a), key(b)), (Some(x), Some(y)) if x == y)
}

pub fn collect_opts(s: i32, family: i32) -> InetOpts {
    let get = |level, name| get_int(s, level, name).unwrap_or(0);
    let mut linger = libc::linger {
        l_onoff: 0,
        l_linger: 0,
    };
    let mut len = std::mem::size_of::<libc::linger>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `linger`.
    unsafe {
        libc::getsockopt(
            s,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&mut linger as *mut libc::linger).cast(),
            &mut len,
        )
    };
    let stream = get(libc::SOL_SOCKET, libc::SO_TYPE) == libc::SOCK_STREAM;
    InetOpts {
        reuseaddr: get(libc::SOL_SOCKET, libc::SO_REUSEADDR) != 0,
        reuseport: get(libc::SOL_SOCKET, libc::SO_REUSEPORT) != 0,
        v6only: family == libc::AF_INET6 && get(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY) != 0,
        nodelay: stream && get(libc::IPPROTO_TCP, libc::TCP_NODELAY) != 0,
        keepalive: get(libc::SOL_SOCKET, libc::SO_KEEPALIVE) != 0,
        keepidle: if stream {
            get(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE)
        } else {
            0
        },
        keepintvl: if stream {
            get(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL)
        } else {
            0
        },
        keepcnt: if stream {
            get(libc::IPPROTO_TCP, libc::TCP_KEEPCNT)
        } else {
            0
        },
        sndbuf: get(libc::SOL_SOCKET, libc::SO_SNDBUF),
        rcvbuf: get(libc::SOL_SOCKET, libc::SO_RCVBUF),
        linger: (linger.l_onoff != 0).then_some(linger.l_linger),
    }
}

/// Sets the options that a fresh socket does not already have. Buffer sizes
/// are set only when they differ from the fresh socket's (setting one turns
/// the kernel's autotuning off for it).
pub fn apply_opts(s: i32, o: &InetOpts, what: &str) -> Result<(), SockOptError> {
    let err = |name: &'static str, source: std::io::Error| SockOptError {
        socket: what.to_string(),
        name,
        source,
    };
    let stream = get_int(s, libc::SOL_SOCKET, libc::SO_TYPE).unwrap_or(0) == libc::SOCK_STREAM;
    set_int(s, libc::SOL_SOCKET, libc::SO_REUSEADDR, o.reuseaddr.into())
        .map_err(|e| err("SO_REUSEADDR", e))?;
    if o.reuseport {
        set_int(s, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1).map_err(|e| err("SO_REUSEPORT", e))?;
    }
    if o.keepalive {
        set_int(s, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1).map_err(|e| err("SO_KEEPALIVE", e))?;
    }
    if stream {
        if o.nodelay {
            set_int(s, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1)
                .map_err(|e| err("TCP_NODELAY", e))?;
        }
        for (name, opt, v) in [
            ("TCP_KEEPIDLE", libc::TCP_KEEPIDLE, o.keepidle),
            ("TCP_KEEPINTVL", libc::TCP_KEEPINTVL, o.keepintvl),
            ("TCP_KEEPCNT", libc::TCP_KEEPCNT, o.keepcnt),
        ] {
            if v > 0 && get_int(s, libc::IPPROTO_TCP, opt).ok() != Some(v) {
                set_int(s, libc::IPPROTO_TCP, opt, v).map_err(|e| err(name, e))?;
            }
        }
    }
    set_buffers(s, o).map_err(|e| err("SO_SNDBUF/SO_RCVBUF", e))?;
    if let Some(t) = o.linger {
        let l = libc::linger {
            l_onoff: 1,
            l_linger: t,
        };
        set_raw(s, libc::SOL_SOCKET, libc::SO_LINGER, &l).map_err(|e| err("SO_LINGER", e))?;
    }
    Ok(())
}

pub fn set_buffers(s: i32, o: &InetOpts) -> std::io::Result<()> {
    for (get, force, v) in [
        (libc::SO_SNDBUF, libc::SO_SNDBUFFORCE, o.sndbuf),
        (libc::SO_RCVBUF, libc::SO_RCVBUFFORCE, o.rcvbuf),
    ] {
        if v > 0 && get_int(s, libc::SOL_SOCKET, get)? != v {
            // The kernel doubles what it is given; FORCE passes the sysctl cap (we are root).
            set_int(s, libc::SOL_SOCKET, force, v / 2)?;
        }
    }
    Ok(())
}

/// The last system call's error, about `pid`.
/// An option of a restored socket that could not be set.
#[derive(Debug, thiserror::Error)]
#[error("{socket}: {name}: {source}")]
pub struct SockOptError {
    /// The socket, for messages ("UDP socket", "TCP connection A → B").
    pub socket: String,
    pub name: &'static str,
    #[source]
    pub source: std::io::Error,
}

pub fn last_err(pid: i32, what: &str) -> Error {
    Error::sys(pid, what.to_string(), nix::errno::Errno::last())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    pub(crate) fn v4(ip: [u8; 4], port: u16) -> Vec<u8> {
        let mut v = (libc::AF_INET as u16).to_ne_bytes().to_vec();
        v.extend_from_slice(&port.to_be_bytes());
        v.extend_from_slice(&ip);
        v.extend_from_slice(&[0; 8]);
        v
    }

    fn v6(ip: [u8; 16], port: u16, flow: u32) -> Vec<u8> {
        let mut v = (libc::AF_INET6 as u16).to_ne_bytes().to_vec();
        v.extend_from_slice(&port.to_be_bytes());
        v.extend_from_slice(&flow.to_ne_bytes());
        v.extend_from_slice(&ip);
        v.extend_from_slice(&0u32.to_ne_bytes());
        v
    }

    #[rstest]
    #[case(v4([127, 0, 0, 1], 8080), "127.0.0.1:8080")]
    #[case(v6(std::net::Ipv6Addr::LOCALHOST.octets(), 443, 0), "[::1]:443")]
    #[case(vec![1, 2], "?")]
    #[case(vec![], "?")]
    fn addresses_as_text(#[case] raw: Vec<u8>, #[case] text: &str) {
        assert_eq!(addr_text(&raw), text);
    }

    #[test]
    fn endpoints_compare_family_port_and_address_only() {
        let lo6 = std::net::Ipv6Addr::LOCALHOST.octets();
        assert!(same_endpoint(
            &v4([127, 0, 0, 1], 80),
            &v4([127, 0, 0, 1], 80)
        ));
        assert!(!same_endpoint(
            &v4([127, 0, 0, 1], 80),
            &v4([127, 0, 0, 1], 81)
        ));
        assert!(!same_endpoint(
            &v4([127, 0, 0, 1], 80),
            &v4([127, 0, 0, 2], 80)
        ));
        assert!(same_endpoint(&v6(lo6, 80, 0), &v6(lo6, 80, 7)));
        assert!(!same_endpoint(&v6(lo6, 80, 0), &v4([127, 0, 0, 1], 80)));
        assert!(!same_endpoint(&[], &[]));
    }
}
