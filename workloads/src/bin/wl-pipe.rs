//! Pipes and FIFOs with unread data.
//!
//! `wl-pipe --ctl DIR MODE BYTES`, MODE one of: contents (an anonymous pipe),
//! fifo (a named FIFO open both ways), size (a 1 MiB pipe), shared (the ends
//! in parent and child), external (stdout is a pipe to the harness; BYTES unused).

use crest_workloads::support::{
    fork_child, mode, num_arg, pattern, pattern_diff, read_available, sys, wait_ok, write_all,
};
use crest_workloads::{Checks, Ctl};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;

const SEED: u64 = 0x9173;

fn main() {
    let (ctl, args) = Ctl::from_args();
    let (mode, args) = mode(&args);
    let len: usize = num_arg(&args, 0, "bytes");
    let mut c = Checks::new();
    if mode == "external" {
        // Stdout is a pipe to a process outside the dump (the harness); after
        // the restore it is whatever the restorer rebound it to.
        write_all(1, b"before the dump\n");
        ctl.ready();
        ctl.wait_for_go();
        let line = b"after the restore\n";
        // SAFETY: line is valid for its length.
        let n = unsafe { libc::write(1, line.as_ptr().cast(), line.len()) };
        c.eq("bytes written to stdout", n, line.len() as isize);
        ctl.finish(&c.into_differences());
    }
    let (r, w) = match mode.as_str() {
        "contents" | "size" | "shared" => {
            let mut fds = [0; 2];
            // SAFETY: fds is valid for two ints.
            sys(
                unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) },
                "pipe2",
            );
            (fds[0], fds[1])
        }
        "fifo" => {
            let path = CString::new(ctl.path("fifo").as_os_str().as_bytes()).unwrap_or_default();
            // SAFETY: path is NUL-terminated; open of a FIFO read side with
            // O_NONBLOCK returns at once, after which the write side opens too.
            unsafe {
                sys(libc::mkfifo(path.as_ptr(), 0o600), "mkfifo");
                let r = sys(
                    libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_NONBLOCK),
                    "open fifo r",
                );
                let w = sys(libc::open(path.as_ptr(), libc::O_WRONLY), "open fifo w");
                libc::fcntl(r, libc::F_SETFL, 0);
                (r, w)
            }
        }
        other => {
            eprintln!("wl-pipe: unknown mode {other:?}");
            std::process::exit(2);
        }
    };
    const SIZE: i32 = 1 << 20;
    if mode == "size" {
        // SAFETY: fcntl with plain values.
        sys(
            unsafe { libc::fcntl(w, libc::F_SETPIPE_SZ, SIZE) },
            "F_SETPIPE_SZ",
        );
    }
    if mode == "shared" {
        // The child holds the read end, the parent the write end.
        let child = fork_child(|| {
            // SAFETY: closing our copy of the write end.
            unsafe { libc::close(w) };
            // Announce the child's fd table is final: the harness must not
            // record it before the close.
            let _ = std::fs::write(ctl.path("ready.child"), b"");
            ctl.wait_for_go();
            let (got, _) = read_available(r);
            match pattern_diff("child's read end", &got, len, SEED) {
                Some(d) => {
                    eprintln!("{d}");
                    1
                }
                None => 0,
            }
        });
        // SAFETY: closing our copy of the read end.
        unsafe { libc::close(r) };
        write_all(w, &pattern(len, SEED));
        let t0 = std::time::Instant::now();
        while !ctl.path("ready.child").exists() {
            if t0.elapsed() > std::time::Duration::from_secs(20) {
                eprintln!("setup failed: the child never got ready");
                std::process::exit(2);
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        ctl.ready();
        ctl.wait_for_go();
        if let Err(e) = wait_ok(child, "child") {
            c.fail(e);
        }
        ctl.finish(&c.into_differences());
    }
    write_all(w, &pattern(len, SEED));
    ctl.ready();
    ctl.wait_for_go();
    if mode == "size" {
        // SAFETY: fcntl with plain values.
        c.eq(
            "pipe capacity",
            unsafe { libc::fcntl(w, libc::F_GETPIPE_SZ) },
            SIZE,
        );
    }
    let (got, err) = read_available(r);
    if let Some(d) = pattern_diff("unread data", &got, len, SEED) {
        c.fail(d);
    }
    c.check(err.as_ref().and_then(|e| e.raw_os_error()) == Some(libc::EAGAIN), || {
        format!("after the data the pipe should be empty with the write end open (EAGAIN), got {err:?}")
    });
    // The pipe still connects its ends.
    write_all(w, b"after");
    let (again, _) = read_available(r);
    c.eq(
        "data written after restore",
        again.as_slice(),
        b"after".as_slice(),
    );
    if mode == "fifo" {
        let _ = std::fs::remove_file(ctl.path("fifo"));
    }
    ctl.finish(&c.into_differences());
}
