//! `crest dump --save-files[=GLOB]`: the contents of open regular files become
//! part of the image (`file-N.img`), and `crest restore
//! --restore-files=clobber|anonymous` gives them back: written back over the
//! file at its path (clobber), or as an unlinked copy the process holds open
//! in its place (anonymous), whatever the file looks like now.
//!
//! `crest dump --include-file PATH`: a file no process has open becomes part
//! of the image too, and every restore puts it back at its path.
//!
//! The contents are blobs `file-N.img`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::fds::regular::{FileIdentity, Regular};
use crate::fds::unlinked::Unlinked;
use crate::fds::{FileKind, OpenFiles};
use crate::image::Blob;

/// One saved file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedFile {
    pub path: String,
    pub size: u64,
    /// Permission bits, for a file clobber creates anew.
    pub mode: u32,
    pub crc32c: u32,
    /// Its contents' file in the image directory.
    pub image: String,
    /// Named with `--include-file` (not necessarily open): always put back.
    #[serde(default)]
    pub included: bool,
}

/// How `crest restore` gives saved files back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreFiles {
    /// Write the saved contents back to the file's path.
    Clobber,
    /// Open an unlinked copy with the saved contents instead of the file.
    Anonymous,
}

/// Whether `path` matches shell glob `glob` (fnmatch(3), `*` crossing `/`).
fn matches(glob: &str, path: &str) -> bool {
    let (Ok(g), Ok(p)) = (std::ffi::CString::new(glob), std::ffi::CString::new(path)) else {
        return false;
    };
    // SAFETY: both are NUL-terminated strings we own.
    unsafe { libc::fnmatch(g.as_ptr(), p.as_ptr(), 0) == 0 }
}

fn regular_paths(files: &OpenFiles) -> Vec<&str> {
    let mut out: Vec<&str> = Vec::new();
    for f in files.iter() {
        if let FileKind::Regular(Regular { path, .. }) = &f.kind {
            if !out.contains(&path.as_str()) {
                out.push(path);
            }
        }
    }
    out
}

/// The blob of saved file number `n`.
fn blob(n: usize) -> Blob {
    Blob::new("file", n as u64)
}

/// Saves every open regular file whose path matches `glob` into `dir`.
pub fn save(files: &OpenFiles, glob: &str, dir: &Path) -> Result<Vec<SavedFile>> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    for path in regular_paths(files) {
        if !matches(glob, path) {
            continue;
        }
        let data = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        let b = blob(out.len());
        let image = b.name();
        use std::io::Write;
        b.create(dir)?
            .write_all(&data)
            .map_err(|e| Error::io(b.path(dir), e))?;
        out.push(SavedFile {
            path: path.to_string(),
            size: data.len() as u64,
            mode: meta.mode() & 0o7777,
            crc32c: crc32c::crc32c(&data),
            image,
            included: false,
        });
    }
    Ok(out)
}

/// Saves the files named with `--include-file` (after `saved`, which they extend).
pub fn include(paths: &[std::path::PathBuf], dir: &Path, saved: &mut Vec<SavedFile>) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    for p in paths {
        let abs = std::path::absolute(p).map_err(|e| Error::io(p, e))?;
        let path = abs.to_string_lossy().into_owned();
        let meta = std::fs::metadata(&abs).map_err(|e| Error::io(&abs, e))?;
        if !meta.is_file() {
            return Err(Error::Refused {
                pid: 0,
                reason: format!("--include-file {path}: not a regular file"),
            });
        }
        let data = std::fs::read(&abs).map_err(|e| Error::io(&abs, e))?;
        let b = blob(saved.len());
        let image = b.name();
        use std::io::Write;
        b.create(dir)?
            .write_all(&data)
            .map_err(|e| Error::io(b.path(dir), e))?;
        saved.push(SavedFile {
            path,
            size: data.len() as u64,
            mode: meta.mode() & 0o7777,
            crc32c: crc32c::crc32c(&data),
            image,
            included: true,
        });
    }
    Ok(())
}

fn write_back(s: &SavedFile, data: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(s.mode)
        .open(&s.path)
        .map_err(|e| Error::io(&s.path, e))?;
    f.write_all(data).map_err(|e| Error::io(&s.path, e))
}

/// Puts every `--include-file` file back at its path, as it was at the dump.
pub fn put_back_included(dir: &Path, saved: &[SavedFile]) -> Result<()> {
    for s in saved.iter().filter(|s| s.included) {
        let data = read_saved(dir, s)?;
        write_back(s, &data)?;
    }
    Ok(())
}

fn read_saved(dir: &Path, s: &SavedFile) -> Result<Vec<u8>> {
    if s.image.contains('/') {
        return Err(Error::bad_image(
            dir,
            format!("saved file name {:?}", s.image),
        ));
    }
    let src = dir.join(&s.image);
    let data = std::fs::read(&src).map_err(|e| Error::io(&src, e))?;
    if data.len() as u64 != s.size || crc32c::crc32c(&data) != s.crc32c {
        return Err(Error::bad_image(&src, "truncated or checksum mismatch"));
    }
    Ok(data)
}

/// Gives the saved files back before a restore: clobber writes them to their
/// paths (the restore then opens them as usual); anonymous turns each
/// descriptor of one into an unlinked copy with the saved contents. Either way
/// the file is no longer checked against its dump-time identity.
pub fn apply(
    dir: &Path,
    saved: &[SavedFile],
    how: RestoreFiles,
    files: &mut OpenFiles,
) -> Result<()> {
    for s in saved {
        let data = read_saved(dir, s)?;
        match how {
            RestoreFiles::Clobber => write_back(s, &data)?,
            RestoreFiles::Anonymous => {}
        }
        for f in files.iter_mut() {
            let FileKind::Regular(r) = &mut f.kind else {
                continue;
            };
            if r.path != s.path {
                continue;
            }
            match how {
                RestoreFiles::Clobber => {
                    let meta = std::fs::metadata(&s.path).map_err(|e| Error::io(&s.path, e))?;
                    r.identity = FileIdentity::of(&meta);
                }
                RestoreFiles::Anonymous => {
                    f.kind = FileKind::Unlinked(Unlinked {
                        path: r.path.clone(),
                        flags: r.flags,
                        pos: r.pos,
                        contents: data.clone(),
                    });
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_cross_directories() {
        assert!(matches("*", "/a/b/c"));
        assert!(matches("/data/*.log", "/data/x/y.log"));
        assert!(!matches("/data/*.log", "/other/y.log"));
    }
}
