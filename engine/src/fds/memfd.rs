//! memfd objects, held as descriptors, mapped, or both.
//!
//! Collect notes each memfd descriptor (name, inode, flags, offset; the
//! memory module notes each mapping of one); once every process is
//! collected, each object is saved once for the whole dump ([`save`],
//! [`Memfd::mapped`]) — its contents in the blob `memfd-INODE.img` (sparse:
//! all-zero blocks are holes), its size, mode and seals (F_GET_SEALS) — and
//! all its descriptors become one open file (a second, separately opened
//! description of the same memfd is refused).
//!
//! Restore: the restorer creates each object with its name (so /proc shows
//! "/memfd:NAME (deleted)" again), fills it, and holds it at its shared slot;
//! processes inherit the descriptor and map it through `/proc/self/fd/SLOT`.
//! Seals are applied last, once every process is mapped ([`seal`]), since a
//! write seal would forbid the writable shared mappings restore makes.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::fds::table::{access, Opened};
use crate::image::Blob;

/// One memfd object and, when a descriptor holds it, that open file description.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Memfd {
    pub inode: u64,
    /// The name given to memfd_create (without the "memfd:" prefix).
    pub name: String,
    pub size: u64,
    /// Permission bits (0777, or 0666 for MFD_NOEXEC_SEAL).
    pub mode: u32,
    /// F_SEAL_* bits (F_SEAL_SEAL when sealing was never allowed).
    pub seals: i32,
    /// crc32c of the `size` bytes of contents.
    pub crc32c: u32,
    /// Open flags of the description (access mode, O_APPEND, O_NONBLOCK…).
    pub flags: i32,
    /// Its offset.
    pub pos: u64,
}

impl Memfd {
    /// A memfd descriptor as [`crate::fds::collect`] sees it; [`save`] fills the rest.
    pub fn from_fd(inode: u64, link: &str, flags: i32, pos: u64) -> Option<Memfd> {
        let name = link.strip_prefix("/memfd:")?.strip_suffix(" (deleted)")?;
        Some(Memfd {
            inode,
            name: name.to_string(),
            size: 0,
            mode: 0,
            seals: 0,
            crc32c: 0,
            flags,
            pos,
        })
    }
}

/// The blob holding memfd `inode`'s contents.
pub fn contents(inode: u64) -> Blob {
    Blob::new("memfd", inode)
}

const CHUNK: usize = 1 << 20;
const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

/// Reads size, mode and seals of the memfd open at `src` and copies its
/// contents into the image (sparse). `pid` and `what` name it in errors.
pub fn save(pid: i32, what: &str, src: &str, dir: &Path, m: &mut Memfd) -> Result<()> {
    let f = std::fs::File::open(src).map_err(|e| Error::io(src, e))?;
    let meta = f.metadata().map_err(|e| Error::io(src, e))?;
    // SAFETY: fstatfs writes into a struct we own.
    let fs_type = unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::fstatfs(f.as_raw_fd(), &mut st);
        st.f_type
    };
    if fs_type == HUGETLBFS_MAGIC {
        return Err(Error::unsupported(
            pid,
            format!("{what} is a hugetlb memfd (MFD_HUGETLB)"),
        ));
    }
    // SAFETY: fcntl on a file we own.
    let seals = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 {
        return Err(Error::sys(
            pid,
            format!("{what}: F_GET_SEALS"),
            nix::errno::Errno::last(),
        ));
    }
    m.inode = meta.ino();
    m.size = meta.len();
    m.mode = meta.mode() & 0o7777;
    m.seals = seals;
    let blob = contents(m.inode);
    let path = blob.path(dir);
    let mut out = blob.create(dir)?;
    let mut buf = vec![0u8; CHUNK];
    let mut crc = 0u32;
    let mut off = 0u64;
    while off < m.size {
        let n = ((m.size - off) as usize).min(CHUNK);
        f.read_exact_at(&mut buf[..n], off)
            .map_err(|e| Error::io(src, e))?;
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        if buf[..n].iter().all(|&b| b == 0) {
            out.seek(SeekFrom::Current(n as i64))
                .map_err(|e| Error::io(&path, e))?;
        } else {
            out.write_all(&buf[..n]).map_err(|e| Error::io(&path, e))?;
        }
        off += n as u64;
    }
    out.set_len(m.size).map_err(|e| Error::io(&path, e))?;
    m.crc32c = crc;
    Ok(())
}

impl Memfd {
    /// A memfd only mapped (no descriptor holds it), saved through the
    /// mapping `[start, end)` of `pid`.
    pub fn mapped(
        pid: i32,
        start: u64,
        end: u64,
        inode: u64,
        name: &str,
        dir: &Path,
    ) -> Result<Memfd> {
        let what = format!("mapping {start:#x}-{end:#x} (memfd {name})");
        let mut m = Memfd {
            inode,
            name: name.to_string(),
            size: 0,
            mode: 0,
            seals: 0,
            crc32c: 0,
            flags: libc::O_RDWR,
            pos: 0,
        };
        let src = format!("/proc/{pid}/map_files/{start:x}-{end:x}");
        save(pid, &what, &src, dir, &mut m)?;
        Ok(m)
    }

    /// Recreated by the restorer ([`create`]), at its slot.
    pub fn restore(&self, dir: &Path) -> Result<Opened, MemfdError> {
        Ok(Opened::new(
            create(dir, self)?,
            Some(self.flags & !libc::O_ACCMODE),
        ))
    }

    pub fn describe(&self, shared: bool, cloexec: &str) -> String {
        let text = format!(
            "memfd:{} ({}, offset {}, {} bytes saved, mode {:o}, seals {:#x})",
            self.name,
            access(self.flags),
            self.pos,
            self.size,
            self.mode,
            self.seals
        );
        if shared {
            format!("{text} (shared{cloexec})")
        } else {
            format!("{text}{cloexec}")
        }
    }
}

/// Creates memfd `m` with its name, mode and contents (not sealed yet; see
/// [`seal`]), opened with its access mode and at its offset. The caller sets
/// the status flags and places the fd.
pub fn create(dir: &Path, m: &Memfd) -> Result<OwnedFd, MemfdError> {
    let path = contents(m.inode).path(dir);
    let what = |what: String| {
        let name = m.name.clone();
        move |source| MemfdError::Sys { name, what, source }
    };
    let last = |w: String| {
        let source = std::io::Error::last_os_error();
        what(w)(source)
    };
    let name = std::ffi::CString::new(m.name.as_str())
        .map_err(|_| Error::bad_image(&path, "memfd name with a NUL byte"))?;
    // SAFETY: memfd_create takes a NUL-terminated name and returns a new fd we own.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(last("memfd_create".into()));
    }
    // SAFETY: fd is fresh and ours.
    let file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    // SAFETY: fchmod on our own fd.
    if unsafe { libc::fchmod(fd, m.mode) } < 0 {
        return Err(last(format!("fchmod {:o}", m.mode)));
    }
    file.set_len(m.size)
        .map_err(what(format!("ftruncate to {} bytes", m.size)))?;
    let mut src = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
    let len = src.metadata().map_err(|e| Error::io(&path, e))?.len();
    if len != m.size {
        return Err(Error::bad_image(&path, format!("{len} bytes, {} expected", m.size)).into());
    }
    let mut buf = vec![0u8; CHUNK];
    let mut crc = 0u32;
    let mut off = 0u64;
    while off < m.size {
        let n = ((m.size - off) as usize).min(CHUNK);
        src.read_exact(&mut buf[..n])
            .map_err(|e| Error::io(&path, e))?;
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        if !buf[..n].iter().all(|&b| b == 0) {
            file.write_all_at(&buf[..n], off)
                .map_err(what("writing its contents".into()))?;
        }
        off += n as u64;
    }
    if crc != m.crc32c {
        return Err(Error::bad_image(&path, "checksum mismatch").into());
    }
    let file: OwnedFd = if m.flags & libc::O_ACCMODE != libc::O_RDWR {
        // Another access mode: a new description of the same object.
        let again = std::fs::OpenOptions::new()
            .read(m.flags & libc::O_ACCMODE == libc::O_RDONLY)
            .write(m.flags & libc::O_ACCMODE == libc::O_WRONLY)
            .open(format!("/proc/self/fd/{fd}"))
            .map_err(what("reopening it".into()))?;
        again.into()
    } else {
        file.into()
    };
    // SAFETY: lseek on the fd we own.
    if unsafe { libc::lseek(file.as_raw_fd(), m.pos as i64, libc::SEEK_SET) } < 0 {
        return Err(last(format!("seek to {}", m.pos)));
    }
    Ok(file)
}

/// Applies memfd `m`'s seals to the restored object held at `fd`.
pub fn seal(fd: i32, m: &Memfd) -> Result<(), MemfdError> {
    if m.seals == 0 {
        return Ok(());
    }
    // F_ADD_SEALS needs a writable description; the one held may be read-only.
    let rw = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/self/fd/{fd}"))
        .map_err(|source| MemfdError::Sys {
            name: m.name.clone(),
            what: "reopening it to seal it".into(),
            source,
        })?;
    // SAFETY: fcntl on a file we own.
    if unsafe { libc::fcntl(rw.as_raw_fd(), libc::F_ADD_SEALS, m.seals) } < 0 {
        return Err(MemfdError::Sys {
            name: m.name.clone(),
            what: format!("sealing it ({:#x})", m.seals),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Why a memfd could not be recreated: a step on it failed, or its saved
/// contents are missing or damaged.
#[derive(Debug, thiserror::Error)]
pub enum MemfdError {
    #[error("memfd {name}: {what}: {source}")]
    Sys {
        name: String,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Image(#[from] Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_the_link() {
        let m = Memfd::from_fd(7, "/memfd:a name (deleted)", libc::O_RDWR, 3).unwrap();
        assert_eq!((m.name.as_str(), m.inode, m.pos), ("a name", 7, 3));
        assert!(Memfd::from_fd(7, "/tmp/x (deleted)", 0, 0).is_none());
    }

    #[test]
    fn save_and_create_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let name = std::ffi::CString::new("crest-test").unwrap();
        // SAFETY: a fresh memfd we own.
        let fd = unsafe {
            OwnedFd::from_raw_fd(libc::memfd_create(name.as_ptr(), libc::MFD_ALLOW_SEALING))
        };
        let f = std::fs::File::from(fd);
        f.set_len(3 * CHUNK as u64 + 5).unwrap();
        f.write_all_at(b"hello", 10).unwrap();
        f.write_all_at(b"tail!", 3 * CHUNK as u64).unwrap();
        // SAFETY: fcntl on our memfd.
        unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_GROW) };
        let mut m = Memfd::from_fd(0, "/memfd:crest-test (deleted)", libc::O_RDONLY, 11).unwrap();
        let src = format!("/proc/self/fd/{}", f.as_raw_fd());
        save(0, "test", &src, dir.path(), &mut m).unwrap();
        assert_eq!((m.size, m.seals), (3 * CHUNK as u64 + 5, libc::F_SEAL_GROW));
        let back = create(dir.path(), &m).unwrap();
        seal(back.as_raw_fd(), &m).unwrap();
        let link = std::fs::read_link(format!("/proc/self/fd/{}", back.as_raw_fd())).unwrap();
        assert_eq!(link.to_str(), Some("/memfd:crest-test (deleted)"));
        let b = std::fs::File::from(back);
        let mut buf = [0u8; 5];
        b.read_exact_at(&mut buf, 10).unwrap();
        assert_eq!(&buf, b"hello");
        b.read_exact_at(&mut buf, 3 * CHUNK as u64).unwrap();
        assert_eq!(&buf, b"tail!");
        // SAFETY: fcntl on our fd.
        let seals = unsafe { libc::fcntl(b.as_raw_fd(), libc::F_GET_SEALS) };
        assert_eq!(seals, libc::F_SEAL_GROW);
        // SAFETY: lseek on our fd.
        assert_eq!(unsafe { libc::lseek(b.as_raw_fd(), 0, libc::SEEK_CUR) }, 11);
        assert!(b.write_all_at(b"x", 0).is_err(), "opened read-only again");
    }
}
