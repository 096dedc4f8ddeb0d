//! Files reopened by path: regular files (at their offset), open directories
//! (at their readdir position, the filesystem's own cookie, which lseek takes
//! back) and stateless character devices (/dev/null, zero, urandom…).
//!
//! Collect reads the path, flags and offset from `/proc/PID/fd` and fdinfo,
//! and a regular file's identity (inode, size, mtime; or a hash of its
//! contents with `dump --verify-files=hash`). Restore first checks that the
//! file is still the one dumped ([`Regular::verify`]), then opens it in the
//! restore child, or in the restorer when several processes share it.

use std::os::unix::fs::MetadataExt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::fds::table::{access, open_path, OpenError};

/// What a file looked like at dump time, to notice it changed before a restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileIdentity {
    pub dev: u64,
    pub inode: u64,
    pub size: u64,
    pub mtime_ns: i64,
    /// crc32c of the contents (`crest dump --verify-files=hash`): when set,
    /// the file counts as unchanged if its contents are, whatever its inode
    /// or mtime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crc32c: Option<u32>,
}

impl FileIdentity {
    pub fn of(meta: &std::fs::Metadata) -> FileIdentity {
        FileIdentity {
            dev: meta.dev(),
            inode: meta.ino(),
            size: meta.size(),
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
            crc32c: None,
        }
    }

    /// crc32c of the file at `path`, read in 1 MiB pieces.
    pub fn content_crc(path: &str) -> std::io::Result<u32> {
        use std::io::Read;
        let mut f = std::fs::File::open(path)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut crc = 0u32;
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                return Ok(crc);
            }
            crc = crc32c::crc32c_append(crc, &buf[..n]);
        }
    }
}

/// A regular file, reopened by path at its offset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Regular {
    pub path: String,
    /// open(2) flags: access mode, O_APPEND, O_NONBLOCK, O_DIRECT…
    pub flags: i32,
    pub pos: u64,
    pub identity: FileIdentity,
}

/// An open directory, reopened by path at its readdir position.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Directory {
    pub path: String,
    pub flags: i32,
    pub pos: u64,
}

/// A character device reopened by path (/dev/null, /dev/zero, /dev/urandom…).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Device {
    pub path: String,
    pub flags: i32,
}

/// Devices reopened by path: they carry no state of their own.
pub const STATELESS_DEVICES: &[&str] = &[
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
];

impl Regular {
    /// A regular file open at `link`, from its metadata and fdinfo.
    pub fn collect(link: String, meta: &std::fs::Metadata, flags: i32, pos: u64) -> Regular {
        Regular {
            path: link,
            flags,
            pos,
            identity: FileIdentity::of(meta),
        }
    }

    /// `crest dump --verify-files=hash`: records the contents' checksum.
    pub fn record_hash(&mut self, pid: i32) -> Result<()> {
        self.identity.crc32c =
            Some(
                FileIdentity::content_crc(&self.path).map_err(|e| Error::Refused {
                    pid,
                    reason: format!("cannot read {} to hash it: {e}", self.path),
                })?,
            );
        Ok(())
    }

    /// Checks before a restore that the file is still the one dumped (same
    /// inode, size and mtime, or the same contents); `pid` and `fd` name a
    /// descriptor of it in the message.
    pub fn verify(&self, pid: i32, fd: i32) -> Result<(), FileChanged> {
        let path = &self.path;
        let identity = &self.identity;
        let unreadable = |source| FileChanged::Unreadable {
            pid,
            fd,
            path: path.clone(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(unreadable)?;
        if let Some(crc) = identity.crc32c {
            let now = FileIdentity::content_crc(path).map_err(unreadable)?;
            if now != crc {
                return Err(FileChanged::Contents {
                    pid,
                    fd,
                    path: path.clone(),
                });
            }
            return Ok(());
        }
        let now = FileIdentity::of(&meta);
        if now != *identity {
            let path = path.clone();
            return Err(if now.inode != identity.inode || now.dev != identity.dev {
                FileChanged::Replaced { pid, fd, path }
            } else if now.size != identity.size {
                FileChanged::Resized {
                    pid,
                    fd,
                    path,
                    from: identity.size,
                    to: now.size,
                }
            } else {
                FileChanged::Modified { pid, fd, path }
            });
        }
        Ok(())
    }

    pub fn open(&self, at: i32) -> Result<i32, OpenError> {
        open_path(at, &self.path, self.flags, Some(self.pos))
    }

    pub fn describe(&self, shared: bool, cloexec: &str) -> String {
        if shared {
            format!(
                "{} (shared with other processes, offset {}{cloexec})",
                self.path, self.pos
            )
        } else {
            format!(
                "{} ({}, offset {}, {} bytes{cloexec})",
                self.path,
                access(self.flags),
                self.pos,
                self.identity.size
            )
        }
    }
}

impl Directory {
    pub fn open(&self, at: i32) -> Result<i32, OpenError> {
        open_path(at, &self.path, self.flags, Some(self.pos))
    }

    pub fn describe(&self, shared: bool, cloexec: &str) -> String {
        if shared {
            format!(
                "{}, a directory (shared with other processes, position {}{cloexec})",
                self.path, self.pos
            )
        } else {
            format!(
                "{}, a directory (position {}{cloexec})",
                self.path, self.pos
            )
        }
    }
}

impl Device {
    pub fn open(&self, at: i32) -> Result<i32, OpenError> {
        open_path(at, &self.path, self.flags, None)
    }

    pub fn describe(&self, shared: bool, cloexec: &str) -> String {
        if shared {
            format!("{} (shared with other processes{cloexec})", self.path)
        } else {
            format!("{} ({}{cloexec})", self.path, access(self.flags))
        }
    }
}

/// A regular file that is not the one dumped: the restore stops (or, with
/// `--allow-changed-files`, warns and goes on).
#[derive(Debug, thiserror::Error)]
pub enum FileChanged {
    #[error("pid {pid}: fd {fd}: {path}: {source}")]
    Unreadable {
        pid: i32,
        fd: i32,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "pid {pid}: fd {fd}: {path}: its contents changed since the dump (their hash differs)"
    )]
    Contents { pid: i32, fd: i32, path: String },
    #[error("pid {pid}: fd {fd}: {path} was replaced by another file since the dump")]
    Replaced { pid: i32, fd: i32, path: String },
    #[error("pid {pid}: fd {fd}: {path} size changed from {from} to {to} bytes since the dump")]
    Resized {
        pid: i32,
        fd: i32,
        path: String,
        from: u64,
        to: u64,
    },
    #[error("pid {pid}: fd {fd}: {path} was modified (mtime changed) since the dump")]
    Modified { pid: i32, fd: i32, path: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What collect reads of descriptor `fd` of this process.
    fn collect_own(fd: i32) -> Regular {
        let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap();
        let meta = std::fs::metadata(format!("/proc/self/fd/{fd}")).unwrap();
        let info = crate::sys::proc::parse_fdinfo(
            &std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap(),
        );
        Regular::collect(
            link.to_string_lossy().into_owned(),
            &meta,
            info.flags & crate::fds::table::REOPEN_MASK,
            info.pos,
        )
    }

    /// Collect, restore, collect again: the same file at the same offset
    /// with the same flags, and still the file that was dumped.
    #[test]
    fn round_trip() {
        use std::io::{Seek, SeekFrom, Write};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&path)
            .unwrap();
        f.write_all(b"0123456789").unwrap();
        f.seek(SeekFrom::Start(4)).unwrap();
        let saved = collect_own(std::os::fd::AsRawFd::as_raw_fd(&f));
        assert_eq!(saved.pos, 4);
        drop(f);
        saved.verify(1, 3).unwrap();
        let fd = saved.open(3).unwrap();
        // SAFETY: a descriptor open_path just returned to us.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        assert_eq!(collect_own(std::os::fd::AsRawFd::as_raw_fd(&fd)), saved);
    }

    #[test]
    fn a_file_changed_since_the_dump_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        std::fs::write(&path, b"before").unwrap();
        let f = std::fs::File::open(&path).unwrap();
        let saved = collect_own(std::os::fd::AsRawFd::as_raw_fd(&f));
        std::fs::write(&path, b"after, longer").unwrap();
        let e = saved.verify(7, 4).unwrap_err();
        assert!(
            matches!(
                e,
                FileChanged::Resized {
                    from: 6,
                    to: 13,
                    ..
                }
            ),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            format!(
                "pid 7: fd 4: {} size changed from 6 to 13 bytes since the dump",
                path.display()
            )
        );
    }
}
