//! The engine's half of the callback interface (libcrest, `engine/api/`).
//!
//! Before freezing, `crest dump` connects to `@crest-api.PID` for each
//! process in scope; nothing listening there means the process does not use
//! the library and is dumped transparently (it receives nothing). With every
//! library process it runs one handshake, all at once so that processes can
//! coordinate in their callbacks (drain messages to each other):
//!
//! ```text
//! crest → lib   checkpoint
//! lib → crest   ready ADDR              (hex address of its state word)
//!           |   abort temporary|permanent REASON
//! crest → lib   freeze                  (once every process is ready)
//! lib           closes its sockets; crest sees EOF, then freezes
//! ```
//!
//! The library then sleeps on its state word. crest writes [`CONTINUED`] into
//! it (process still frozen) for `--leave-running`/`--stop`, [`FAILED`] when
//! the dump fails, and the image keeps the address so that `crest restore`
//! writes [`RESTARTED`] before the process resumes. The values match
//! engine/api/src/core.rs.

use std::io::{Read, Write};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixStream};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub const CONTINUED: u32 = 2;
pub const RESTARTED: u32 = 3;
pub const FAILED: u32 = 4;

/// How long `crest dump` waits for callbacks by default.
pub const DEFAULT_CALLBACK_TIMEOUT: Duration = Duration::from_secs(10);

/// What the image keeps about a process that took part through libcrest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiImage {
    /// The library's state word, where `crest restore` writes "restarted".
    pub state_addr: u64,
}

struct Participant {
    pid: i32,
    conn: Option<UnixStream>,
    buf: Vec<u8>,
    state_addr: Option<u64>,
}

/// The processes whose callbacks ran, waiting for the dump's outcome.
/// Dropped without [`Handshake::finish`], it tells them the dump failed.
#[derive(Default)]
pub struct Handshake {
    parts: Vec<Participant>,
    finished: bool,
}

/// Connects to `pid`'s library, if it has one (and it is really `pid` that listens).
fn connect(pid: i32) -> Option<UnixStream> {
    let addr = SocketAddr::from_abstract_name(format!("crest-api.{pid}")).ok()?;
    let s = UnixStream::connect_addr(&addr).ok()?;
    let peer = peer_pid(&s)?;
    if peer != pid {
        tracing::warn!(
            pid,
            peer,
            "@crest-api.{pid} is held by another process; ignored"
        );
        return None;
    }
    Some(s)
}

/// The pid of a connected unix socket's peer (SO_PEERCRED).
fn peer_pid(s: &UnixStream) -> Option<i32> {
    use std::os::fd::AsRawFd;
    // SAFETY: ucred is plain data; all zeroes is a valid value.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut libc::ucred as *mut libc::c_void,
            &mut len,
        )
    };
    (r == 0).then_some(cred.pid)
}

impl Handshake {
    /// Runs the callbacks of every library process among `pids`; returns once
    /// all are ready for the freeze, or the first refusal as an error.
    pub fn run(pids: &[i32], timeout: Duration) -> Result<Handshake> {
        let mut hs = Handshake::default();
        for &pid in pids {
            if let Some(mut conn) = connect(pid) {
                tracing::info!(pid, "runs libcrest: running its checkpoint callbacks");
                conn.write_all(b"checkpoint\n")
                    .map_err(|e| Error::io(format!("@crest-api.{pid}"), e))?;
                hs.parts.push(Participant {
                    pid,
                    conn: Some(conn),
                    buf: Vec::new(),
                    state_addr: None,
                });
            }
        }
        if hs.parts.is_empty() {
            return Ok(hs);
        }
        // All answers are awaited at once: the first refusal wins, even while
        // another process still waits for it in its callbacks.
        let deadline = Instant::now() + timeout;
        let mut waiting: Vec<usize> = (0..hs.parts.len()).collect();
        while let Some(&first) = waiting.first() {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return Err(Error::Refused {
                    pid: hs.parts[first].pid,
                    reason: format!(
                        "its checkpoint callbacks did not finish within {timeout:?} (--callback-timeout); the checkpoint was cancelled"
                    ),
                });
            };
            let mut fds: Vec<libc::pollfd> = waiting
                .iter()
                .map(|&i| libc::pollfd {
                    fd: hs.parts[i]
                        .conn
                        .as_ref()
                        .map_or(-1, std::os::fd::AsRawFd::as_raw_fd),
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
            let ms = left.as_millis().clamp(1, 1000) as libc::c_int;
            // SAFETY: fds is a valid array of fds.len() pollfds.
            unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
            let ready: Vec<usize> = waiting
                .iter()
                .zip(&fds)
                .filter(|(_, f)| f.revents != 0)
                .map(|(&i, _)| i)
                .collect();
            for i in ready {
                let pid = hs.parts[i].pid;
                // Readable: a whole line is there or follows at once.
                let line = hs.parts[i]
                    .read_line(Instant::now() + Duration::from_secs(1))
                    .ok_or_else(|| Error::Refused {
                        pid,
                        reason:
                            "libcrest closed its control socket during the checkpoint callbacks"
                                .into(),
                    })?;
                if let Some(rest) = line.strip_prefix("abort ") {
                    let (kind, reason) = rest.split_once(' ').unwrap_or((rest, ""));
                    return Err(Error::Refused {
                        pid,
                        reason: format!(
                            "a checkpoint callback refused the checkpoint ({kind} failure): {reason}"
                        ),
                    });
                }
                let addr = line
                    .strip_prefix("ready ")
                    .and_then(|a| u64::from_str_radix(a, 16).ok())
                    .ok_or_else(|| Error::Refused {
                        pid,
                        reason: format!("libcrest answered {line:?} instead of \"ready ADDR\""),
                    })?;
                hs.parts[i].state_addr = Some(addr);
                waiting.retain(|&w| w != i);
            }
        }
        // The library closes its sockets on `freeze`; none may be in the image.
        for p in &mut hs.parts {
            let conn = p.conn.as_mut().expect("connected above");
            conn.write_all(b"freeze\n")
                .map_err(|e| Error::io(format!("@crest-api.{}", p.pid), e))?;
        }
        let deadline = Instant::now() + timeout.max(Duration::from_secs(5));
        for p in &mut hs.parts {
            if !p.wait_eof(deadline) {
                return Err(Error::Refused {
                    pid: p.pid,
                    reason: "libcrest did not close its control socket after `freeze`".into(),
                });
            }
            p.conn = None;
        }
        Ok(hs)
    }

    /// The image record for `pid`, when it took part.
    pub fn image_of(&self, pid: i32) -> Option<ApiImage> {
        self.parts
            .iter()
            .find(|p| p.pid == pid)
            .and_then(|p| p.state_addr)
            .map(|state_addr| ApiImage { state_addr })
    }

    /// Tells every participant how the dump ended (`CONTINUED`), or only
    /// marks the handshake done (`None`: the processes were killed).
    pub fn finish(&mut self, state: Option<u32>) -> Result<()> {
        self.finished = true;
        if let Some(v) = state {
            for p in &self.parts {
                if let Some(addr) = p.state_addr {
                    crate::sys::ptrace::write_mem(p.pid, addr, &v.to_ne_bytes())?;
                }
            }
        }
        Ok(())
    }
}

impl Drop for Handshake {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        // Closing the connections cancels the processes not told to freeze yet;
        // the others read FAILED from their state word.
        for p in &mut self.parts {
            p.conn = None;
            if let Some(addr) = p.state_addr {
                if let Err(e) = crate::sys::ptrace::write_mem(p.pid, addr, &FAILED.to_ne_bytes()) {
                    tracing::warn!(pid = p.pid, "could not tell libcrest the dump failed: {e}");
                }
            }
        }
    }
}

impl Participant {
    fn read_line(&mut self, deadline: Instant) -> Option<String> {
        let conn = self.conn.as_mut()?;
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                return Some(String::from_utf8_lossy(&line[..i]).into_owned());
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            conn.set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .ok()?;
            let mut chunk = [0u8; 512];
            match conn.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return None,
            }
        }
    }

    fn wait_eof(&mut self, deadline: Instant) -> bool {
        let Some(conn) = self.conn.as_mut() else {
            return true;
        };
        loop {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return false;
            };
            if conn
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .is_err()
            {
                return false;
            }
            let mut chunk = [0u8; 64];
            match conn.read(&mut chunk) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
    }
}

/// Tells restored process `pid`, if it uses the library (`api`), that it was
/// restarted: called while it is still stopped, before it resumes.
pub fn restarted(pid: i32, api: Option<&ApiImage>) -> Result<()> {
    if let Some(api) = api {
        crate::sys::ptrace::write_mem(pid, api.state_addr, &RESTARTED.to_ne_bytes())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::os::unix::net::UnixListener;

    /// A stand-in for libcrest in this process: answers `checkpoint` with `reply`.
    fn fake_library(reply: &'static str) -> std::thread::JoinHandle<Vec<String>> {
        let pid = std::process::id() as i32;
        let addr = SocketAddr::from_abstract_name(format!("crest-api.{pid}")).unwrap();
        let l = UnixListener::bind_addr(&addr).unwrap();
        std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            drop(l);
            let mut r = std::io::BufReader::new(s.try_clone().unwrap());
            let mut seen = Vec::new();
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            seen.push(line.trim().to_string());
            (&s).write_all(reply.as_bytes()).unwrap();
            line.clear();
            let _ = r.read_line(&mut line);
            seen.push(line.trim().to_string());
            seen
        })
    }

    #[test]
    fn handshake_with_and_without_the_library() {
        let pid = std::process::id() as i32;
        // Nobody listens: a transparent dump, nothing recorded.
        let hs = Handshake::run(&[pid], Duration::from_secs(1)).unwrap();
        assert_eq!(hs.image_of(pid), None);

        let lib = fake_library("abort permanent cannot be checkpointed\n");
        let err = Handshake::run(&[pid], Duration::from_secs(5))
            .err()
            .expect("refused");
        let text = err.to_string();
        assert!(text.contains(&format!("pid {pid}")), "{text}");
        assert!(
            text.contains("permanent failure): cannot be checkpointed"),
            "{text}"
        );
        assert_eq!(lib.join().unwrap(), vec!["checkpoint", ""]);

        let lib = fake_library("ready 7f00dead0000\n");
        let mut hs = Handshake::run(&[pid], Duration::from_secs(5)).unwrap();
        assert_eq!(lib.join().unwrap(), vec!["checkpoint", "freeze"]);
        assert_eq!(
            hs.image_of(pid),
            Some(ApiImage {
                state_addr: 0x7f00_dead_0000
            })
        );
        hs.finish(None).unwrap();
    }
}
