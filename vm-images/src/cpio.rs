//! A small writer and reader for the `newc` cpio format the kernel unpacks as
//! an initramfs.

use std::io::{self, Write};

const MAGIC: &[u8; 6] = b"070701";
const TRAILER: &str = "TRAILER!!!";

pub const S_IFDIR: u32 = 0o040000;
pub const S_IFREG: u32 = 0o100000;
pub const S_IFCHR: u32 = 0o020000;
pub const S_IFLNK: u32 = 0o120000;

/// One archive member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Path without a leading `/`.
    pub name: String,
    /// File type and permission bits.
    pub mode: u32,
    /// `(major, minor)` for device nodes.
    pub rdev: (u32, u32),
    pub data: Vec<u8>,
}

impl Entry {
    pub fn dir(name: &str, perm: u32) -> Self {
        Self::new(name, S_IFDIR | perm, Vec::new())
    }
    pub fn file(name: &str, perm: u32, data: Vec<u8>) -> Self {
        Self::new(name, S_IFREG | perm, data)
    }
    pub fn char_dev(name: &str, perm: u32, major: u32, minor: u32) -> Self {
        let mut e = Self::new(name, S_IFCHR | perm, Vec::new());
        e.rdev = (major, minor);
        e
    }
    pub fn symlink(name: &str, target: &str) -> Self {
        Self::new(name, S_IFLNK | 0o777, target.as_bytes().to_vec())
    }
    fn new(name: &str, mode: u32, data: Vec<u8>) -> Self {
        Entry {
            name: name.trim_start_matches('/').to_string(),
            mode,
            rdev: (0, 0),
            data,
        }
    }
}

fn pad4(w: &mut impl Write, len: usize) -> io::Result<()> {
    let pad = (4 - len % 4) % 4;
    w.write_all(&[0u8; 3][..pad])
}

fn write_one(w: &mut impl Write, ino: u32, e: &Entry) -> io::Result<()> {
    let size = u32::try_from(e.data.len()).map_err(|_| {
        io::Error::new(io::ErrorKind::InvalidInput, format!("{} too large", e.name))
    })?;
    let namesize = e.name.len() + 1;
    let nlink = if e.mode & 0o170000 == S_IFDIR { 2 } else { 1 };
    let fields = [
        ino,
        e.mode,
        0,
        0,
        nlink,
        0,
        size,
        0,
        0,
        e.rdev.0,
        e.rdev.1,
        namesize as u32,
        0,
    ];
    let mut hdr = Vec::with_capacity(110);
    hdr.extend_from_slice(MAGIC);
    for f in fields {
        hdr.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    w.write_all(&hdr)?;
    w.write_all(e.name.as_bytes())?;
    w.write_all(&[0])?;
    pad4(w, 110 + namesize)?;
    w.write_all(&e.data)?;
    pad4(w, e.data.len())
}

/// Writes `entries` and the trailer. Parents must come before children.
pub fn write_archive(w: &mut impl Write, entries: &[Entry]) -> io::Result<()> {
    for (i, e) in entries.iter().enumerate() {
        write_one(w, i as u32 + 1, e)?;
    }
    write_one(
        w,
        0,
        &Entry {
            name: TRAILER.into(),
            mode: 0,
            rdev: (0, 0),
            data: Vec::new(),
        },
    )
}

/// Parses a `newc` archive back (used by tests and `xtask` checks).
pub fn read_archive(mut b: &[u8]) -> Result<Vec<Entry>, String> {
    let total = b.len();
    let mut out = Vec::new();
    loop {
        let at = total - b.len();
        if b.len() < 110 {
            return Err(format!("truncated header at offset {at}"));
        }
        if &b[..6] != MAGIC {
            return Err(format!("bad magic at offset {at}"));
        }
        let field = |i: usize| -> Result<u32, String> {
            let s = std::str::from_utf8(&b[6 + i * 8..14 + i * 8]).map_err(|e| e.to_string())?;
            u32::from_str_radix(s, 16).map_err(|e| format!("bad field at offset {at}: {e}"))
        };
        let mode = field(1)?;
        let size = field(6)? as usize;
        let rdev = (field(9)?, field(10)?);
        let namesize = field(11)? as usize;
        let name_end = 110 + namesize;
        let data_start = name_end + (4 - name_end % 4) % 4;
        let data_end = data_start + size;
        if b.len() < data_end || namesize == 0 {
            return Err(format!("truncated entry at offset {at}"));
        }
        let name = std::str::from_utf8(&b[110..name_end - 1])
            .map_err(|e| e.to_string())?
            .to_string();
        if name == TRAILER {
            return Ok(out);
        }
        out.push(Entry {
            name,
            mode,
            rdev,
            data: b[data_start..data_end].to_vec(),
        });
        let next = (data_end + (4 - data_end % 4) % 4).min(b.len());
        b = &b[next..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let entries = vec![
            Entry::dir("dev", 0o755),
            Entry::char_dev("dev/console", 0o600, 5, 1),
            Entry::file("/init", 0o755, b"#!hello".to_vec()),
            Entry::file("crest/a", 0o644, vec![7; 5]),
            Entry::symlink("bin", "usr/bin"),
        ];
        let mut buf = Vec::new();
        write_archive(&mut buf, &entries).unwrap();
        assert_eq!(buf.len() % 4, 0);
        assert!(buf.starts_with(b"070701"));
        let back = read_archive(&buf).unwrap();
        assert_eq!(back, entries);
        assert_eq!(back[2].name, "init");
    }

    #[test]
    fn rejects_garbage() {
        assert!(read_archive(b"nope").is_err());
        let mut buf = Vec::new();
        write_archive(&mut buf, &[Entry::file("x", 0o644, vec![1; 100])]).unwrap();
        assert!(read_archive(&buf[..150]).is_err());
    }
}
