//! File descriptors: regular files, dup'd and close-on-exec fds, unlinked
//! files, directories, devices, eventfd, epoll, signalfd, ptys.
//!
//! `wl-fd --ctl DIR MODE`, MODE one of: regfile, dup, cloexec, unlinked, dir,
//! dev, eventfd, epoll, epoll-nested, signalfd, pty, lock, inotify, tty.

use crest_workloads::support::{
    fd_flags, mode, pattern, pattern_diff, read_available, setup_failed, sys, write_all,
};
use crest_workloads::{Checks, Ctl};
use std::ffi::{CStr, CString};
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

const SEED: u64 = 0x51de;

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap_or_default()
}

fn open(p: &Path, flags: i32) -> RawFd {
    let cp = cpath(p);
    // SAFETY: cp is NUL-terminated.
    sys(
        unsafe { libc::open(cp.as_ptr(), flags, 0o644) },
        &format!("open {}", p.display()),
    )
}

fn offset(fd: RawFd) -> i64 {
    // SAFETY: lseek with plain values.
    unsafe { libc::lseek(fd, 0, libc::SEEK_CUR) }
}

fn pread(fd: RawFd, len: usize, at: i64) -> Vec<u8> {
    let mut b = vec![0u8; len];
    // SAFETY: b is valid for len bytes.
    let n = unsafe { libc::pread(fd, b.as_mut_ptr().cast(), len, at) };
    b.truncate(n.max(0) as usize);
    b
}

fn main() {
    let (ctl, args) = Ctl::from_args();
    let (mode, _) = mode(&args);
    let mut c = Checks::new();
    match mode.as_str() {
        "regfile" => {
            let data = ctl.path("data");
            std::fs::write(&data, pattern(10_000, SEED))
                .unwrap_or_else(|_| setup_failed("write data"));
            let rw = open(&data, libc::O_RDWR);
            let ro = open(&data, libc::O_RDONLY);
            let log = open(
                &ctl.path("log"),
                libc::O_WRONLY | libc::O_CREAT | libc::O_APPEND,
            );
            // SAFETY: lseek with plain values.
            unsafe {
                libc::lseek(rw, 1234, libc::SEEK_SET);
                libc::lseek(ro, 5000, libc::SEEK_SET);
            }
            write_all(log, b"before\n");
            ctl.ready();
            ctl.wait_for_go();
            c.eq("rw offset", offset(rw), 1234);
            c.eq("ro offset", offset(ro), 5000);
            c.eq(
                "rw access mode",
                fd_flags(rw).1 & libc::O_ACCMODE,
                libc::O_RDWR,
            );
            c.eq(
                "ro access mode",
                fd_flags(ro).1 & libc::O_ACCMODE,
                libc::O_RDONLY,
            );
            c.eq(
                "log flags",
                fd_flags(log).1 & (libc::O_ACCMODE | libc::O_APPEND),
                libc::O_WRONLY | libc::O_APPEND,
            );
            let mut b = [0u8; 16];
            // SAFETY: b is valid for 16 bytes.
            let n = unsafe { libc::read(ro, b.as_mut_ptr().cast(), 16) };
            c.eq("bytes read at 5000", n, 16);
            c.check(b.as_slice() == &pattern(5016, SEED)[5000..], || {
                "data at offset 5000 differs".into()
            });
            write_all(log, b"after\n");
            c.eq(
                "log contents",
                std::fs::read_to_string(ctl.path("log")).ok().as_deref(),
                Some("before\nafter\n"),
            );
        }
        "dup" => {
            let fd = open(&ctl.path("data"), libc::O_RDWR | libc::O_CREAT);
            write_all(fd, &pattern(4096, SEED));
            // SAFETY: dup/dup2/lseek with plain values.
            let (d1, d2) = unsafe { (sys(libc::dup2(fd, 100), "dup2"), sys(libc::dup(fd), "dup")) };
            // SAFETY: as above.
            unsafe { libc::lseek(fd, 777, libc::SEEK_SET) };
            ctl.ready();
            ctl.wait_for_go();
            for d in [fd, d1, d2] {
                c.eq(&format!("offset seen through fd {d}"), offset(d), 777);
            }
            let mut b = [0u8; 10];
            // SAFETY: b is valid for 10 bytes.
            unsafe { libc::read(d1, b.as_mut_ptr().cast(), 10) };
            c.eq(
                "offset of fd after reading through its dup 100",
                offset(fd),
                787,
            );
            c.eq("offset of the other dup", offset(d2), 787);
        }
        "cloexec" => {
            let p = ctl.path("data");
            let a = open(&p, libc::O_RDONLY | libc::O_CREAT | libc::O_CLOEXEC);
            let b = open(&p, libc::O_RDONLY);
            // SAFETY: dup3/fcntl with plain values.
            let (d, e) = unsafe {
                (
                    sys(libc::dup3(a, 50, libc::O_CLOEXEC), "dup3"),
                    sys(libc::dup(a), "dup"),
                )
            };
            // SAFETY: as above.
            unsafe { libc::fcntl(e, libc::F_SETFD, libc::FD_CLOEXEC) };
            ctl.ready();
            ctl.wait_for_go();
            for (fd, want) in [(a, 1), (b, 0), (d, 1), (e, 1)] {
                c.eq(
                    &format!("FD_CLOEXEC of fd {fd}"),
                    fd_flags(fd).0 & libc::FD_CLOEXEC,
                    want,
                );
            }
        }
        "unlinked" => {
            let p = ctl.path("unlinked");
            let fd = open(&p, libc::O_RDWR | libc::O_CREAT);
            write_all(fd, &pattern(20_000, SEED));
            // SAFETY: lseek with plain values.
            unsafe { libc::lseek(fd, 3333, libc::SEEK_SET) };
            std::fs::remove_file(&p).unwrap_or_else(|_| setup_failed("unlink"));
            ctl.ready();
            ctl.wait_for_go();
            // SAFETY: st is a valid out pointer.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: as above.
            unsafe { libc::fstat(fd, &mut st) };
            c.eq("link count", st.st_nlink, 0);
            c.eq("size", st.st_size, 20_000);
            c.eq("offset", offset(fd), 3333);
            if let Some(d) = pattern_diff("contents", &pread(fd, 20_000, 0), 20_000, SEED) {
                c.fail(d);
            }
            c.check(!p.exists(), || {
                "the unlinked file reappeared at its path".into()
            });
        }
        "dir" => dir(&ctl, &mut c),
        "dev" => {
            let null = open(Path::new("/dev/null"), libc::O_WRONLY);
            let zero = open(Path::new("/dev/zero"), libc::O_RDONLY);
            let rnd = open(Path::new("/dev/urandom"), libc::O_RDONLY);
            ctl.ready();
            ctl.wait_for_go();
            for (fd, name) in [
                (null, "/dev/null"),
                (zero, "/dev/zero"),
                (rnd, "/dev/urandom"),
            ] {
                let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).ok();
                c.eq(&format!("fd {fd}"), link.as_deref(), Some(Path::new(name)));
            }
            // SAFETY: the buffers are valid for their lengths.
            unsafe {
                c.eq(
                    "write to /dev/null",
                    libc::write(null, b"x".as_ptr().cast(), 1),
                    1,
                );
                let mut z = [1u8; 64];
                libc::read(zero, z.as_mut_ptr().cast(), 64);
                c.check(z.iter().all(|&b| b == 0), || {
                    "/dev/zero read non-zero bytes".into()
                });
                let mut r = [0u8; 64];
                c.eq(
                    "read from /dev/urandom",
                    libc::read(rnd, r.as_mut_ptr().cast(), 64),
                    64,
                );
            }
            c.eq(
                "/dev/null access mode",
                fd_flags(null).1 & libc::O_ACCMODE,
                libc::O_WRONLY,
            );
        }
        "eventfd" => {
            // SAFETY: eventfd takes plain values.
            let (e, s) = unsafe {
                (
                    sys(
                        libc::eventfd(5, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC),
                        "eventfd",
                    ),
                    sys(
                        libc::eventfd(3, libc::EFD_SEMAPHORE | libc::EFD_NONBLOCK),
                        "eventfd semaphore",
                    ),
                )
            };
            write_all(e, &37u64.to_ne_bytes());
            ctl.ready();
            ctl.wait_for_go();
            c.eq(
                "eventfd flags",
                fd_flags(e),
                (libc::FD_CLOEXEC, libc::O_RDWR | libc::O_NONBLOCK),
            );
            let (v, _) = read_available(e);
            c.eq(
                "counter",
                v.get(..8)
                    .map(|b| u64::from_ne_bytes(b.try_into().unwrap_or_default())),
                Some(42),
            );
            let mut reads = 0;
            let mut b = [0u8; 8];
            // SAFETY: b is valid for 8 bytes; the fd is non-blocking.
            while unsafe { libc::read(s, b.as_mut_ptr().cast(), 8) } == 8 {
                reads += 1;
                c.eq("semaphore read", u64::from_ne_bytes(b), 1);
            }
            c.eq("semaphore reads before EAGAIN", reads, 3);
        }
        "epoll" => epoll(&ctl, &mut c),
        "epoll-nested" => epoll_nested(&ctl, &mut c),
        "signalfd" => signalfd(&ctl, &mut c),
        "pty" => pty(&ctl, &mut c),
        "lock" => lock(&ctl, &mut c),
        "tty" => tty(&ctl, &mut c),
        "inotify" => inotify(&ctl, &mut c),
        other => {
            eprintln!("wl-fd: unknown mode {other:?}");
            std::process::exit(2);
        }
    }
    ctl.finish(&c.into_differences());
}

fn dir(ctl: &Ctl, c: &mut Checks) {
    let d = ctl.path("dir");
    std::fs::create_dir_all(&d).unwrap_or_else(|_| setup_failed("mkdir"));
    for i in 0..40 {
        std::fs::write(d.join(format!("file-{i:02}")), b"x")
            .unwrap_or_else(|_| setup_failed("create"));
    }
    let read_names = |dp: *mut libc::DIR, max: usize| {
        let mut v = Vec::new();
        while v.len() < max {
            // SAFETY: dp is an open DIR stream; the entry is valid until the next readdir.
            let ent = unsafe { libc::readdir(dp) };
            if ent.is_null() {
                break;
            }
            // SAFETY: d_name is NUL-terminated.
            v.push(
                unsafe { CStr::from_ptr((*ent).d_name.as_ptr()) }
                    .to_string_lossy()
                    .to_string(),
            );
        }
        v
    };
    let cd = cpath(&d);
    // SAFETY: cd is NUL-terminated; the first stream is closed before the second is used.
    let all = unsafe {
        let dp = libc::opendir(cd.as_ptr());
        if dp.is_null() {
            setup_failed("opendir");
        }
        let all = read_names(dp, usize::MAX);
        libc::closedir(dp);
        all
    };
    // Read with getdents64 on a raw fd so the position lives in the kernel's
    // file (what the engine must carry), not in a libc buffer.
    let fd = open(&d, libc::O_RDONLY | libc::O_DIRECTORY);
    let mut buf = vec![0u8; 256];
    // SAFETY: buf is valid for its length; a small buffer returns a few entries.
    let n = unsafe { libc::syscall(libc::SYS_getdents64, fd, buf.as_mut_ptr(), buf.len()) };
    let first = dirents(&buf[..n.max(0) as usize]);
    let pos = offset(fd);
    ctl.ready();
    ctl.wait_for_go();
    c.eq("directory position", offset(fd), pos);
    let mut rest = Vec::new();
    let mut big = vec![0u8; 65536];
    loop {
        // SAFETY: big is valid for its length.
        let n = unsafe { libc::syscall(libc::SYS_getdents64, fd, big.as_mut_ptr(), big.len()) };
        if n <= 0 {
            break;
        }
        rest.extend(dirents(&big[..n as usize]));
    }
    let mut got = first.clone();
    got.extend(rest);
    c.check(!first.is_empty(), || {
        "read no entries before the dump".into()
    });
    c.eq("entries before and after the dump, in order", got, all);
}

fn dirents(buf: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut i = 0;
    while i + 19 < buf.len() {
        let reclen = u16::from_ne_bytes([buf[i + 16], buf[i + 17]]) as usize;
        if reclen == 0 {
            break;
        }
        let name = &buf[i + 19..(i + reclen).min(buf.len())];
        let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
        out.push(String::from_utf8_lossy(&name[..end]).to_string());
        i += reclen;
    }
    out
}

fn epoll(ctl: &Ctl, c: &mut Checks) {
    let mut p = [0; 2];
    // SAFETY: plain syscalls; p is valid for two ints.
    let (ep, ev) = unsafe {
        sys(libc::pipe(p.as_mut_ptr()), "pipe");
        (
            sys(libc::epoll_create1(libc::EPOLL_CLOEXEC), "epoll_create1"),
            sys(libc::eventfd(0, libc::EFD_NONBLOCK), "eventfd"),
        )
    };
    write_all(p[1], b"ready");
    for (fd, tag) in [(p[0], 0x11u64), (ev, 0x22u64)] {
        let mut e = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: tag,
        };
        // SAFETY: e is a valid epoll_event.
        sys(
            unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut e) },
            "epoll_ctl",
        );
    }
    ctl.ready();
    ctl.wait_for_go();
    let wait = |c: &mut Checks| {
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 8];
        // SAFETY: evs is valid for 8 events.
        let n = unsafe { libc::epoll_wait(ep, evs.as_mut_ptr(), 8, 200) };
        if n < 0 {
            c.fail(format!("epoll_wait: {}", std::io::Error::last_os_error()));
            return Vec::new();
        }
        let mut tags: Vec<u64> = evs[..n as usize].iter().map(|e| e.u64).collect();
        tags.sort_unstable();
        tags
    };
    let t = wait(c);
    c.eq("ready tags (pipe only)", t, vec![0x11]);
    write_all(ev, &1u64.to_ne_bytes());
    let t = wait(c);
    c.eq("ready tags after the eventfd fired", t, vec![0x11, 0x22]);
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{ep}")).unwrap_or_default();
    c.eq(
        "watches in fdinfo",
        info.lines().filter(|l| l.starts_with("tfd:")).count(),
        2,
    );
}

/// An epoll instance watching another one created after it (a lower fd
/// watching a higher one, as UCX and libevent nest them), the inner one
/// watching a pipe with data.
fn epoll_nested(ctl: &Ctl, c: &mut Checks) {
    let mut p = [0; 2];
    // SAFETY: plain syscalls; p is valid for two ints.
    let (outer, inner) = unsafe {
        let outer = sys(libc::epoll_create1(libc::EPOLL_CLOEXEC), "epoll_create1");
        let inner = sys(libc::epoll_create1(libc::EPOLL_CLOEXEC), "epoll_create1");
        sys(libc::pipe(p.as_mut_ptr()), "pipe");
        (outer, inner)
    };
    write_all(p[1], b"x");
    for (ep, fd, tag) in [(inner, p[0], 0x33u64), (outer, inner, 0x44u64)] {
        let mut e = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: tag,
        };
        // SAFETY: e is a valid epoll_event.
        sys(
            unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut e) },
            "epoll_ctl",
        );
    }
    ctl.ready();
    ctl.wait_for_go();
    for (ep, what, tag) in [(outer, "outer", 0x44u64), (inner, "inner", 0x33u64)] {
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 4];
        // SAFETY: evs is valid for 4 events.
        let n = unsafe { libc::epoll_wait(ep, evs.as_mut_ptr(), 4, 200) };
        let tags: Vec<u64> = evs[..n.max(0) as usize].iter().map(|e| e.u64).collect();
        c.eq(&format!("ready tags of the {what} epoll"), tags, vec![tag]);
    }
}

fn signalfd(ctl: &Ctl, c: &mut Checks) {
    let rt = libc::SIGRTMIN() + 2;
    // SAFETY: set is a valid sigset; the calls take plain values otherwise.
    let sfd = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        libc::sigaddset(&mut set, rt);
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let fd = sys(libc::signalfd(-1, &set, libc::SFD_NONBLOCK), "signalfd");
        libc::raise(libc::SIGUSR1);
        sys(
            libc::sigqueue(
                libc::getpid(),
                rt,
                libc::sigval {
                    sival_ptr: 77 as *mut libc::c_void,
                },
            ),
            "sigqueue",
        );
        fd
    };
    ctl.ready();
    ctl.wait_for_go();
    let mut got = Vec::new();
    loop {
        // SAFETY: si is plain data; the buffer is its size.
        let mut si: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let sz = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: si is valid for sz bytes.
        if unsafe { libc::read(sfd, (&mut si as *mut libc::signalfd_siginfo).cast(), sz) }
            != sz as isize
        {
            break;
        }
        got.push((
            si.ssi_signo as i32,
            if si.ssi_signo as i32 == rt {
                si.ssi_int
            } else {
                0
            },
        ));
    }
    c.eq(
        "signals read from the signalfd",
        got,
        vec![(libc::SIGUSR1, 0), (rt, 77)],
    );
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{sfd}")).unwrap_or_default();
    let mask = info
        .lines()
        .find(|l| l.starts_with("sigmask:"))
        .map(|l| l[8..].trim().to_string());
    let want = (1u64 << (libc::SIGUSR1 - 1)) | (1u64 << (rt - 1));
    c.eq("signalfd mask", mask, Some(format!("{want:016x}")));
}

/// Our locks in /proc/locks on the file with inode `ino`: (kind, type, range).
fn my_locks(ino: u64) -> Vec<String> {
    let me = std::process::id().to_string();
    let text = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    let mut v: Vec<String> = text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // "1: FLOCK  ADVISORY  WRITE 4242 08:01:1234 0 EOF"
            let i = f
                .iter()
                .position(|x| x.contains(':') && x.matches(':').count() == 2)?;
            let file_ino: u64 = f[i].rsplit(':').next()?.parse().ok()?;
            // OFD locks belong to no process: /proc/locks shows pid -1.
            let owner = f.get(i.checked_sub(1)?)?;
            if (*owner != me && f.get(1) != Some(&"OFDLCK")) || file_ino != ino {
                return None;
            }
            Some(format!(
                "{} {} {}-{}",
                f.get(1)?,
                f.get(3)?,
                f.get(i + 1)?,
                f.get(i + 2)?
            ))
        })
        .collect();
    v.sort();
    v
}

fn lock(ctl: &Ctl, c: &mut Checks) {
    let p = ctl.path("locked");
    std::fs::write(&p, b"0123456789abcdef").unwrap_or_else(|_| setup_failed("write"));
    let a = open(&p, libc::O_RDWR);
    let b = open(&p, libc::O_RDWR);
    let fl = libc::flock {
        l_type: libc::F_WRLCK as i16,
        l_whence: libc::SEEK_SET as i16,
        l_start: 0,
        l_len: 10,
        l_pid: 0,
    };
    // An open-file-description lock on another range, read-only.
    let ofd = open(&p, libc::O_RDWR);
    let ofd_range = libc::flock {
        l_type: libc::F_RDLCK as i16,
        l_start: 12,
        l_len: 4,
        ..fl
    };
    // SAFETY: fl and ofd_range are valid flocks; flock takes plain values.
    unsafe {
        sys(libc::flock(a, libc::LOCK_EX), "flock");
        sys(libc::fcntl(b, libc::F_SETLK, &fl), "F_SETLK");
        sys(
            libc::fcntl(ofd, libc::F_OFD_SETLK, &ofd_range),
            "F_OFD_SETLK",
        );
    }
    let ino = std::fs::metadata(&p)
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .unwrap_or(0);
    let before = my_locks(ino);
    ctl.ready();
    ctl.wait_for_go();
    c.check(before.len() == 3, || {
        format!("locks before the dump: {before:?}")
    });
    c.eq(
        "our locks in /proc/locks (kind, type, range)",
        my_locks(ino),
        before,
    );
}

fn inotify(ctl: &Ctl, c: &mut Checks) {
    let d = ctl.path("watched");
    std::fs::create_dir_all(&d).unwrap_or_else(|_| setup_failed("mkdir"));
    let cd = cpath(&d);
    // SAFETY: plain values; cd is NUL-terminated.
    let fd = unsafe {
        let fd = sys(libc::inotify_init1(libc::IN_NONBLOCK), "inotify_init1");
        sys(
            libc::inotify_add_watch(fd, cd.as_ptr(), libc::IN_CREATE),
            "inotify_add_watch",
        );
        fd
    };
    std::fs::write(d.join("queued-before"), b"").unwrap_or_else(|_| setup_failed("create"));
    ctl.ready();
    ctl.wait_for_go();
    std::fs::write(d.join("created-after"), b"").ok();
    let (buf, _) = read_available(fd);
    let mut names = Vec::new();
    let mut i = 0;
    while i + 16 <= buf.len() {
        let len = u32::from_ne_bytes(buf[i + 12..i + 16].try_into().unwrap_or_default()) as usize;
        let name = &buf[i + 16..(i + 16 + len).min(buf.len())];
        names.push(
            String::from_utf8_lossy(name.split(|&b| b == 0).next().unwrap_or(&[])).to_string(),
        );
        i += 16 + len;
    }
    c.eq(
        "inotify events (queued before the dump, made after)",
        names,
        vec!["queued-before".to_string(), "created-after".to_string()],
    );
}

/// A controlling terminal (a pty slave, opened without O_NOCTTY by this
/// session leader) and /dev/tty open on it.
fn tty(ctl: &Ctl, c: &mut Checks) {
    // SAFETY: standard pty setup; ptsname's buffer is copied at once.
    let (m, s, t) = unsafe {
        let m = sys(
            libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY),
            "posix_openpt",
        );
        sys(libc::grantpt(m), "grantpt");
        sys(libc::unlockpt(m), "unlockpt");
        let name = CStr::from_ptr(libc::ptsname(m)).to_owned();
        let s = sys(
            libc::open(name.as_ptr(), libc::O_RDWR),
            "open pts as controlling terminal",
        );
        let tty = CString::new("/dev/tty").unwrap_or_default();
        let t = sys(libc::open(tty.as_ptr(), libc::O_RDWR), "open /dev/tty");
        (m, s, t)
    };
    let link = |fd: RawFd| std::fs::read_link(format!("/proc/self/fd/{fd}")).ok();
    let (ls, lt) = (link(s), link(t));
    ctl.ready();
    ctl.wait_for_go();
    c.eq("pts fd", link(s), ls);
    c.eq("/dev/tty fd", link(t), lt);
    // SAFETY: plain values.
    let (sid, me) = unsafe { (libc::tcgetsid(t), libc::getpid()) };
    c.eq("session of the controlling terminal", sid, me);
    write_all(t, b"via /dev/tty\n");
    std::thread::sleep(std::time::Duration::from_millis(50));
    let (got, _) = read_available(m);
    c.check(
        String::from_utf8_lossy(&got).contains("via /dev/tty"),
        || format!("the master read {got:?}"),
    );
}

fn pty(ctl: &Ctl, c: &mut Checks) {
    // SAFETY: standard pty setup; ptsname's buffer is copied at once.
    let (m, s, name) = unsafe {
        let m = sys(
            libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY),
            "posix_openpt",
        );
        sys(libc::grantpt(m), "grantpt");
        sys(libc::unlockpt(m), "unlockpt");
        let name = CStr::from_ptr(libc::ptsname(m)).to_owned();
        let s = sys(
            libc::open(name.as_ptr(), libc::O_RDWR | libc::O_NOCTTY),
            "open pts",
        );
        (m, s, name)
    };
    write_all(m, b"hello\n");
    ctl.ready();
    ctl.wait_for_go();
    let link = std::fs::read_link(format!("/proc/self/fd/{s}")).ok();
    c.eq(
        "slave path",
        link.map(|l| l.to_string_lossy().to_string()),
        Some(name.to_string_lossy().to_string()),
    );
    let (got, _) = read_available(s);
    c.eq(
        "queued line on the slave",
        String::from_utf8_lossy(&got).to_string(),
        "hello\n".to_string(),
    );
    write_all(s, b"back\n");
    std::thread::sleep(std::time::Duration::from_millis(50));
    let (back, _) = read_available(m);
    c.check(String::from_utf8_lossy(&back).contains("back"), || {
        format!("master read {back:?} after a write on the slave")
    });
}
