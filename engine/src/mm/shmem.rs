//! Shared memory objects: shared anonymous memory (MAP_SHARED|MAP_ANONYMOUS,
//! shared across fork) and unlinked files mapped shared (MPICH's deleted
//! `/dev/shm` segment, mapped by every rank).
//!
//! Collect saves each object once for the whole dump, whoever maps it, into
//! the blob `shmem-INODE.img` ([`save`]); it is an open file of the dump that
//! no descriptor holds. Restore creates it in the restorer (an anonymous
//! shared mapping filled with its contents and reopened through map_files,
//! or the file written under its old name and unlinked again), held at its
//! slot, and every process maps it from there.

use std::ffi::CString;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::fds::table::Opened;
use crate::image::Blob;
use crate::mm::{Backing, Vma};
use crate::sys::PAGE_SIZE;

/// A shared memory object: its contents are in `shmem-INODE.img`. With
/// `path`, an unlinked file mapped shared: recreated under that name (when
/// free) and unlinked again, so /proc shows "PATH (deleted)" as before.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shmem {
    pub inode: u64,
    pub size: u64,
    pub crc32c: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// The blob holding object `inode`'s contents.
pub fn contents(inode: u64) -> Blob {
    Blob::new("shmem", inode)
}

impl Shmem {
    /// Recreated in the restorer, held at its slot.
    pub fn restore(&self, dir: &Path) -> Result<Opened, ShmemError> {
        let fd = create(
            dir,
            self.inode,
            self.size,
            self.crc32c,
            self.path.as_deref(),
        )?;
        // SAFETY: a descriptor just created and owned by nothing else.
        Ok(Opened::new(unsafe { OwnedFd::from_raw_fd(fd) }, None))
    }

    pub fn describe(&self) -> String {
        match &self.path {
            Some(p) => format!(
                "shared memory object {} ({} bytes, {p} deleted)",
                self.inode, self.size
            ),
            None => format!("shared memory object {} ({} bytes)", self.inode, self.size),
        }
    }
}

/// Saves each shared anonymous memory object (and each unlinked file mapped
/// shared) once, whoever maps it (`procs`: each process's pid and mappings),
/// into `shmem-INODE.img`. `open_unlinked`: the unlinked files the processes
/// hold open (pid, path), which such a file must not be.
pub fn save(
    procs: &[(i32, &[Vma])],
    open_unlinked: &[(i32, String)],
    dir: &Path,
) -> Result<Vec<Shmem>> {
    let mut out = Vec::new();
    let mut seen: Vec<u64> = Vec::new();
    for &(pid, vmas) in procs {
        for v in vmas {
            let Backing::SharedAnon {
                inode, ref path, ..
            } = v.backing
            else {
                continue;
            };
            if seen.contains(&inode) {
                continue;
            }
            seen.push(inode);
            // An unlinked file the mapping came from may also be open as a
            // descriptor: restored apart, the two would no longer share pages.
            if let Some(path) = path {
                let open_too = open_unlinked.iter().find(|(_, p)| p == path);
                if let Some(&(q, _)) = open_too {
                    return Err(Error::unsupported(
                        q,
                        format!("{path} (deleted) is both mapped shared and open: this sharing"),
                    ));
                }
            }
            // map_files gives the object itself, not just this process's window.
            let src = format!("/proc/{pid}/map_files/{:x}-{:x}", v.start, v.end);
            let f = std::fs::File::open(&src).map_err(|e| Error::io(&src, e))?;
            // The object's size: as far as any process maps it, or the file's
            // length when that is longer (an unlinked file mapped in part).
            let file_len = if path.is_some() {
                f.metadata().map_err(|e| Error::io(&src, e))?.len()
            } else {
                0
            };
            let size = procs
                .iter()
                .flat_map(|(_, q)| q.iter())
                .filter_map(|w| match w.backing {
                    Backing::SharedAnon {
                        inode: i, offset, ..
                    } if i == inode => Some(offset + w.len()),
                    _ => None,
                })
                .max()
                .unwrap_or(0)
                .max(file_len);
            let mut data = vec![0u8; size as usize];
            // A file may end before the last mapped page: the rest reads as zeros.
            let got = read_up_to(&f, &mut data).map_err(|e| Error::io(&src, e))?;
            if got < size as usize && path.is_none() {
                return Err(Error::io(
                    &src,
                    std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
                ));
            }
            let blob = contents(inode);
            use std::io::Write;
            blob.create(dir)?
                .write_all(&data)
                .map_err(|e| Error::io(blob.path(dir), e))?;
            out.push(Shmem {
                inode,
                size,
                crc32c: crc32c::crc32c(&data),
                path: path.clone(),
            });
        }
    }
    Ok(out)
}

/// Reads from offset 0 until `buf` is full or the file ends; returns the bytes read.
fn read_up_to(f: &std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Recreates a shared anonymous memory object from `shmem-INODE.img`: an
/// anonymous shared mapping filled with its contents, reopened through
/// map_files so every process can map the same object (shown as
/// "/dev/zero (deleted)", as before).
fn create(
    dir: &Path,
    inode: u64,
    size: u64,
    crc: u32,
    original: Option<&str>,
) -> Result<i32, ShmemError> {
    let path = contents(inode).path(dir);
    let data = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
    if data.len() as u64 != size {
        return Err(Error::bad_image(
            &path,
            format!("truncated: {} bytes, {size} expected", data.len()),
        )
        .into());
    }
    if crc32c::crc32c(&data) != crc {
        return Err(Error::bad_image(&path, "checksum mismatch").into());
    }
    if let Some(file) = original {
        return create_unlinked_shared(file, inode, &data);
    }
    let len = (size as usize).max(PAGE_SIZE as usize);
    // SAFETY: a fresh shared anonymous mapping of `len` bytes that we fill,
    // reopen through map_files and unmap again.
    unsafe {
        let m = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if m == libc::MAP_FAILED {
            return Err(ShmemError::Sys {
                inode,
                what: format!("mmap of {size} bytes"),
                source: std::io::Error::last_os_error(),
            });
        }
        std::ptr::copy_nonoverlapping(data.as_ptr(), m.cast::<u8>(), data.len());
        let link = CString::new(format!(
            "/proc/self/map_files/{:x}-{:x}",
            m as usize,
            m as usize + len
        ))
        .expect("no NUL");
        let fd = libc::open(link.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
        let e = std::io::Error::last_os_error();
        libc::munmap(m, len);
        if fd < 0 {
            return Err(ShmemError::Sys {
                inode,
                what: "reopening it".into(),
                source: e,
            });
        }
        Ok(fd)
    }
}

/// Recreates an unlinked file that was mapped shared: written under its old
/// name when that is free (so /proc shows the same "PATH (deleted)"), else
/// beside it, and unlinked again; the returned fd keeps it alive.
fn create_unlinked_shared(file: &str, inode: u64, data: &[u8]) -> Result<i32, ShmemError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let create = |p: &str| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(p)
    };
    let failed = |what: String| {
        move |source| ShmemError::Sys {
            inode,
            what,
            source,
        }
    };
    let beside = format!("{file}.crest-{inode}");
    let (name, mut f) = match create(file) {
        Ok(f) => (file.to_string(), f),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => (
            beside.clone(),
            create(&beside).map_err(failed(format!("recreating {beside}")))?,
        ),
        Err(e) => return Err(failed(format!("recreating {file}"))(e)),
    };
    let written = f.write_all(data);
    let _ = std::fs::remove_file(&name);
    written.map_err(failed(format!("writing {name}")))?;
    Ok(std::os::fd::IntoRawFd::into_raw_fd(f))
}

/// Why a shared memory object could not be recreated: a step failed, or its
/// saved contents are missing or damaged.
#[derive(Debug, thiserror::Error)]
pub enum ShmemError {
    #[error("shared memory {inode}: {what}: {source}")]
    Sys {
        inode: u64,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Image(#[from] Error),
}
