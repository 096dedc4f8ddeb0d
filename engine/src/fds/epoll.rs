//! epoll instances and their watch sets.
//!
//! Collect reads the watches from fdinfo (`tfd:` lines: the watched
//! descriptor, events, user data). Restore builds each epoll in its process
//! once every descriptor it watches is in place (it answers "not yet"
//! before): an epoll may watch another, as libevent and UCX nest them.

use serde::{Deserialize, Serialize};

use crate::fds::table::{ChildFds, OpenError, Restored};

/// An epoll watch: the watched fd (in the owner's table), events and user data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EpollWatch {
    pub fd: i32,
    pub events: u32,
    pub data: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Epoll {
    pub flags: i32,
    pub watches: Vec<EpollWatch>,
}

impl Epoll {
    pub fn from_fdinfo(fdinfo: &str, flags: i32) -> Result<Epoll, UnreadableWatch> {
        let mut watches = Vec::new();
        for line in fdinfo.lines().filter(|l| l.starts_with("tfd:")) {
            let words: Vec<&str> = line.split_whitespace().collect();
            let after = |k: &str| {
                words
                    .iter()
                    .position(|w| *w == k)
                    .and_then(|i| words.get(i + 1))
                    .copied()
            };
            let w = (|| {
                Some(EpollWatch {
                    fd: after("tfd:")?.parse().ok()?,
                    events: u32::from_str_radix(after("events:")?, 16).ok()?,
                    data: u64::from_str_radix(after("data:")?, 16).ok()?,
                })
            })();
            watches.push(w.ok_or_else(|| UnreadableWatch {
                line: line.to_string(),
            })?);
        }
        Ok(Epoll { flags, watches })
    }

    /// In the restore child: builds the epoll at `fd` (close-on-exec as
    /// `cloexec` says) with its watches, once every descriptor of the process
    /// it watches is in place. A watched descriptor the process does not
    /// have is left to epoll_ctl to refuse.
    pub fn restore_in_child(
        &self,
        fd: i32,
        cloexec: bool,
        fds: &ChildFds,
    ) -> Result<Restored<()>, OpenError> {
        if self.watches.iter().any(|w| fds.pending.contains(&w.fd)) {
            return Ok(Restored::NotYet);
        }
        // SAFETY: epoll_create1, dup2, fcntl, close and epoll_ctl on our own
        // descriptors, with an epoll_event we own.
        unsafe {
            let ep = libc::epoll_create1(libc::EPOLL_CLOEXEC);
            if ep < 0 {
                return Err(OpenError::last(fd, "epoll_create1"));
            }
            libc::dup2(ep, fd);
            libc::close(ep);
            libc::fcntl(fd, libc::F_SETFL, self.flags);
            libc::fcntl(
                fd,
                libc::F_SETFD,
                if cloexec { libc::FD_CLOEXEC } else { 0 },
            );
            for w in &self.watches {
                let mut ev = libc::epoll_event {
                    events: w.events,
                    u64: w.data,
                };
                if libc::epoll_ctl(fd, libc::EPOLL_CTL_ADD, w.fd, &mut ev) < 0 {
                    return Err(OpenError::last(fd, format!("epoll watch of fd {}", w.fd)));
                }
            }
        }
        Ok(Restored::Done(()))
    }

    pub fn describe(&self, cloexec: &str) -> String {
        let fds: Vec<String> = self.watches.iter().map(|w| w.fd.to_string()).collect();
        format!("epoll watching fds [{}]{cloexec}", fds.join(" "))
    }
}

/// An epoll crest does not carry: a watch in its fdinfo it cannot read.
#[derive(Debug, thiserror::Error)]
#[error("an epoll instance with an unreadable watch ({line})")]
pub struct UnreadableWatch {
    line: String,
}
