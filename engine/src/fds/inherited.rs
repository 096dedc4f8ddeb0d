//! stdin, stdout and stderr pointing outside the dump (a terminal, or a pipe
//! or socket to a process not dumped): rebound at restore to the restorer's
//! own, as a shell job's stdio follows the shell that restores it.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inherited {
    /// What it was at dump time (`/dev/pts/3`, `pipe:[1234]`…), for messages.
    pub was: String,
}

impl Inherited {
    /// In the restore child: descriptor `fd` stays the restorer's own; if
    /// that is closed, it gets /dev/null rather than nothing.
    pub fn restore_in_child(&self, fd: i32) {
        // SAFETY: fcntl, open, dup2 and close on our own descriptors.
        unsafe {
            if libc::fcntl(fd, libc::F_GETFD) < 0 {
                let n = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
                if n >= 0 && n != fd {
                    libc::dup2(n, fd);
                    libc::close(n);
                }
            }
        }
    }

    pub fn describe(&self) -> String {
        format!("rebound to the restorer's own (was {})", self.was)
    }
}
