//! Established TCP connections, carried with `TCP_REPAIR` (as CRIU's soccr).
//!
//! Collect puts the socket (duplicated into crest with `pidfd_getfd`) in
//! repair mode, which freezes its state without a FIN or RST: sequence
//! numbers (`TCP_QUEUE_SEQ`), both queues (peeked in repair mode), the
//! negotiated options, timestamp and window. Every socket put in repair mode
//! is remembered in the dump's [`Repaired`]: [`Repaired::leave_repair_all`] puts
//! them back before a target resumes (failed dump, `--leave-running`); after a
//! dump that kills the targets, [`Repaired::forget`] lets them close in repair
//! mode, silently.
//!
//! Restore creates every connection in repair mode first (bound to its old
//! address, its queues refilled, "connected" without a handshake), and only
//! then leaves repair mode on all: both ends of a loopback connection exist
//! before either sends its window probe.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use serde::{Deserialize, Serialize};

use crate::error::{CollectError, Error, Result};
use crate::fds::table::Opened;
use crate::net::inet::{
    addr_text, apply_opts, collect_opts, get_int, ioctl_int, last_err, same_endpoint, set_buffers,
    set_int, set_raw, sock_name, InetOpts, SockOptError,
};

const TCP_ESTABLISHED: u8 = 1;
const TCP_NO_QUEUE: i32 = 0;
const TCP_RECV_QUEUE: i32 = 1;
const TCP_SEND_QUEUE: i32 = 2;
const TCPOPT_MAXSEG: u32 = 2;
const TCPOPT_WINDOW: u32 = 3;
const TCPOPT_SACK_PERM: u32 = 4;
const TCPOPT_TIMESTAMP: u32 = 8;
const TCPI_OPT_TIMESTAMPS: u8 = 1;
const TCPI_OPT_SACK: u8 = 2;
const TCPI_OPT_WSCALE: u8 = 4;
const SIOCINQ: libc::c_ulong = 0x541B;
const SIOCOUTQ: libc::c_ulong = 0x5411;
const SIOCOUTQNSD: libc::c_ulong = 0x894B;

/// An established TCP connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpConn {
    pub inode: u64,
    pub family: i32,
    /// Our `sockaddr_in`/`sockaddr_in6`, raw.
    #[serde(with = "crate::image::hex_bytes")]
    pub local: Vec<u8>,
    /// The peer's, raw.
    #[serde(with = "crate::image::hex_bytes")]
    pub peer: Vec<u8>,
    /// Sequence number after the send queue's last byte (write_seq).
    pub send_seq: u32,
    /// Sequence number after the last byte received (rcv_nxt).
    pub recv_seq: u32,
    /// Written by the program, not yet acknowledged by the peer.
    #[serde(with = "crate::image::hex_bytes")]
    pub send_queue: Vec<u8>,
    /// How many bytes at the end of `send_queue` were never sent.
    pub unsent: u32,
    /// Received, not yet read by the program.
    #[serde(with = "crate::image::hex_bytes")]
    pub recv_queue: Vec<u8>,
    pub mss: u32,
    pub sack: bool,
    /// Window scales (ours for sending, ours for receiving), when negotiated.
    pub wscale: Option<(u8, u8)>,
    /// The TCP timestamp clock, when timestamps were negotiated.
    pub timestamp: Option<u32>,
    pub window: Option<Window>,
    pub opts: InetOpts,
    /// Status flags (O_NONBLOCK).
    pub flags: i32,
}

/// `struct tcp_repair_window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[repr(C)]
pub struct Window {
    pub snd_wl1: u32,
    pub snd_wnd: u32,
    pub max_window: u32,
    pub rcv_wnd: u32,
    pub rcv_wup: u32,
}

/// The sockets one dump put in repair mode (crest's own duplicates).
/// Dropped without [`Repaired::forget`], it takes them out of repair mode.
#[derive(Debug, Default)]
pub struct Repaired {
    sockets: Vec<OwnedFd>,
}

impl Repaired {
    /// Takes every socket this dump put in repair mode out of it again: the
    /// program carries on exactly where it was (the kernel sends a window probe).
    pub fn leave_repair_all(&mut self) {
        for s in self.sockets.drain(..) {
            if set_int(s.as_raw_fd(), libc::SOL_TCP, libc::TCP_REPAIR, 0).is_err() {
                tracing::error!(
                    "could not take a TCP socket out of repair mode: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }

    /// Drops crest's copies, leaving the sockets in repair mode: the killed
    /// targets close them without sending a FIN or RST to the peer.
    pub fn forget(&mut self) {
        self.sockets.clear();
    }
}

impl Drop for Repaired {
    fn drop(&mut self) {
        self.leave_repair_all();
    }
}

impl TcpConn {
    /// "127.0.0.1:40000 → 127.0.0.1:80", for messages.
    pub fn describe(&self) -> String {
        format!("{} → {}", addr_text(&self.local), addr_text(&self.peer))
    }

    /// Whether `other` is this connection's other end.
    pub fn is_peer_of(&self, other: &TcpConn) -> bool {
        same_endpoint(&self.local, &other.peer) && same_endpoint(&self.peer, &other.local)
    }
}

#[repr(C)]
#[derive(Default)]
struct TcpInfoHead {
    state: u8,
    ca_state: u8,
    retransmits: u8,
    probes: u8,
    backoff: u8,
    options: u8,
    /// snd_wscale in the low nibble, rcv_wscale in the high one.
    wscale: u8,
    rate_flags: u8,
}

const STATE_NAMES: [&str; 13] = [
    "?",
    "ESTABLISHED",
    "SYN_SENT",
    "SYN_RECV",
    "FIN_WAIT1",
    "FIN_WAIT2",
    "TIME_WAIT",
    "CLOSE",
    "CLOSE_WAIT",
    "LAST_ACK",
    "LISTEN",
    "CLOSING",
    "NEW_SYN_RECV",
];

fn tcp_info(s: i32) -> std::io::Result<TcpInfoHead> {
    let mut ti = TcpInfoHead::default();
    let mut len = std::mem::size_of::<TcpInfoHead>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes of struct tcp_info, whose head is TcpInfoHead.
    let r = unsafe {
        libc::getsockopt(
            s,
            libc::SOL_TCP,
            libc::TCP_INFO,
            (&mut ti as *mut TcpInfoHead).cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(ti)
}

/// Whether TCP socket `s` was never connected (state CLOSE: fresh, or bound only).
pub fn never_connected(s: i32) -> bool {
    // SAFETY: tcp_info is plain data; all zeroes is valid.
    let mut ti: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `ti`.
    let r = unsafe {
        libc::getsockopt(
            s,
            libc::SOL_TCP,
            libc::TCP_INFO,
            (&mut ti as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    // A connection that was closed or reset is CLOSE too, but it sent segments.
    r == 0 && ti.tcpi_state == 7 && ti.tcpi_segs_out == 0 && ti.tcpi_segs_in == 0
}

/// An established connection: its descriptor, local and peer addresses.
pub type Established = (i32, Vec<u8>, Vec<u8>);

/// Every established TCP connection `pid` holds, read before anything is put
/// in repair mode (see the network lock).
pub fn established_fds_of(pid: i32) -> Result<Vec<Established>> {
    let dir = format!("/proc/{pid}/fd");
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
        let Some(fd) = e
            .ok()
            .and_then(|e| e.file_name().to_str()?.parse::<i32>().ok())
        else {
            continue;
        };
        let is_socket = crate::sys::proc::readlink(pid, &format!("fd/{fd}"))
            .is_ok_and(|l| l.to_string_lossy().starts_with("socket:"));
        if !is_socket {
            continue;
        }
        let sock = crate::sys::fd::pidfd_getfd(pid, fd)?;
        let s = sock.as_raw_fd();
        let domain = get_int(s, libc::SOL_SOCKET, libc::SO_DOMAIN).unwrap_or(0);
        let ty = get_int(s, libc::SOL_SOCKET, libc::SO_TYPE).unwrap_or(0);
        if !matches!(domain, libc::AF_INET | libc::AF_INET6) || ty != libc::SOCK_STREAM {
            continue;
        }
        if tcp_info(s).is_ok_and(|ti| ti.state == TCP_ESTABLISHED) {
            if let (Ok(l), Ok(p)) = (sock_name(s, false), sock_name(s, true)) {
                out.push((fd, l, p));
            }
        }
    }
    Ok(out)
}

/// Describes connected TCP socket `fd` of `pid` (`sock` is crest's copy), or
/// says why it cannot be carried ([`NotCarried`]). Locks it first when `lock` plans to; leaves
/// it in repair mode, remembered in `repaired` (see the module comment).
pub fn collect(
    pid: i32,
    fd: i32,
    sock: &OwnedFd,
    family: i32,
    flags: i32,
    lock: &mut crate::net::netlock::Session,
    repaired: &mut Repaired,
) -> Result<TcpConn, CollectError> {
    let s = sock.as_raw_fd();
    let sys = |what: String, e: std::io::Error| {
        Error::sys(
            pid,
            format!("fd {fd}: {what}"),
            nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(0)),
        )
    };
    let ti = tcp_info(s).map_err(|e| sys("TCP_INFO".into(), e))?;
    if ti.state != TCP_ESTABLISHED {
        return Err(CollectError::not_carried(if ti.state == 7 {
            NotCarried::Unconnected
        } else {
            NotCarried::State {
                name: STATE_NAMES.get(ti.state as usize).copied().unwrap_or("?"),
            }
        }));
    }
    let local = sock_name(s, false).map_err(|e| sys("getsockname".into(), e))?;
    let peer = sock_name(s, true).map_err(|e| sys("getpeername".into(), e))?;
    let what = format!(
        "TCP connection {} → {}",
        addr_text(&local),
        addr_text(&peer)
    );
    // SAFETY: fstat writes into a stat we own.
    let inode = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(s, &mut st) < 0 {
            return Err(sys("fstat".into(), std::io::Error::last_os_error()).into());
        }
        st.st_ino
    };
    // Its peer outside the dump must not see a closed port while it is gone:
    // hold its traffic first, before its state is frozen.
    if lock.must_lock(&local, &peer) {
        let ends = format!("{} → {}", addr_text(&local), addr_text(&peer));
        lock.lock(&local, &peer, &ends).map_err(|e| {
            Error::unsupported(
                pid,
                format!(
                    "fd {fd}: {what} to a peer outside the dump: holding its traffic \
                     while it is dumped needs nf_tables ({e})"
                ),
            )
        })?;
    }
    let copy = sock
        .try_clone()
        .map_err(|e| sys("duplicating the socket".into(), e))?;
    set_int(s, libc::SOL_TCP, libc::TCP_REPAIR, 1).map_err(|e| {
        sys(
            format!("{what}: entering TCP repair mode (needs CAP_NET_ADMIN)"),
            e,
        )
    })?;
    repaired.sockets.push(copy);
    // The state may have moved between TCP_INFO and repair mode.
    let ti = tcp_info(s).map_err(|e| sys("TCP_INFO".into(), e))?;
    if ti.state != TCP_ESTABLISHED {
        return Err(CollectError::not_carried(NotCarried::Closing {
            conn: what,
        }));
    }
    let q = |req, name: &str| ioctl_int(s, req).map_err(|e| sys(format!("{what}: {name}"), e));
    let outq = q(SIOCOUTQ, "SIOCOUTQ")? as usize;
    let unsent = q(SIOCOUTQNSD, "SIOCOUTQNSD")? as u32;
    let inq = q(SIOCINQ, "SIOCINQ")? as usize;
    let mss = get_int(s, libc::SOL_TCP, libc::TCP_MAXSEG)
        .map_err(|e| sys(format!("{what}: TCP_MAXSEG"), e))? as u32;
    let timestamp = if ti.options & TCPI_OPT_TIMESTAMPS != 0 {
        Some(
            get_int(s, libc::SOL_TCP, libc::TCP_TIMESTAMP)
                .map_err(|e| sys(format!("{what}: TCP_TIMESTAMP"), e))? as u32,
        )
    } else {
        None
    };
    let mut w = Window::default();
    let mut len = std::mem::size_of::<Window>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes of struct tcp_repair_window.
    let window = (unsafe {
        libc::getsockopt(
            s,
            libc::SOL_TCP,
            libc::TCP_REPAIR_WINDOW,
            (&mut w as *mut Window).cast(),
            &mut len,
        )
    } == 0)
        .then_some(w);
    let (recv_seq, recv_queue) = peek_queue(s, TCP_RECV_QUEUE, inq)
        .map_err(|e| sys(format!("{what}: reading its receive queue"), e))?;
    let (send_seq, send_queue) = peek_queue(s, TCP_SEND_QUEUE, outq)
        .map_err(|e| sys(format!("{what}: reading its send queue"), e))?;
    let _ = set_int(s, libc::SOL_TCP, libc::TCP_REPAIR_QUEUE, TCP_NO_QUEUE);
    Ok(TcpConn {
        inode,
        family,
        local,
        peer,
        send_seq,
        recv_seq,
        send_queue,
        unsent: unsent.min(outq as u32),
        recv_queue,
        mss,
        sack: ti.options & TCPI_OPT_SACK != 0,
        wscale: (ti.options & TCPI_OPT_WSCALE != 0).then_some((ti.wscale & 0xf, ti.wscale >> 4)),
        timestamp,
        window,
        opts: collect_opts(s, family),
        flags,
    })
}

/// A TCP socket crest does not carry.
#[derive(Debug, thiserror::Error)]
pub enum NotCarried {
    #[error("an unconnected TCP socket")]
    Unconnected,
    #[error("a TCP socket in state {name} (only established connections are carried)")]
    State { name: &'static str },
    #[error("a {conn} that is closing")]
    Closing { conn: String },
    #[error("a listening TCP socket with {waiting} connection(s) waiting to be accepted")]
    Backlog { waiting: u32 },
}

/// One queue's sequence number and contents, peeked in repair mode.
fn peek_queue(s: i32, queue: i32, len: usize) -> std::io::Result<(u32, Vec<u8>)> {
    set_int(s, libc::SOL_TCP, libc::TCP_REPAIR_QUEUE, queue)?;
    let seq = get_int(s, libc::SOL_TCP, libc::TCP_QUEUE_SEQ)? as u32;
    if len == 0 {
        return Ok((seq, Vec::new()));
    }
    // One byte more than announced, to see that the queue holds exactly `len`.
    let mut buf = vec![0u8; len + 1];
    // SAFETY: recv writes at most buf.len() bytes into buf.
    let n = unsafe {
        libc::recv(
            s,
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if n as usize != len {
        return Err(std::io::Error::other(format!(
            "{n} bytes where the kernel announced {len}"
        )));
    }
    buf.truncate(len);
    Ok((seq, buf))
}

/// Writes `data` into a queue of a socket in repair mode (or, out of repair
/// mode, sends it), halving the chunk when the kernel refuses a large one.
fn send_chunked(s: i32, data: &[u8]) -> std::io::Result<()> {
    let mut off = 0;
    let mut chunk = data.len().max(1);
    while off < data.len() {
        let n = chunk.min(data.len() - off);
        // SAFETY: send reads n bytes of `data` from off.
        let r = unsafe {
            libc::send(
                s,
                data[off..].as_ptr().cast(),
                n,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if r <= 0 {
            let e = std::io::Error::last_os_error();
            if chunk > 1024 {
                chunk /= 2;
                continue;
            }
            return Err(e);
        }
        off += r as usize;
    }
    Ok(())
}

/// Builds one connection in repair mode, its queues refilled (all but the
/// never-sent part of the send queue, written once out of repair mode).
fn build(c: &TcpConn) -> std::io::Result<OwnedFd> {
    let step = |what: &'static str| {
        move |e: std::io::Error| std::io::Error::new(e.kind(), format!("{what}: {e}"))
    };
    // SAFETY: a socket we create and own from here on.
    let sock = unsafe {
        let s = libc::socket(c.family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if s < 0 {
            return Err(std::io::Error::last_os_error()).map_err(step("socket"));
        }
        OwnedFd::from_raw_fd(s)
    };
    let s = sock.as_raw_fd();
    set_int(s, libc::SOL_TCP, libc::TCP_REPAIR, 1).map_err(step("entering repair mode"))?;
    if c.family == libc::AF_INET6 {
        set_int(
            s,
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            c.opts.v6only.into(),
        )
        .map_err(step("IPV6_V6ONLY"))?;
    }
    // Before the queues: the receive queue must fit in the receive buffer.
    set_buffers(s, &c.opts).map_err(step("buffer sizes"))?;
    // SAFETY: bind/connect read the saved address bytes, of their saved length.
    if unsafe { libc::bind(s, c.local.as_ptr().cast(), c.local.len() as libc::socklen_t) } < 0 {
        return Err(std::io::Error::last_os_error()).map_err(step("bind"));
    }
    let set_seq = |queue, seq: u32| {
        set_int(s, libc::SOL_TCP, libc::TCP_REPAIR_QUEUE, queue)?;
        set_int(s, libc::SOL_TCP, libc::TCP_QUEUE_SEQ, seq as i32)
    };
    set_seq(
        TCP_RECV_QUEUE,
        c.recv_seq.wrapping_sub(c.recv_queue.len() as u32),
    )
    .map_err(step("receive sequence"))?;
    set_seq(
        TCP_SEND_QUEUE,
        c.send_seq.wrapping_sub(c.send_queue.len() as u32),
    )
    .map_err(step("send sequence"))?;
    // In repair mode connect sends nothing: the socket is simply established.
    // SAFETY: as for bind.
    if unsafe { libc::connect(s, c.peer.as_ptr().cast(), c.peer.len() as libc::socklen_t) } < 0 {
        return Err(std::io::Error::last_os_error()).map_err(step("connect"));
    }
    let mut opts: Vec<[u32; 2]> = Vec::new();
    if c.sack {
        opts.push([TCPOPT_SACK_PERM, 0]);
    }
    if let Some((snd, rcv)) = c.wscale {
        opts.push([TCPOPT_WINDOW, snd as u32 | (rcv as u32) << 16]);
    }
    if c.timestamp.is_some() {
        opts.push([TCPOPT_TIMESTAMP, 0]);
    }
    opts.push([TCPOPT_MAXSEG, c.mss]);
    // SAFETY: setsockopt reads opts.len() pairs of u32 (struct tcp_repair_opt).
    if unsafe {
        libc::setsockopt(
            s,
            libc::SOL_TCP,
            libc::TCP_REPAIR_OPTIONS,
            opts.as_ptr().cast(),
            (opts.len() * 8) as libc::socklen_t,
        )
    } < 0
    {
        return Err(std::io::Error::last_os_error()).map_err(step("TCP_REPAIR_OPTIONS"));
    }
    if let Some(ts) = c.timestamp {
        set_int(s, libc::SOL_TCP, libc::TCP_TIMESTAMP, ts as i32).map_err(step("TCP_TIMESTAMP"))?;
    }
    if !c.recv_queue.is_empty() {
        set_int(s, libc::SOL_TCP, libc::TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
            .map_err(step("receive queue"))?;
        send_chunked(s, &c.recv_queue).map_err(step("refilling the receive queue"))?;
    }
    let sent = c.send_queue.len() - (c.unsent as usize).min(c.send_queue.len());
    if sent > 0 {
        set_int(s, libc::SOL_TCP, libc::TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
            .map_err(step("send queue"))?;
        send_chunked(s, &c.send_queue[..sent]).map_err(step("refilling the send queue"))?;
    }
    if let Some(w) = c.window {
        set_raw(s, libc::SOL_TCP, libc::TCP_REPAIR_WINDOW, &w)
            .map_err(step("TCP_REPAIR_WINDOW"))?;
    }
    set_int(s, libc::SOL_TCP, libc::TCP_REPAIR_QUEUE, TCP_NO_QUEUE).map_err(step("queue"))?;
    Ok(sock)
}

/// The established connections the restorer makes: all of them at once,
/// when the first is restored (each built in repair mode first, and only
/// then all taken out of it: both ends of a loopback connection exist
/// before either sends its window probe).
pub struct Connections<'a> {
    conns: Vec<&'a TcpConn>,
    made: Option<Vec<(u64, OwnedFd)>>,
}

impl<'a> Connections<'a> {
    /// For `conns`, every established connection of the image.
    pub fn new(conns: Vec<&'a TcpConn>) -> Connections<'a> {
        Connections { conns, made: None }
    }

    /// Connection `c`, made with all the others on first use.
    pub fn restore(&mut self, c: &TcpConn) -> Result<Opened, TcpError> {
        if self.made.is_none() {
            self.made = Some(create(&self.conns)?);
        }
        let (_, sock) = self
            .made
            .iter()
            .flatten()
            .find(|(i, _)| *i == c.inode)
            .ok_or_else(|| TcpError::NotCreated {
                conn: c.describe(),
                inode: c.inode,
            })?;
        let copy = sock.try_clone().map_err(|source| TcpError::Dup {
            inode: c.inode,
            source,
        })?;
        Ok(Opened::new(copy, Some(c.flags)))
    }
}

/// Recreates every connection of the image in the restorer: returns each
/// one's inode with its socket, out of repair mode, options set.
fn create(conns: &[&TcpConn]) -> Result<Vec<(u64, OwnedFd)>, TcpError> {
    let mut out = Vec::new();
    for c in conns {
        let sock = build(c).map_err(|source| TcpError::Build {
            conn: c.describe(),
            source,
        })?;
        out.push((c.inode, sock));
    }
    for (c, (_, sock)) in conns.iter().zip(&out) {
        let s = sock.as_raw_fd();
        let step = |what| {
            move |source| TcpError::Step {
                conn: c.describe(),
                what,
                source,
            }
        };
        set_int(s, libc::SOL_TCP, libc::TCP_REPAIR, 0).map_err(step("leaving repair mode"))?;
        let sent = c.send_queue.len() - (c.unsent as usize).min(c.send_queue.len());
        send_chunked(s, &c.send_queue[sent..]).map_err(step("sending the unsent data"))?;
        apply_opts(s, &c.opts, &format!("TCP connection {}", c.describe()))?;
    }
    Ok(out)
}

impl TcpConn {
    pub fn describe_open(&self, shared: bool, cloexec: &str) -> String {
        if shared {
            format!(
                "TCP connection {} ({} bytes to send, {} received unread{cloexec})",
                self.describe(),
                self.send_queue.len(),
                self.recv_queue.len()
            )
        } else {
            format!("TCP connection {}{cloexec}", self.describe())
        }
    }
}

/// A listening TCP socket: address, backlog and the options that matter for
/// binding. Its accept queue must be empty (pending connections are refused).
/// Also a TCP socket never connected nor listening (bound or not).
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
    /// False for a socket not listening (nor connected) yet.
    #[serde(default = "yes")]
    pub listening: bool,
}

fn yes() -> bool {
    true
}

pub fn collect_listen(
    pid: i32,
    sock: &OwnedFd,
    family: i32,
    flags: i32,
    listening: bool,
) -> Result<TcpListen, CollectError> {
    let s = sock.as_raw_fd();
    // SAFETY: fstat and getsockname write into buffers we own.
    let (inode, addr) = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(s, &mut st) < 0 {
            return Err(last_err(pid, "fstat of a socket").into());
        }
        let mut ss: libc::sockaddr_storage = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        if libc::getsockname(s, (&mut ss as *mut libc::sockaddr_storage).cast(), &mut len) < 0 {
            return Err(last_err(pid, "getsockname").into());
        }
        let bytes = std::slice::from_raw_parts(
            (&ss as *const libc::sockaddr_storage).cast::<u8>(),
            len as usize,
        )
        .to_vec();
        (st.st_ino, bytes)
    };
    let (waiting, backlog) = if listening {
        crate::sys::sockdiag::tcp_listen_queue(pid, family, inode)?
            .unwrap_or((0, libc::SOMAXCONN as u32))
    } else {
        (0, 0)
    };
    if waiting > 0 {
        return Err(CollectError::not_carried(NotCarried::Backlog { waiting }));
    }
    Ok(TcpListen {
        inode,
        family,
        addr,
        backlog: backlog as i32,
        reuseaddr: get_int(s, libc::SOL_SOCKET, libc::SO_REUSEADDR).unwrap_or(0) != 0,
        reuseport: get_int(s, libc::SOL_SOCKET, libc::SO_REUSEPORT).unwrap_or(0) != 0,
        v6only: family == libc::AF_INET6
            && get_int(s, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY).unwrap_or(0) != 0,
        nodelay: get_int(s, libc::IPPROTO_TCP, libc::TCP_NODELAY).unwrap_or(0) != 0,
        flags,
        listening,
    })
}

impl TcpListen {
    /// Recreated in the restorer, waiting until `port_deadline` for its port
    /// to become free.
    pub fn restore(&self, port_deadline: std::time::Instant) -> Result<Opened, TcpError> {
        Ok(Opened::new(
            restore_listen(self, port_deadline)?,
            Some(self.flags),
        ))
    }

    pub fn describe(&self, shared: bool, cloexec: &str) -> String {
        match (shared, self.listening) {
            (false, false) => format!("TCP socket, not connected{cloexec}"),
            (false, true) => format!("listening TCP socket, backlog {}{cloexec}", self.backlog),
            (true, false) => format!(
                "TCP socket {}, not connected (shared{cloexec})",
                addr_text(&self.addr)
            ),
            (true, true) => format!(
                "listening TCP socket {}, backlog {} (shared{cloexec})",
                addr_text(&self.addr),
                self.backlog
            ),
        }
    }
}

/// Recreates listening (or bound) socket `l`, waiting until `port_deadline`
/// for its port to become free.
fn restore_listen(l: &TcpListen, port_deadline: std::time::Instant) -> Result<OwnedFd, TcpError> {
    let set = |s: i32, level: i32, name: i32, on: bool| {
        let v: libc::c_int = on.into();
        // SAFETY: setsockopt reads one int.
        unsafe { libc::setsockopt(s, level, name, (&v as *const libc::c_int).cast(), 4) }
    };
    let err = |what: &'static str| TcpError::Listen {
        inode: l.inode,
        what,
        source: std::io::Error::last_os_error(),
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
        let port = l
            .addr
            .get(2..4)
            .map_or(0, |p| u16::from_ne_bytes([p[0], p[1]]));
        let bind = || {
            if libc::bind(s, l.addr.as_ptr().cast(), l.addr.len() as libc::socklen_t) == 0 {
                None
            } else {
                Some(nix::errno::Errno::last())
            }
        };
        let mut failed = if l.listening || port != 0 {
            bind()
        } else {
            None
        };
        if failed == Some(nix::errno::Errno::EADDRINUSE) {
            tracing::warn!(
                port = u16::from_be(port),
                "port in use (TIME_WAIT?): waiting for it to become free"
            );
            while failed == Some(nix::errno::Errno::EADDRINUSE)
                && std::time::Instant::now() < port_deadline
            {
                std::thread::sleep(std::time::Duration::from_millis(200));
                failed = bind();
            }
        }
        match failed {
            None => {}
            // A connection the process had closed lingers in TIME_WAIT on
            // this port without SO_REUSEADDR: the kernel refuses even a
            // reusing bind until it expires (60 s). Name the port.
            Some(nix::errno::Errno::EADDRINUSE) => {
                return Err(TcpError::PortInUse {
                    inode: l.inode,
                    addr: addr_text(&l.addr),
                    port: u16::from_be(port),
                })
            }
            Some(e) => {
                return Err(TcpError::Bind {
                    inode: l.inode,
                    errno: e,
                })
            }
        }
        if l.listening && libc::listen(s, l.backlog) < 0 {
            return Err(err("listen"));
        }
        set(s, libc::SOL_SOCKET, libc::SO_REUSEADDR, l.reuseaddr);
        Ok(owned)
    }
}

/// Why a TCP socket could not be recreated.
#[derive(Debug, thiserror::Error)]
pub enum TcpError {
    #[error("TCP connection {conn}: socket {inode} was not created")]
    NotCreated { conn: String, inode: u64 },
    #[error("socket {inode}: dup: {source}")]
    Dup {
        inode: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("TCP connection {conn}: {source}")]
    Build {
        conn: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TCP connection {conn}: {what}: {source}")]
    Step {
        conn: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("listening TCP socket {inode}: {what}: {source}")]
    Listen {
        inode: u64,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A connection the process had closed lingers in TIME_WAIT on the port
    /// without SO_REUSEADDR: the kernel refuses even a reusing bind until it
    /// expires (60 s).
    #[error("listening TCP socket {inode} ({addr}): port {port} is in use (by another socket, or by a connection the process had closed, in TIME_WAIT for up to 60 s: --port-wait)")]
    PortInUse { inode: u64, addr: String, port: u16 },
    #[error("listening TCP socket {inode}: bind: {errno}")]
    Bind {
        inode: u64,
        errno: nix::errno::Errno,
    },
    #[error(transparent)]
    SockOpt(#[from] SockOptError),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Collect, restore, collect again: the same listener (under a new
    /// inode), on its port, with its backlog and options.
    #[test]
    fn a_listener_round_trips() {
        let me = std::process::id() as i32;
        let collect_own = |sock: &OwnedFd| {
            collect_listen(me, sock, libc::AF_INET, libc::O_NONBLOCK, true).unwrap()
        };
        let listener = OwnedFd::from(std::net::TcpListener::bind("127.0.0.1:0").unwrap());
        set_int(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            1,
        )
        .unwrap();
        let saved = collect_own(&listener);
        assert!(saved.nodelay && saved.reuseaddr);
        drop(listener);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let restored = saved.restore(deadline).unwrap();
        assert_eq!(restored.status_flags, Some(libc::O_NONBLOCK));
        let again = collect_own(&restored.fd);
        assert_eq!(
            again,
            TcpListen {
                inode: again.inode,
                ..saved
            }
        );
    }

    fn v4(ip: [u8; 4], port: u16) -> Vec<u8> {
        let mut v = (libc::AF_INET as u16).to_ne_bytes().to_vec();
        v.extend_from_slice(&port.to_be_bytes());
        v.extend_from_slice(&ip);
        v.extend_from_slice(&[0; 8]);
        v
    }

    #[test]
    fn the_two_ends_of_a_connection_are_peers() {
        let conn = |l: Vec<u8>, p: Vec<u8>| TcpConn {
            inode: 1,
            family: libc::AF_INET,
            local: l,
            peer: p,
            send_seq: 0,
            recv_seq: 0,
            send_queue: vec![],
            unsent: 0,
            recv_queue: vec![],
            mss: 65483,
            sack: true,
            wscale: Some((7, 7)),
            timestamp: None,
            window: None,
            opts: InetOpts::default(),
            flags: 0,
        };
        let a = conn(v4([127, 0, 0, 1], 4000), v4([127, 0, 0, 1], 80));
        let b = conn(v4([127, 0, 0, 1], 80), v4([127, 0, 0, 1], 4000));
        let c = conn(v4([127, 0, 0, 1], 80), v4([127, 0, 0, 1], 4001));
        assert!(a.is_peer_of(&b) && b.is_peer_of(&a));
        assert!(!a.is_peer_of(&c));
        assert_eq!(a.describe(), "127.0.0.1:4000 → 127.0.0.1:80");
        let json = serde_json::to_string(&a).expect("serialises");
        assert_eq!(serde_json::from_str::<TcpConn>(&json).expect("parses"), a);
    }
}
