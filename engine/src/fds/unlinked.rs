//! Regular files unlinked while open: their contents are saved; restore
//! recreates each (at its old path when free, so /proc shows the same
//! "PATH (deleted)"), opens it with its flags and offset, and unlinks it again.

use serde::{Deserialize, Serialize};

use crate::error::{CollectError, Error};
use crate::fds::table::{access, open_path, OpenError};

/// Largest unlinked file whose contents a dump saves.
pub const MAX_UNLINKED: u64 = 64 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Unlinked {
    pub path: String,
    pub flags: i32,
    pub pos: u64,
    #[serde(with = "crate::image::hex_bytes")]
    pub contents: Vec<u8>,
}

impl Unlinked {
    /// Fd `fd` of `pid`, open on `path` (deleted): its contents.
    pub fn collect(
        pid: i32,
        fd: i32,
        path: &str,
        flags: i32,
        pos: u64,
    ) -> Result<Unlinked, CollectError> {
        let fdpath = format!("/proc/{pid}/fd/{fd}");
        let meta = std::fs::metadata(&fdpath).map_err(|e| Error::io(&fdpath, e))?;
        if !meta.file_type().is_file() {
            return Err(CollectError::not_carried(NotCarried::NotRegular {
                path: path.to_string(),
            }));
        }
        if meta.len() > MAX_UNLINKED {
            return Err(CollectError::not_carried(NotCarried::TooBig {
                size: meta.len(),
            }));
        }
        let contents = std::fs::read(&fdpath).map_err(|e| Error::io(&fdpath, e))?;
        Ok(Unlinked {
            path: path.to_string(),
            flags,
            pos,
            contents,
        })
    }

    /// Recreates the file: written under its old name when that is free
    /// (so /proc shows the same "PATH (deleted)"), else beside it, then
    /// opened with its flags and offset, and unlinked again.
    pub fn open(&self, at: i32) -> Result<i32, OpenError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = &self.path;
        let mut name = path.to_string();
        let created = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&name)
            .or_else(|_| {
                name = format!("{path}.crest-{}", std::process::id());
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&name)
            });
        let recreating = |source| OpenError::Sys {
            fd: at,
            what: format!("recreating unlinked {path}"),
            source,
        };
        let mut file = created.map_err(recreating)?;
        file.write_all(&self.contents).map_err(recreating)?;
        drop(file);
        let fd = open_path(at, &name, self.flags, Some(self.pos));
        let _ = std::fs::remove_file(&name);
        fd
    }

    pub fn describe(&self, cloexec: &str) -> String {
        format!(
            "{}, unlinked ({}, offset {}, {} bytes saved{cloexec})",
            self.path,
            access(self.flags),
            self.pos,
            self.contents.len()
        )
    }
}

/// An unlinked file crest does not carry.
#[derive(Debug, thiserror::Error)]
pub enum NotCarried {
    #[error("a deleted {path} (deleted), not a regular file")]
    NotRegular { path: String },
    #[error("an unlinked file of {size} bytes (more than {max} are not saved yet)", max = MAX_UNLINKED)]
    TooBig { size: u64 },
}
