//! A process asks for its own checkpoint: it starts
//! `crest dump -t PID -D DIR --leave-running` outside its own tree (double
//! fork, so crest is not one of the descendants it dumps) and waits until its
//! control thread has been through the cycle that crest drives.
//!
//! The requester keeps no descriptor to crest (a pipe would be carried into
//! the image): crest's messages go to a file under the temporary directory,
//! read only when the dump fails.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

use crate::core::{self, CONTINUED, GEN, LAST, RESTARTED};
use crate::sys;

/// `$CREST_BIN` when it names a file, else `crest` on `$PATH`.
pub fn find_crest() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CREST_BIN").map(PathBuf::from) {
        if p.is_file() {
            return Some(p);
        }
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("crest"))
        .find(|p| p.is_file())
}

/// Ok(true) restarted, Ok(false) continued, Err(message).
pub fn request(dir: &Path, timeout: Duration) -> Result<bool, String> {
    core::init().map_err(|e| format!("cannot start libcrest: errno {e}"))?;
    let crest = find_crest().ok_or("crest not found ($CREST_BIN or PATH)")?;
    let pid = sys::getpid();
    let gen0 = GEN.load(SeqCst);
    let log = std::env::temp_dir().join(format!(
        "crest-request.{pid}.{gen0}.{}.log",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos())
    ));
    let cstr = |b: &[u8]| CString::new(b).map_err(|_| "a path contains a NUL byte".to_string());
    let argv_owned = [
        cstr(crest.as_os_str().as_bytes())?,
        cstr(b"dump")?,
        cstr(b"-t")?,
        cstr(pid.to_string().as_bytes())?,
        cstr(b"-D")?,
        cstr(dir.as_os_str().as_bytes())?,
        cstr(b"--leave-running")?,
    ];
    let mut argv: Vec<*const libc::c_char> = argv_owned.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let log_c = cstr(log.as_os_str().as_bytes())?;
    let gpid = spawn_detached(&argv, &log_c)?;

    let until = Instant::now() + timeout;
    let mut gone_at: Option<Instant> = None;
    let result = loop {
        if GEN.load(SeqCst) != gen0 {
            break match LAST.load(SeqCst) {
                RESTARTED => Ok(true),
                CONTINUED => Ok(false),
                _ => Err(failure(&log)),
            };
        }
        if gone_at.is_none() && !sys::alive(gpid) {
            gone_at = Some(Instant::now());
        }
        // crest exits just after it answers; give the control thread a moment.
        if gone_at.is_some_and(|t| t.elapsed() > Duration::from_secs(2)) {
            break Err(failure(&log));
        }
        if Instant::now() > until {
            break Err(format!("crest dump did not finish within {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let _ = std::fs::remove_file(&log);
    result
}

fn failure(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let line = text
        .lines()
        .find(|l| l.contains("crest: error:"))
        .or_else(|| text.lines().rev().find(|l| !l.trim().is_empty()))
        .unwrap_or("crest dump failed without a message");
    line.trim().to_string()
}

/// fork → fork → exec, the middle process exiting at once; returns the
/// grandchild's pid. Only async-signal-safe calls between fork and exec.
fn spawn_detached(argv: &[*const libc::c_char], log: &CString) -> Result<i32, String> {
    // p carries the grandchild's pid to us; crest starts only once `go` is
    // closed on our side: no pipe of ours may be open when crest freezes us.
    let mut p = [0i32; 2];
    let mut go = [0i32; 2];
    // SAFETY: p and go are valid for two ints each.
    if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("pipe2: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: as above.
    if unsafe { libc::pipe2(go.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        sys::close(p[0]);
        sys::close(p[1]);
        return Err(format!("pipe2: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: the child only calls async-signal-safe functions before _exit/exec.
    let child = unsafe { libc::fork() };
    if child < 0 {
        for fd in [p[0], p[1], go[0], go[1]] {
            sys::close(fd);
        }
        return Err(format!("fork: {}", std::io::Error::last_os_error()));
    }
    if child == 0 {
        // SAFETY: as above; every pointer was prepared before the fork.
        unsafe {
            let g = libc::fork();
            if g == 0 {
                libc::close(go[1]);
                let mut b = 0u8;
                while libc::read(go[0], &mut b as *mut u8 as *mut libc::c_void, 1) < 0
                    && *libc::__errno_location() == libc::EINTR
                {}
                libc::setsid();
                let fd = libc::open(
                    log.as_ptr(),
                    libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC,
                    0o600,
                );
                let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
                libc::dup2(null, 0);
                libc::dup2(fd, 1);
                libc::dup2(fd, 2);
                // Nothing of ours may reach crest (it would hold our sockets open).
                if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) != 0 {
                    for f in 3..4096 {
                        libc::close(f);
                    }
                }
                libc::execv(argv[0], argv.as_ptr());
                libc::_exit(127);
            }
            libc::write(p[1], &g as *const i32 as *const libc::c_void, 4);
            libc::_exit(0);
        }
    }
    sys::close(p[1]);
    let mut g = -1i32;
    // SAFETY: g is 4 writable bytes.
    let n = unsafe { libc::read(p[0], &mut g as *mut i32 as *mut libc::c_void, 4) };
    sys::close(p[0]);
    let mut st = 0;
    // SAFETY: st is a valid int; child is our own child.
    unsafe { libc::waitpid(child, &mut st, 0) };
    // Now crest may start.
    sys::close(go[0]);
    sys::close(go[1]);
    if n != 4 || g <= 0 {
        return Err("could not start crest".into());
    }
    Ok(g)
}
