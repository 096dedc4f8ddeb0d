//! Regular files unlinked while open: their contents are saved; restore
//! recreates each (at its old path when free, so /proc shows the same
//! "PATH (deleted)"), opens it with its flags and offset, and unlinks it again.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::fds::regular::open_path;
use crate::fds::table::access;

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
    /// Fd `fd` of `pid`, open on `path` (deleted): its contents, or the
    /// reason it is not carried (`Ok(Err)`).
    pub fn collect(
        pid: i32,
        fd: i32,
        path: &str,
        flags: i32,
        pos: u64,
    ) -> Result<std::result::Result<Unlinked, String>> {
        let fdpath = format!("/proc/{pid}/fd/{fd}");
        let meta = std::fs::metadata(&fdpath).map_err(|e| Error::io(&fdpath, e))?;
        if !meta.file_type().is_file() {
            return Ok(Err(format!(
                "a deleted {path} (deleted), not a regular file"
            )));
        }
        if meta.len() > MAX_UNLINKED {
            return Ok(Err(format!(
                "an unlinked file of {} bytes (more than {MAX_UNLINKED} are not saved yet)",
                meta.len()
            )));
        }
        let contents = std::fs::read(&fdpath).map_err(|e| Error::io(&fdpath, e))?;
        Ok(Ok(Unlinked {
            path: path.to_string(),
            flags,
            pos,
            contents,
        }))
    }

    /// Recreates the file: written under its old name when that is free
    /// (so /proc shows the same "PATH (deleted)"), else beside it, then
    /// opened with its flags and offset, and unlinked again.
    pub fn open(&self, at: i32) -> std::result::Result<i32, String> {
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
        let mut file = created.map_err(|e| format!("fd {at}: recreating unlinked {path}: {e}"))?;
        file.write_all(&self.contents)
            .map_err(|e| format!("fd {at}: recreating unlinked {path}: {e}"))?;
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
