//! Sockets: unix socketpairs with queued data, listening unix sockets, TCP over
//! 127.0.0.1 (listening and established with queued data), UDP.
//!
//! `wl-sock --ctl DIR MODE [KIND]`, MODE one of: pair stream|dgram|seqpacket,
//! listen path|abstract, tcp-listen, tcp-established, udp, scm [keep], pair-stdin,
//! tcp-external (the dumped end of a connection to a `tcp-peer` outside the
//! dump, started by the harness: see [`tcp_peer`]).

use crest_workloads::support::{
    fork_child, mode, pattern, pattern_diff, read_available, sys, wait_ok, write_all,
};
use crest_workloads::{Checks, Ctl};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

const SEED: u64 = 0x50c;

fn main() {
    let (ctl, args) = Ctl::from_args();
    let (mode, args) = mode(&args);
    let kind = args.first().cloned().unwrap_or_default();
    let mut c = Checks::new();
    match mode.as_str() {
        "pair" => pair(&ctl, &mut c, &kind),
        "listen" => listen(&ctl, &mut c, &kind),
        "tcp-listen" => {
            let l =
                TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| fail(&format!("bind: {e}")));
            let addr = l.local_addr().unwrap_or_else(|e| fail(&format!("{e}")));
            ctl.ready();
            ctl.wait_for_go();
            c.eq("listening address", l.local_addr().ok(), Some(addr));
            match connect_and_accept(&l, addr) {
                Ok(()) => {}
                Err(e) => c.fail(format!("a new connection to {addr}: {e}")),
            }
        }
        "tcp-established" => tcp_established(&ctl, &mut c),
        "tcp-external" => tcp_external(&ctl, &mut c),
        "tcp-peer" => tcp_peer(&ctl, &mut c),
        "scm" => scm(&ctl, &mut c, kind == "keep"),
        "pair-stdin" => pair_stdin(&ctl, &mut c),
        "udp" => {
            let a = UdpSocket::bind("127.0.0.1:0").unwrap_or_else(|e| fail(&format!("bind: {e}")));
            let b = UdpSocket::bind("127.0.0.1:0").unwrap_or_else(|e| fail(&format!("bind: {e}")));
            let (aa, ba) = (a.local_addr().ok(), b.local_addr().ok());
            b.send_to(b"queued datagram", aa.unwrap_or_else(|| fail("no address")))
                .unwrap_or_else(|e| fail(&format!("send_to: {e}")));
            // b is also connected to a (a connected UDP socket keeps its peer).
            b.connect(aa.unwrap_or_else(|| fail("no address")))
                .unwrap_or_else(|e| fail(&format!("connect: {e}")));
            ctl.ready();
            ctl.wait_for_go();
            c.eq("a's address", a.local_addr().ok(), aa);
            c.eq("b's address", b.local_addr().ok(), ba);
            c.eq("b's peer", b.peer_addr().ok(), aa);
            let _ = a.set_read_timeout(Some(Duration::from_millis(500)));
            let mut buf = [0u8; 64];
            match a.recv_from(&mut buf) {
                Ok((n, from)) => {
                    c.eq("queued datagram", &buf[..n], b"queued datagram".as_slice());
                    c.eq("its sender", Some(from), ba);
                }
                Err(e) => c.fail(format!("the queued datagram is gone: {e}")),
            }
            let ok = b.send(b"new").is_ok() && a.recv_from(&mut buf).is_ok();
            c.check(ok, || "a datagram sent after restore did not arrive".into());
        }
        other => {
            eprintln!("wl-sock: unknown mode {other:?}");
            std::process::exit(2);
        }
    }
    ctl.finish(&c.into_differences());
}

fn fail(what: &str) -> ! {
    eprintln!("setup failed: {what}");
    std::process::exit(2);
}

fn connect_and_accept(l: &TcpListener, addr: SocketAddr) -> std::io::Result<()> {
    let mut cl = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    let (mut sv, _) = l.accept()?;
    cl.write_all(b"ping")?;
    let mut b = [0u8; 4];
    sv.set_read_timeout(Some(Duration::from_secs(2)))?;
    sv.read_exact(&mut b)?;
    if &b != b"ping" {
        return Err(std::io::Error::other("wrong bytes"));
    }
    Ok(())
}

fn sock_type(fd: RawFd) -> i32 {
    let mut t: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: t and len are valid out pointers of the right size.
    unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&mut t as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    t
}

/// Receives whole messages until EAGAIN.
fn recv_messages(fd: RawFd) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 65536];
    loop {
        // SAFETY: buf is valid for its length.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n < 0 {
            break;
        }
        out.push(buf[..n as usize].to_vec());
        if n == 0 {
            break;
        }
    }
    out
}

fn pair(ctl: &Ctl, c: &mut Checks, kind: &str) {
    let ty = match kind {
        "stream" => libc::SOCK_STREAM,
        "dgram" => libc::SOCK_DGRAM,
        "seqpacket" => libc::SOCK_SEQPACKET,
        _ => fail("pair needs stream, dgram or seqpacket"),
    };
    let mut sv = [0; 2];
    // SAFETY: sv is valid for two ints.
    sys(
        unsafe { libc::socketpair(libc::AF_UNIX, ty, 0, sv.as_mut_ptr()) },
        "socketpair",
    );
    let (a, b) = (sv[0], sv[1]);
    let big = pattern(3000, SEED);
    for m in [b"first".as_slice(), b"second message", &big] {
        write_all(a, m);
    }
    write_all(b, b"reply");
    ctl.ready();
    ctl.wait_for_go();
    c.eq("socket type", (sock_type(a), sock_type(b)), (ty, ty));
    if ty == libc::SOCK_STREAM {
        let (got, _) = read_available(b);
        let mut want = b"firstsecond message".to_vec();
        want.extend_from_slice(&big);
        c.check(got == want, || {
            format!(
                "stream a→b: {} bytes queued, expected {} with the pattern",
                got.len(),
                want.len()
            )
        });
        let (back, _) = read_available(a);
        c.eq("stream b→a", back, b"reply".to_vec());
    } else {
        let got = recv_messages(b);
        let lens: Vec<usize> = got.iter().map(Vec::len).collect();
        c.eq(
            "message lengths a→b (boundaries kept)",
            lens,
            vec![5, 14, 3000],
        );
        if let Some(d) = got
            .get(2)
            .and_then(|m| pattern_diff("third message", m, 3000, SEED))
        {
            c.fail(d);
        }
        c.eq("messages b→a", recv_messages(a), vec![b"reply".to_vec()]);
    }
    write_all(a, b"more");
    let (more, _) = read_available(b);
    c.eq("data sent after restore", more, b"more".to_vec());
}

/// An fd in flight: sent with SCM_RIGHTS, not yet received, its own copy closed.
/// An fd in flight: a regular file (read up to offset 9, then closed by the
/// sender, or kept open with `keep`) sent with SCM_RIGHTS on a stream pair,
/// between plain bytes queued before and after it; none of it received
/// before the dump.
fn scm(ctl: &Ctl, c: &mut Checks, keep: bool) {
    let mut sv = [0; 2];
    // SAFETY: sv is valid for two ints.
    sys(
        unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, sv.as_mut_ptr()) },
        "socketpair",
    );
    let path = ctl.path("passed");
    std::fs::write(&path, b"contents of the passed file").unwrap_or_else(|_| fail("write"));
    let mut f = std::fs::File::open(&path).unwrap_or_else(|_| fail("open"));
    let mut skip = [0u8; 9];
    f.read_exact(&mut skip).unwrap_or_else(|_| fail("read"));
    let fd = f.as_raw_fd();
    write_all(sv[0], b"before");
    let mut data = *b"x";
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<i32>() as u32) } as usize;
    let mut cbuf = vec![0u8; space];
    // SAFETY: msg points at live buffers; the cmsg header is written inside cbuf.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space;
        let cm = libc::CMSG_FIRSTHDR(&msg);
        (*cm).cmsg_level = libc::SOL_SOCKET;
        (*cm).cmsg_type = libc::SCM_RIGHTS;
        (*cm).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<i32>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cm).cast::<i32>(), fd);
        sys(libc::sendmsg(sv[0], &msg, 0), "sendmsg");
    }
    write_all(sv[0], b"after");
    let _kept = keep.then_some(f);
    ctl.ready();
    ctl.wait_for_go();
    // A stream read glues the bytes before the file's message to it and stops
    // there: "beforex" with the fd, then "after".
    let mut buf = [0u8; 64];
    let mut cbuf = vec![0u8; space];
    // SAFETY: as above, receiving into live buffers.
    let (n, got) = unsafe {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space;
        let n = libc::recvmsg(sv[1], &mut msg, libc::MSG_DONTWAIT);
        let cm = libc::CMSG_FIRSTHDR(&msg);
        let fd = (n > 0 && !cm.is_null() && (*cm).cmsg_type == libc::SCM_RIGHTS)
            .then(|| std::ptr::read_unaligned(libc::CMSG_DATA(cm).cast::<i32>()));
        (n, fd)
    };
    c.eq(
        "bytes read with the fd",
        String::from_utf8_lossy(&buf[..n.max(0) as usize]).to_string(),
        "beforex".to_string(),
    );
    match got {
        Some(nfd) => {
            let (b, _) = crest_workloads::support::read_available(nfd);
            c.eq(
                "the rest of the passed file, from its offset",
                String::from_utf8_lossy(&b).to_string(),
                "of the passed file".to_string(),
            );
        }
        None => c.fail(format!(
            "no fd in flight after restore: {}",
            std::io::Error::last_os_error()
        )),
    }
    let (rest, _) = read_available(sv[1]);
    c.eq(
        "bytes after the fd's message",
        String::from_utf8_lossy(&rest).to_string(),
        "after".to_string(),
    );
}

fn listen(ctl: &Ctl, c: &mut Checks, kind: &str) {
    use std::os::linux::net::SocketAddrExt;
    let addr = match kind {
        "path" => std::os::unix::net::SocketAddr::from_pathname(ctl.path("listen.sock")),
        "abstract" => std::os::unix::net::SocketAddr::from_abstract_name(format!(
            "crest-wl-{}",
            std::process::id()
        )),
        _ => fail("listen needs path or abstract"),
    }
    .unwrap_or_else(|e| fail(&format!("address: {e}")));
    let l = UnixListener::bind_addr(&addr).unwrap_or_else(|e| fail(&format!("bind: {e}")));
    // A connection accepted before the dump, with data queued both ways: its
    // server end shares the listener's name, its client end has it as peer.
    let mut cl = UnixStream::connect_addr(&addr).unwrap_or_else(|e| fail(&format!("connect: {e}")));
    let (mut sv, _) = l.accept().unwrap_or_else(|e| fail(&format!("accept: {e}")));
    cl.write_all(b"queued by the client")
        .unwrap_or_else(|e| fail(&format!("write: {e}")));
    sv.write_all(b"queued by the server")
        .unwrap_or_else(|e| fail(&format!("write: {e}")));
    ctl.ready();
    ctl.wait_for_go();
    let names = |a: std::io::Result<std::os::unix::net::SocketAddr>| {
        a.ok().map(|a| {
            (
                a.as_pathname().map(|p| p.to_path_buf()),
                a.as_abstract_name().map(|n| n.to_vec()),
            )
        })
    };
    let want = Some((
        addr.as_pathname().map(|p| p.to_path_buf()),
        addr.as_abstract_name().map(|n| n.to_vec()),
    ));
    c.eq("accepted end's name", names(sv.local_addr()), want.clone());
    c.eq("client's peer name", names(cl.peer_addr()), want);
    for (s, what, want) in [
        (&mut sv, "client→server", b"queued by the client"),
        (&mut cl, "server→client", b"queued by the server"),
    ] {
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let mut b = [0u8; 20];
        match s.read_exact(&mut b) {
            Ok(()) => c.eq(what, &b, want),
            Err(e) => c.fail(format!("{what}: {e}")),
        }
    }
    let now = l.local_addr().ok();
    let same = match (kind, &now) {
        ("path", Some(a)) => a.as_pathname() == addr.as_pathname(),
        (_, Some(a)) => a.as_abstract_name() == addr.as_abstract_name(),
        _ => false,
    };
    c.check(same, || {
        format!("listening address {now:?}, expected {addr:?}")
    });
    let r = UnixStream::connect_addr(&addr).and_then(|mut cl| {
        let (mut sv, _) = l.accept()?;
        cl.write_all(b"ping")?;
        let mut b = [0u8; 4];
        sv.read_exact(&mut b)?;
        Ok(b)
    });
    match r {
        Ok(b) => c.eq("bytes over a new connection", &b, b"ping"),
        Err(e) => c.fail(format!("a new connection to the listener: {e}")),
    }
    let _ = l.as_raw_fd();
}

fn tcp_established(ctl: &Ctl, c: &mut Checks) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| fail(&format!("bind: {e}")));
    let addr = l.local_addr().unwrap_or_else(|e| fail(&format!("{e}")));
    let mut cl = TcpStream::connect(addr).unwrap_or_else(|e| fail(&format!("connect: {e}")));
    let (mut sv, _) = l.accept().unwrap_or_else(|e| fail(&format!("accept: {e}")));
    // The client writes until its send queue is full too (non-blocking), so
    // both the server's receive queue and the client's unsent data are carried.
    let mut up = pattern(6 << 20, SEED);
    let down = pattern(5000, SEED + 1);
    cl.set_nonblocking(true)
        .unwrap_or_else(|e| fail(&format!("O_NONBLOCK: {e}")));
    cl.set_nodelay(true)
        .unwrap_or_else(|e| fail(&format!("TCP_NODELAY: {e}")));
    let mut sent = 0;
    while sent < up.len() {
        match cl.write(&up[sent..]) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // Let the kernel move what it can into the server's queue, then top up.
                std::thread::sleep(Duration::from_millis(20));
                match cl.write(&up[sent..]) {
                    Ok(n) => sent += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => fail(&format!("write: {e}")),
                }
            }
            Err(e) => fail(&format!("write: {e}")),
        }
    }
    up.truncate(sent);
    sv.write_all(&down)
        .unwrap_or_else(|e| fail(&format!("write: {e}")));
    let ends = (
        cl.local_addr().ok(),
        cl.peer_addr().ok(),
        sv.local_addr().ok(),
        sv.peer_addr().ok(),
    );
    // Let the data reach the receive queues before the dump.
    std::thread::sleep(Duration::from_millis(100));
    ctl.ready();
    ctl.wait_for_go();
    c.eq(
        "connection addresses",
        (
            cl.local_addr().ok(),
            cl.peer_addr().ok(),
            sv.local_addr().ok(),
            sv.peer_addr().ok(),
        ),
        ends,
    );
    c.eq("client TCP_NODELAY", cl.nodelay().ok(), Some(true));
    // SAFETY: fcntl with no pointer arguments.
    let fl = unsafe { libc::fcntl(cl.as_raw_fd(), libc::F_GETFL) };
    c.check(fl >= 0 && fl & libc::O_NONBLOCK != 0, || {
        "the client lost O_NONBLOCK".into()
    });
    let _ = cl.set_nonblocking(false);
    for (s, want, what) in [
        (&mut sv, &up, "client→server"),
        (&mut cl, &down, "server→client"),
    ] {
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let mut got = vec![0u8; want.len()];
        match s.read_exact(&mut got) {
            Ok(()) => c.check(&got == want, || format!("{what}: queued data differs")),
            Err(e) => c.fail(format!(
                "{what}: reading the queued {} bytes: {e}",
                want.len()
            )),
        }
    }
    let ok = cl.write_all(b"after").is_ok() && {
        let mut b = [0u8; 5];
        sv.read_exact(&mut b).is_ok() && &b == b"after"
    };
    c.check(ok, || "bytes sent after restore did not arrive".into());
    c.check(connect_and_accept(&l, addr).is_ok(), || {
        "the listener no longer accepts".into()
    });
}

/// Byte `i` of the numbered stream a `tcp-peer` sends: u64 counters, little-endian.
fn stream_byte(i: u64) -> u8 {
    (i / 8).to_le_bytes()[(i % 8) as usize]
}

/// The offset of the first byte of `data` (stream offset `at`) that is not
/// the numbered stream's.
fn stream_mismatch(data: &[u8], at: u64) -> Option<u64> {
    data.iter()
        .enumerate()
        .find(|(i, &b)| b != stream_byte(at + *i as u64))
        .map(|(i, _)| at + i as u64)
}

/// The dumped end: connects to the `tcp-peer` whose port the harness wrote
/// to `peer-port`, then echoes the numbered stream back until the peer shuts
/// its side down, checking that no byte was lost, duplicated or reordered.
fn tcp_external(ctl: &Ctl, c: &mut Checks) {
    let port: u16 = std::fs::read_to_string(ctl.path("peer-port"))
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or_else(|| fail("no peer port in ctl/peer-port"));
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .unwrap_or_else(|e| fail(&format!("connect to the peer: {e}")));
    let _ = s.set_nodelay(true);
    let ends = (s.local_addr().ok(), s.peer_addr().ok());
    ctl.ready();
    let mut got: u64 = 0;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if let Some(at) = stream_mismatch(&buf[..n], got) {
                    c.fail(format!("peer→us: byte {at} is not the stream's"));
                    break;
                }
                got += n as u64;
                if let Err(e) = s.write_all(&buf[..n]) {
                    c.fail(format!("echoing at byte {got}: {e}"));
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                c.fail(format!("reading from the peer at byte {got}: {e}"));
                break;
            }
        }
    }
    ctl.wait_for_go();
    c.eq(
        "connection addresses",
        (s.local_addr().ok(), s.peer_addr().ok()),
        ends,
    );
    c.check(got > 0, || "nothing came from the peer".into());
    eprintln!("tcp-external: echoed {got} bytes");
}

/// The peer outside the dump: listens on 127.0.0.1 (port in `port`), takes
/// one connection, sends the numbered stream in 4 KiB pieces and checks the
/// echo, until `go` appears; then it waits for the echo of every byte it
/// sent, shuts down its side and waits for the other's. A reset, EPIPE,
/// a wrong or missing byte, or 90 s without progress is a difference (the
/// connection was silent while dumped, so both ends' retransmission timers
/// backed off: under emulation the echo can take many seconds to resume).
fn tcp_peer(ctl: &Ctl, c: &mut Checks) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| fail(&format!("bind: {e}")));
    let port = l
        .local_addr()
        .unwrap_or_else(|e| fail(&format!("{e}")))
        .port();
    let tmp = ctl.path("port.tmp");
    std::fs::write(&tmp, format!("{port}\n"))
        .and_then(|()| std::fs::rename(&tmp, ctl.path("port")))
        .unwrap_or_else(|e| fail(&format!("writing the port: {e}")));
    let (s, _) = l.accept().unwrap_or_else(|e| fail(&format!("accept: {e}")));
    drop(l);
    let _ = s.set_nodelay(true);
    ctl.ready();
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut w = s.try_clone().unwrap_or_else(|e| fail(&format!("dup: {e}")));
    let writer = {
        let sent = sent.clone();
        let go = ctl.path("go");
        std::thread::spawn(move || -> Result<(), String> {
            let mut at: u64 = 0;
            let mut piece = vec![0u8; 4096];
            while !go.exists() {
                for (i, b) in piece.iter_mut().enumerate() {
                    *b = stream_byte(at + i as u64);
                }
                w.write_all(&piece)
                    .map_err(|e| format!("sending at byte {at}: {e}"))?;
                at += piece.len() as u64;
                sent.store(at, std::sync::atomic::Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok(())
        })
    };
    let mut r = s;
    let _ = r.set_read_timeout(Some(Duration::from_secs(90)));
    let mut echoed: u64 = 0;
    let mut last = std::time::Instant::now();
    let mut silence = Duration::ZERO;
    let mut buf = vec![0u8; 64 * 1024];
    let mut writer = Some(writer);
    loop {
        if let Some(h) = writer.take_if(|h| h.is_finished()) {
            match h.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    c.fail(e);
                    break;
                }
                Err(_) => {
                    c.fail("the sending thread panicked");
                    break;
                }
            }
        }
        let total = sent.load(std::sync::atomic::Ordering::SeqCst);
        if writer.is_none() && echoed == total {
            break;
        }
        match r.read(&mut buf) {
            Ok(0) => {
                c.fail(format!("the connection closed after {echoed} echoed bytes"));
                break;
            }
            Ok(n) => {
                if let Some(at) = stream_mismatch(&buf[..n], echoed) {
                    c.fail(format!("echo: byte {at} is not the one sent"));
                    break;
                }
                echoed += n as u64;
                silence = silence.max(last.elapsed());
                last = std::time::Instant::now();
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                c.fail(format!("reading the echo after {echoed} bytes: {e}"));
                break;
            }
        }
    }
    let total = sent.load(std::sync::atomic::Ordering::SeqCst);
    c.eq("bytes echoed of those sent", echoed, total);
    if r.shutdown(std::net::Shutdown::Write).is_ok() {
        match r.read(&mut buf) {
            Ok(0) => {}
            Ok(n) => c.fail(format!("{n} bytes after the echo")),
            Err(e) => c.fail(format!("waiting for the other side to close: {e}")),
        }
    }
    eprintln!(
        "tcp-peer: sent {total} bytes, {echoed} echoed, longest silence {} ms",
        silence.as_millis()
    );
}

/// A child whose stdin is one end of a socketpair its parent holds (how
/// MPICH's hydra proxy hands each rank its stdin), with a line queued on it.
fn pair_stdin(ctl: &Ctl, c: &mut Checks) {
    let mut sv = [0; 2];
    // SAFETY: sv is valid for two ints.
    sys(
        unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, sv.as_mut_ptr()) },
        "socketpair",
    );
    let child = fork_child(|| {
        // SAFETY: fds of ours; the child's stdin becomes its end of the pair.
        unsafe {
            libc::dup2(sv[1], 0);
            libc::close(sv[1]);
            libc::close(sv[0]);
        }
        // Tell the parent the pair is in place before it says ready.
        write_all(0, b"!");
        ctl.wait_for_go();
        let mut got = [0u8; 6];
        // SAFETY: got is valid for 6 bytes; fd 0 is blocking.
        let n = unsafe { libc::read(0, got.as_mut_ptr().cast(), got.len()) };
        if n != 6 || &got != b"hello\n" {
            return 1;
        }
        write_all(0, b"back\n");
        0
    });
    let mut bang = [0u8; 1];
    // SAFETY: the child has its own copy; one byte into a valid buffer.
    unsafe {
        libc::close(sv[1]);
        libc::read(sv[0], bang.as_mut_ptr().cast(), 1);
    }
    write_all(sv[0], b"hello\n");
    ctl.ready();
    ctl.wait_for_go();
    let mut got = [0u8; 5];
    // SAFETY: got is valid for 5 bytes; sv[0] is blocking.
    let n = unsafe { libc::read(sv[0], got.as_mut_ptr().cast(), got.len()) };
    c.eq(
        "the child's answer on its stdin socket",
        String::from_utf8_lossy(&got[..n.max(0) as usize]).to_string(),
        "back\n".to_string(),
    );
    if let Err(e) = wait_ok(child, "child (read hello from its stdin socket)") {
        c.fail(e);
    }
}
