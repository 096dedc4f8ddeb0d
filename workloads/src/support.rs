//! Small helpers the `wl-*` workloads share: checked syscalls, fd byte I/O and
//! forking children that take part in the ready/go protocol.

use std::ffi::OsString;
use std::io;
use std::os::fd::RawFd;

/// Ends a workload whose setup failed (before `ready`): the harness reports the
/// exit and this message from the workload's stderr.
pub fn setup_failed(what: &str) -> ! {
    eprintln!("setup failed: {what}: {}", io::Error::last_os_error());
    std::process::exit(2);
}

/// Checks a libc return value during setup: negative means failure.
pub fn sys<T: Copy + PartialOrd + Default>(ret: T, what: &str) -> T {
    if ret < T::default() {
        setup_failed(what);
    }
    ret
}

/// Checks a libc return value during verification; `Err` carries errno.
pub fn try_sys<T: Copy + PartialOrd + Default>(ret: T, what: &str) -> Result<T, String> {
    if ret < T::default() {
        return Err(format!("{what}: {}", io::Error::last_os_error()));
    }
    Ok(ret)
}

/// The mode word and the remaining arguments (`wl-x --ctl DIR MODE ARGS…`).
pub fn mode(args: &[OsString]) -> (String, Vec<String>) {
    let mut it = args.iter().map(|a| a.to_string_lossy().to_string());
    let mode = it.next().unwrap_or_default();
    (mode, it.collect())
}

/// The `i`th argument as a number, or a setup failure naming it.
pub fn num_arg<T: std::str::FromStr>(args: &[String], i: usize, what: &str) -> T {
    args.get(i).and_then(|a| a.parse().ok()).unwrap_or_else(|| {
        eprintln!("usage: missing or bad argument {i}: {what}");
        std::process::exit(2)
    })
}

/// Writes all of `buf` to `fd` (a blocking fd).
pub fn write_all(fd: RawFd, mut buf: &[u8]) {
    while !buf.is_empty() {
        // SAFETY: buf is a valid slice for its length.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        if n <= 0 {
            setup_failed("write");
        }
        buf = &buf[n as usize..];
    }
}

/// Reads what `fd` holds right now, without blocking: sets O_NONBLOCK for the
/// read and restores the old flags. Returns the bytes and the error that ended
/// the read (EAGAIN normally; None at end of file).
pub fn read_available(fd: RawFd) -> (Vec<u8>, Option<io::Error>) {
    // SAFETY: fcntl on an fd we own, no memory involved.
    let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    unsafe { libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) };
    let mut out = Vec::new();
    let mut buf = vec![0u8; 65536];
    let err = loop {
        // SAFETY: buf is valid for buf.len() bytes.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            break Some(io::Error::last_os_error());
        }
        if n == 0 {
            break None;
        }
        out.extend_from_slice(&buf[..n as usize]);
    };
    // SAFETY: as above.
    unsafe { libc::fcntl(fd, libc::F_SETFL, fl) };
    (out, err)
}

/// Checks that `data` is `len` bytes of the pattern for `seed`; describes the
/// first difference otherwise.
pub fn pattern_diff(what: &str, data: &[u8], len: usize, seed: u64) -> Option<String> {
    if data.len() != len {
        return Some(format!("{what}: {} bytes, expected {len}", data.len()));
    }
    crate::first_pattern_mismatch(data, seed)
        .map(|i| format!("{what}: byte {i} differs from the pattern"))
}

/// A pattern buffer of `len` bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    crate::fill_pattern(&mut v, seed);
    v
}

/// `fcntl(F_GETFD)` / `fcntl(F_GETFL)`; -1 when the fd is not open.
pub fn fd_flags(fd: RawFd) -> (i32, i32) {
    // SAFETY: fcntl with no pointer arguments.
    unsafe {
        (
            libc::fcntl(fd, libc::F_GETFD),
            libc::fcntl(fd, libc::F_GETFL),
        )
    }
}

/// Forks a child that runs `f` and exits with its return value. Only call
/// while the workload is single-threaded.
pub fn fork_child(f: impl FnOnce() -> i32) -> libc::pid_t {
    // SAFETY: the workloads fork before starting any thread, so the child may
    // run arbitrary code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        setup_failed("fork");
    }
    if pid == 0 {
        let code = f();
        // SAFETY: _exit skips atexit handlers and stdio flushing the parent owns.
        unsafe { libc::_exit(code) };
    }
    pid
}

/// Waits for `pid` and describes how it ended: `Ok(())` for exit 0.
pub fn wait_ok(pid: libc::pid_t, who: &str) -> Result<(), String> {
    let mut st = 0;
    // SAFETY: st is a valid out pointer.
    let r = unsafe { libc::waitpid(pid, &mut st, 0) };
    if r < 0 {
        return Err(format!(
            "waitpid({who} {pid}): {}",
            io::Error::last_os_error()
        ));
    }
    if libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0 {
        Ok(())
    } else if libc::WIFEXITED(st) {
        Err(format!(
            "{who} {pid} exited {} (it found differences; see its stderr)",
            libc::WEXITSTATUS(st)
        ))
    } else {
        Err(format!("{who} {pid} ended with wait status {st:#x}"))
    }
}

/// The current thread's id.
pub fn gettid() -> libc::pid_t {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::gettid() }
}

/// One 32-bit word of each capability set, as capget(2)/capset(2) take them
/// (version 3: two of these, capabilities 0–31 and 32–63).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CapData {
    pub effective: u32,
    pub permitted: u32,
    pub inheritable: u32,
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

const CAP_V3: u32 = 0x2008_0522;

/// This thread's capability sets (capget(2)).
pub fn capget() -> [CapData; 2] {
    let mut h = CapHeader {
        version: CAP_V3,
        pid: 0,
    };
    let mut d = [CapData::default(); 2];
    // SAFETY: h and d have the layout capget(2) expects for version 3.
    unsafe { libc::syscall(libc::SYS_capget, &mut h, d.as_mut_ptr()) };
    d
}

/// Sets this thread's capability sets (capset(2)); the return value of the call.
pub fn capset(d: &[CapData; 2]) -> libc::c_long {
    let mut h = CapHeader {
        version: CAP_V3,
        pid: 0,
    };
    // SAFETY: h and d have the layout capset(2) expects for version 3.
    unsafe { libc::syscall(libc::SYS_capset, &mut h, d.as_ptr()) }
}
