//! Restoring elsewhere than as crest's child: into a new PID namespace
//! (crest's child becomes its init, the tree gets its original PIDs inside
//! it, whatever is taken here), or detached (an intermediate process
//! restores and exits, so the tree is reparented to init).

use std::fs::File;

use nix::sys::wait::waitpid;

use crate::error::Error;
use crate::restore::error::RestoreError;

type Result<T, E = RestoreError> = std::result::Result<T, E>;
use crate::restore::context::{RestoreContext, Restored};
use crate::sys::{proc, process};

/// The restore's steps from the fork on, run where these functions put them.
pub(super) type Run = dyn Fn(&RestoreContext) -> Result<()>;

/// Restores the tree under a new PID namespace: crest's child becomes its
/// init (PID 1), restores the tree there (the root is its child, every
/// process gets its original PID inside), reports, and then reaps until the
/// namespace is empty, exiting with the root's status.
pub(super) fn restore_in_pidns(cx: &RestoreContext, run: &Run) -> Result<Restored> {
    let root = cx.image.inventory.root_pid;
    let (rd, wr) = nix::unistd::pipe().map_err(|e| Error::sys(0, "pipe", e))?;
    let args = process::CloneArgs {
        flags: libc::CLONE_NEWPID as u64,
        exit_signal: libc::SIGCHLD as u64,
        ..Default::default()
    };
    // SAFETY: clone3 without CLONE_VM behaves like fork; the child runs the
    // restore and the namespace's init loop and never returns.
    let init = unsafe { process::clone3(&args) };
    if init < 0 {
        let e = nix::errno::Errno::last();
        return Err(RestoreError::NoPidns(e));
    }
    if init == 0 {
        drop(rd);
        let msg = match run(cx) {
            Ok(()) => "ok".to_string(),
            Err(e) => format!("err {} {e}", e.exit_code()),
        };
        let _ = nix::unistd::write(&wr, msg.as_bytes());
        pidns_init(root, msg == "ok");
    }
    drop(wr);
    let init = init as i32;
    let mut msg = String::new();
    use std::io::Read;
    let _ = File::from(rd).read_to_string(&mut msg);
    if msg != "ok" {
        let _ = waitpid(nix::unistd::Pid::from_raw(init), None);
        let rest = msg
            .strip_prefix("err ")
            .unwrap_or("1 the namespace's init died");
        let (_, text) = rest.split_once(' ').unwrap_or(("1", rest));
        return Err(RestoreError::InPidns {
            report: text.to_string(),
        });
    }
    // The root as seen from here: init's child whose innermost PID is root.
    let pid = std::fs::read_dir("/proc")
        .map_err(|e| Error::io("/proc", e))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .find(|&pid| {
            let status = proc::read(pid, "status").unwrap_or_default();
            proc::status_field(&status, "PPid") == Some(init.to_string().as_str())
                && proc::status_field(&status, "NSpid").and_then(|v| v.split_whitespace().last())
                    == Some(root.to_string().as_str())
        })
        .ok_or(RestoreError::RootNotFound { root, init })?;
    Ok(Restored::InPidns {
        pid,
        init,
        detached: cx.opts.detach,
    })
}

/// The namespace's init once the tree runs: hold nothing of the tree's
/// (descriptors would keep pipes and files open), reap every process, and
/// exit with the root's status when the namespace is empty.
fn pidns_init(root: i32, restored: bool) -> ! {
    // SAFETY: plain syscalls on ourselves; this process never returns.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            for fd in 0..3 {
                libc::dup2(null, fd);
            }
        }
        libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
        if !restored {
            libc::_exit(1);
        }
        let mut code = 0;
        loop {
            let mut status = 0;
            let pid = libc::waitpid(-1, &mut status, 0);
            if pid < 0 {
                if nix::errno::Errno::last() == nix::errno::Errno::EINTR {
                    continue;
                }
                libc::_exit(code);
            }
            if pid == root {
                code = if libc::WIFEXITED(status) {
                    libc::WEXITSTATUS(status)
                } else {
                    128 + libc::WTERMSIG(status)
                };
            }
        }
    }
}

/// Restores the tree from an intermediate process that exits, so the
/// restored tree is reparented to init (or the nearest subreaper).
pub(super) fn restore_detached(cx: &RestoreContext, run: &Run) -> Result<Restored> {
    let root = cx.image.inventory.root_pid;
    let (rd, wr) = nix::unistd::pipe().map_err(|e| Error::sys(0, "pipe", e))?;
    // SAFETY: crest is single-threaded here; the child only runs the restore and exits.
    match unsafe { nix::unistd::fork() }.map_err(|e| Error::sys(0, "fork", e))? {
        nix::unistd::ForkResult::Child => {
            drop(rd);
            let msg = match run(cx) {
                Ok(()) => "ok".to_string(),
                Err(e) => format!("err {} {e}", e.exit_code()),
            };
            let _ = nix::unistd::write(&wr, msg.as_bytes());
            // SAFETY: _exit skips atexit handlers and destructors the parent owns.
            unsafe { libc::_exit(0) }
        }
        nix::unistd::ForkResult::Parent { child } => {
            drop(wr);
            let mut msg = String::new();
            use std::io::Read;
            let _ = File::from(rd).read_to_string(&mut msg);
            let _ = waitpid(child, None);
            if msg == "ok" {
                return Ok(Restored::Detached { pid: root });
            }
            let rest = msg.strip_prefix("err ").unwrap_or("1 restore helper died");
            let (code, text) = rest.split_once(' ').unwrap_or(("1", rest));
            Err(if code == "3" {
                Error::Unsupported {
                    pid: root,
                    what: text
                        .trim_start_matches(&format!("pid {root}: "))
                        .trim_end_matches(": not supported yet")
                        .to_string(),
                }
                .into()
            } else {
                RestoreError::Detached {
                    report: text.to_string(),
                }
            })
        }
    }
}
