//! Thin wrappers over the few system calls the library needs.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

/// `futex(FUTEX_WAIT_PRIVATE)`: sleeps while `*word == val`, at most `timeout`.
/// Spurious returns (EINTR, EAGAIN, timeout) are the caller's loop's business.
pub fn futex_wait(word: &AtomicU32, val: u32, timeout: Option<Duration>) {
    let ts = timeout.map(|d| libc::timespec {
        tv_sec: d.as_secs() as libc::time_t,
        tv_nsec: d.subsec_nanos() as libc::c_long,
    });
    let tp = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: word is a live, aligned u32 the kernel only reads; tp is null or
    // points to a timespec that outlives the call.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
            val,
            tp,
        );
    }
}

/// `futex(FUTEX_WAKE_PRIVATE)`: wakes every waiter on `word`.
pub fn futex_wake(word: &AtomicU32) {
    // SAFETY: word is a live, aligned u32; FUTEX_WAKE does not touch memory.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
            i32::MAX,
        );
    }
}

pub fn gettid() -> i32 {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::gettid() }
}

pub fn getpid() -> i32 {
    // SAFETY: getpid has no arguments and cannot fail.
    unsafe { libc::getpid() }
}

pub fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Whether `pid` still exists (a zombie counts as alive until reaped). Only
/// kill(0): opening /proc/PID/stat here could leave a file open at the very
/// moment crest freezes the process, and the image would hold it.
pub fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence and permission.
    unsafe { libc::kill(pid, 0) == 0 || errno() != libc::ESRCH }
}

/// `tgkill(getpid(), tid, sig)`.
pub fn tgkill(tid: i32, sig: i32) -> bool {
    // SAFETY: tgkill has no memory effects.
    unsafe { libc::syscall(libc::SYS_tgkill, getpid(), tid, sig) == 0 }
}

pub fn close(fd: RawFd) {
    // SAFETY: the caller owns fd and does not use it afterwards.
    unsafe { libc::close(fd) };
}

/// The abstract unix socket address `@NAME`.
fn abstract_addr(name: &str) -> (libc::sockaddr_un, libc::socklen_t) {
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = name.as_bytes();
    let n = bytes.len().min(addr.sun_path.len() - 1);
    for (d, s) in addr.sun_path[1..=n].iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + 1 + n;
    (addr, len as libc::socklen_t)
}

/// A listening stream socket bound to the abstract name `@NAME`.
pub fn listen_abstract(name: &str) -> io::Result<RawFd> {
    // SAFETY: socket has no memory arguments.
    // Non-blocking: the control thread waits in poll(), not in accept(), which
    // would hold the lowest free fd number reserved while it waits.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let (addr, len) = abstract_addr(name);
    // SAFETY: addr is a valid sockaddr_un of at least len bytes.
    let r = unsafe { libc::bind(fd, &addr as *const _ as *const libc::sockaddr, len) };
    // SAFETY: listen has no memory arguments.
    if r != 0 || unsafe { libc::listen(fd, 8) } != 0 {
        let e = io::Error::last_os_error();
        close(fd);
        return Err(e);
    }
    Ok(fd)
}

/// The peer's (pid, uid) of a connected unix socket.
pub fn peer_cred(fd: RawFd) -> Option<(i32, u32)> {
    // SAFETY: ucred is plain data.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: cred and len are valid for writing sizeof(ucred) bytes.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut _ as *mut libc::c_void,
            &mut len,
        )
    };
    (r == 0).then_some((cred.pid, cred.uid))
}

/// Polls one fd; returns its revents (0 on timeout).
pub fn poll1(fd: RawFd, events: i16, timeout: Duration) -> i16 {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: p is one valid pollfd.
    let r = unsafe { libc::poll(&mut p, 1, timeout.as_millis() as libc::c_int) };
    if r > 0 {
        p.revents
    } else {
        0
    }
}

/// Writes all of `data` (the peer reads lines; short writes are not expected
/// on a unix stream socket, but are handled).
pub fn send_all(fd: RawFd, mut data: &[u8]) -> bool {
    while !data.is_empty() {
        // SAFETY: data is valid for data.len() bytes.
        let n = unsafe {
            libc::send(
                fd,
                data.as_ptr() as *const libc::c_void,
                data.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 && errno() == libc::EINTR {
            continue;
        }
        if n <= 0 {
            return false;
        }
        data = &data[n as usize..];
    }
    true
}

/// Reads one line (without its newline) within `timeout`; None on EOF,
/// error or timeout.
pub fn read_line(fd: RawFd, timeout: Duration) -> Option<String> {
    let until = std::time::Instant::now() + timeout;
    let mut line = Vec::new();
    loop {
        let left = until.checked_duration_since(std::time::Instant::now())?;
        if poll1(fd, libc::POLLIN, left.min(Duration::from_millis(200))) == 0 {
            continue;
        }
        let mut b = 0u8;
        // SAFETY: b is one writable byte.
        let n = unsafe { libc::read(fd, &mut b as *mut u8 as *mut libc::c_void, 1) };
        if n < 0 && errno() == libc::EINTR {
            continue;
        }
        if n <= 0 {
            return None;
        }
        if b == b'\n' {
            return Some(String::from_utf8_lossy(&line).into_owned());
        }
        line.push(b);
        if line.len() > 4096 {
            return None;
        }
    }
}
