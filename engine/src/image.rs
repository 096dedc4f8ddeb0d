//! The image container: a directory holding `meta.crest` (a fixed header and
//! checksummed metadata records) and one raw `pages-PID.img` per process whose
//! page data is laid out page-aligned so restore can copy it straight into place.
//!
//! `meta.crest` layout (little endian):
//! ```text
//! 0   8  magic "CRESTIMG"
//! 8   4  format version
//! 12  4  header length H
//! 16  4  crc32c of the header bytes
//! 20  H  header (JSON: format version, arch, engine version, kernel)
//! then records until EOF, each:
//!     4  record kind   4  payload length L   4  crc32c of payload   L  payload (JSON)
//! ```
//! The header is readable without decoding anything else, so a tool can say
//! which version wrote an image it cannot read.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub const MAGIC: &[u8; 8] = b"CRESTIMG";
/// Bumped whenever a record's meaning changes; readers refuse other versions.
pub const FORMAT_VERSION: u32 = 1;
pub const META_FILE: &str = "meta.crest";
/// Cap on the metadata file and any one record, so a hostile image cannot make
/// us allocate without bound.
const MAX_META_BYTES: u64 = 1 << 30;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    pub format_version: u32,
    pub arch: String,
    pub engine_version: String,
    /// `uname -r` of the kernel the dump ran on.
    pub kernel: String,
}

impl Header {
    pub fn current() -> Header {
        Header {
            format_version: FORMAT_VERSION,
            arch: std::env::consts::ARCH.to_string(),
            engine_version: env!("CARGO_PKG_VERSION").to_string(),
            kernel: nix::sys::utsname::uname()
                .map(|u| u.release().to_string_lossy().into_owned())
                .unwrap_or_default(),
        }
    }
}

/// What a dump wrote: the processes, in restore order (parents first).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inventory {
    pub root_pid: i32,
    /// Live processes, parents before children (the order restore creates them).
    pub pids: Vec<i32>,
    /// Children that had exited but were not yet reaped by their parent.
    #[serde(default)]
    pub zombies: Vec<Zombie>,
    /// Open file descriptions held by more than one process, and pipe ends.
    #[serde(default)]
    pub shared_files: Vec<crate::files::SharedFile>,
    /// Pipes with both ends in the dump, with their unread data.
    #[serde(default)]
    pub pipes: Vec<crate::pipes::PipeImage>,
    /// Sessions whose leader had exited (its PID is the session ID): restore
    /// recreates each through a helper with that PID that calls setsid(),
    /// forks the members, and exits, as CRIU does.
    #[serde(default)]
    pub lost_session_leaders: Vec<i32>,
    /// Process groups whose leader had exited (its PID is the group ID), with
    /// their session: restore keeps a helper with that PID leading the group
    /// until every member has joined it.
    #[serde(default)]
    pub lost_group_leaders: Vec<LostGroup>,
    /// SysV shm segments the processes attach, each with its contents in
    /// `sysvshm-ID.img`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sysv_shm: Vec<crate::sysvshm::SysvShm>,
    /// Open files whose contents were saved (`crest dump --save-files`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub saved_files: Vec<crate::savefiles::SavedFile>,
    /// The nftables table holding the traffic of connections to peers
    /// outside the dump (`--tcp-established`): restore removes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net_lock: Option<crate::netlock::NetLock>,
    pub stats: DumpStats,
}

/// A process group whose leader had exited, and the session it is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LostGroup {
    pub pgid: i32,
    pub sid: i32,
}

/// A zombie in the dumped tree: restored as a zombie with the same status,
/// so its parent's later wait() sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Zombie {
    pub pid: i32,
    pub ppid: i32,
    pub pgid: i32,
    pub sid: i32,
    /// The raw wait status (`/proc/PID/stat` exit_code).
    pub wait_status: i32,
    #[serde(default)]
    pub comm: String,
}

/// Figures about the dump itself, like CRIU's stats-dump.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DumpStats {
    /// From the first task frozen to the last resumed or killed, in microseconds.
    pub frozen_us: u64,
    /// Time spent copying memory, in microseconds.
    pub memory_us: u64,
    pub pages_written: u64,
    pub pages_skipped: u64,
    /// `dump --pre-copy`: the rounds that copied memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_copy: Option<PreCopyStats>,
}

/// How a pre-copy dump went: the rounds run while the processes ran, then
/// the one while they were frozen.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreCopyStats {
    /// What found the written pages: `uffd-wp` or `soft-dirty`.
    pub tracker: String,
    pub rounds: Vec<PreCopyRound>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreCopyRound {
    /// Pages copied (written or found dirty) in this round.
    pub pages: u64,
    /// How long the round took, in microseconds.
    pub us: u64,
    /// The last round, copied with every process frozen.
    #[serde(default)]
    pub frozen: bool,
}

/// The record kinds of `meta.crest`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum RecordKind {
    Inventory = 1,
    Process = 2,
}

/// A whole image as read from disk.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    pub dir: PathBuf,
    pub header: Header,
    pub inventory: Inventory,
    pub processes: Vec<crate::ProcessImage>,
}

impl Image {
    pub fn pages_path(dir: &Path, pid: i32) -> PathBuf {
        dir.join(format!("pages-{pid}.img"))
    }

    /// Page file `file` of `pid` (a dump may write a process's pages as
    /// several files in parallel); file 0 is [`Image::pages_path`].
    pub fn pages_file_path(dir: &Path, pid: i32, file: u8) -> PathBuf {
        match file {
            0 => Image::pages_path(dir, pid),
            n => dir.join(format!("pages-{pid}.{n}.img")),
        }
    }

    /// Reads and validates `dir/meta.crest`: magic, version, arch, checksums.
    pub fn read(dir: &Path) -> Result<Image> {
        let path = dir.join(META_FILE);
        let meta = fs::metadata(&path).map_err(|e| Error::io(&path, e))?;
        if meta.len() > MAX_META_BYTES {
            return Err(Error::bad_image(
                &path,
                format!("{} bytes is larger than any image crest writes", meta.len()),
            ));
        }
        let bytes = fs::read(&path).map_err(|e| Error::io(&path, e))?;
        Self::parse(dir, &path, &bytes)
    }

    fn parse(dir: &Path, path: &Path, bytes: &[u8]) -> Result<Image> {
        let bad = |reason: String| Error::bad_image(path, reason);
        if bytes.len() < 20 {
            return Err(bad(format!(
                "truncated: {} bytes, shorter than the fixed header",
                bytes.len()
            )));
        }
        if &bytes[..8] != MAGIC {
            return Err(bad("not a crest image (bad magic)".into()));
        }
        let version = u32_at(bytes, 8);
        if version != FORMAT_VERSION {
            return Err(bad(format!(
                "format version {version}, this crest ({}) reads version {FORMAT_VERSION} only",
                env!("CARGO_PKG_VERSION")
            )));
        }
        let hlen = u32_at(bytes, 12) as usize;
        let hcrc = u32_at(bytes, 16);
        let hbytes = bytes.get(20..20 + hlen).ok_or_else(|| {
            bad(format!(
                "truncated header: {hlen} bytes announced at offset 20"
            ))
        })?;
        if crc32c::crc32c(hbytes) != hcrc {
            return Err(bad("header checksum mismatch at offset 20".into()));
        }
        let header: Header =
            serde_json::from_slice(hbytes).map_err(|e| bad(format!("header: {e}")))?;
        if header.arch != std::env::consts::ARCH {
            return Err(bad(format!(
                "made on {}, this machine is {}",
                header.arch,
                std::env::consts::ARCH
            )));
        }
        let mut off = 20 + hlen;
        let mut inventory = None;
        let mut processes = Vec::new();
        while off < bytes.len() {
            let rec = bytes
                .get(off..off + 12)
                .ok_or_else(|| bad(format!("truncated record header at offset {off}")))?;
            let (kind, len, crc) = (u32_at(rec, 0), u32_at(rec, 4) as usize, u32_at(rec, 8));
            let payload = bytes.get(off + 12..off + 12 + len).ok_or_else(|| {
                bad(format!(
                    "truncated record at offset {off}: {len} bytes announced"
                ))
            })?;
            if crc32c::crc32c(payload) != crc {
                return Err(bad(format!("record checksum mismatch at offset {off}")));
            }
            let de = |e: serde_json::Error| bad(format!("record at offset {off}: {e}"));
            match kind {
                k if k == RecordKind::Inventory as u32 => {
                    inventory = Some(serde_json::from_slice(payload).map_err(de)?);
                }
                k if k == RecordKind::Process as u32 => {
                    processes.push(serde_json::from_slice(payload).map_err(de)?);
                }
                k => return Err(bad(format!("unknown record kind {k} at offset {off}"))),
            }
            off += 12 + len;
        }
        let inventory: Inventory = inventory.ok_or_else(|| bad("no inventory record".into()))?;
        for pid in &inventory.pids {
            if !processes
                .iter()
                .any(|p: &crate::ProcessImage| p.pid == *pid)
            {
                return Err(bad(format!(
                    "inventory names pid {pid} but it has no process record"
                )));
            }
        }
        Ok(Image {
            dir: dir.to_path_buf(),
            header,
            inventory,
            processes,
        })
    }
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// Writes the metadata of an image. Records are appended in order.
pub struct MetaWriter {
    buf: Vec<u8>,
}

impl MetaWriter {
    pub fn new(header: &Header) -> MetaWriter {
        let h = serde_json::to_vec(header).expect("header serialises");
        let mut buf = Vec::with_capacity(4096);
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&header.format_version.to_le_bytes());
        buf.extend_from_slice(&(h.len() as u32).to_le_bytes());
        buf.extend_from_slice(&crc32c::crc32c(&h).to_le_bytes());
        buf.extend_from_slice(&h);
        MetaWriter { buf }
    }

    pub fn record<T: Serialize>(&mut self, kind: RecordKind, value: &T) {
        let payload = serde_json::to_vec(value).expect("image types serialise");
        self.buf.extend_from_slice(&(kind as u32).to_le_bytes());
        self.buf
            .extend_from_slice(&(payload.len() as u32).to_le_bytes());
        self.buf
            .extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
        self.buf.extend_from_slice(&payload);
    }

    pub fn write_to(self, dir: &Path) -> Result<()> {
        let path = dir.join(META_FILE);
        let mut f = create_private(&path)?;
        f.write_all(&self.buf).map_err(|e| Error::io(&path, e))
    }
}

/// Creates a new file readable by its owner only (images hold process memory).
/// Opened for reading too, so that it can be mapped shared and written
/// through the mapping.
pub fn create_private(path: &Path) -> Result<fs::File> {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io(path, e))
}

/// A directory being written: it lives beside the final one under a temporary
/// name and is renamed into place only when complete, so a crashed dump never
/// leaves a half image that looks whole. Dropped without [`Staging::commit`],
/// it is removed.
pub struct Staging {
    tmp: PathBuf,
    dest: PathBuf,
    committed: bool,
}

impl Staging {
    pub fn new(dest: &Path) -> Result<Staging> {
        if dest.exists() {
            let empty = fs::read_dir(dest)
                .map_err(|e| Error::io(dest, e))?
                .next()
                .is_none();
            if !empty {
                return Err(Error::io(
                    dest,
                    std::io::Error::new(
                        std::io::ErrorKind::AlreadyExists,
                        "image directory exists and is not empty",
                    ),
                ));
            }
        }
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "image".into());
        let tmp = dest.with_file_name(format!(".{name}.partial-{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::io(&tmp, e))?;
        Ok(Staging {
            tmp,
            dest: dest.to_path_buf(),
            committed: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.tmp
    }

    pub fn commit(&mut self) -> Result<()> {
        if self.dest.exists() {
            fs::remove_dir(&self.dest).map_err(|e| Error::io(&self.dest, e))?;
        }
        fs::rename(&self.tmp, &self.dest).map_err(|e| Error::io(&self.dest, e))?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.tmp);
        }
    }
}

/// Serde helper: byte vectors as lowercase hex strings (compact, diffable JSON).
pub mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        let mut out = String::with_capacity(bytes.len() * 2);
        for b in bytes {
            out.push_str(&format!("{b:02x}"));
        }
        s.serialize_str(&out)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        if s.len() % 2 != 0 {
            return Err(serde::de::Error::custom("odd-length hex string"));
        }
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(serde::de::Error::custom))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(dir: &Path) -> Vec<u8> {
        let mut w = MetaWriter::new(&Header::current());
        w.record(
            RecordKind::Inventory,
            &Inventory {
                root_pid: 7,
                pids: vec![],
                zombies: vec![],
                shared_files: vec![],
                pipes: vec![],
                lost_session_leaders: vec![],
                lost_group_leaders: vec![],
                sysv_shm: vec![],
                saved_files: vec![],
                net_lock: None,
                stats: DumpStats::default(),
            },
        );
        w.write_to(dir).unwrap();
        fs::read(dir.join(META_FILE)).unwrap()
    }

    #[test]
    fn round_trip_and_file_mode() {
        let dir = tempfile::tempdir().unwrap();
        sample(dir.path());
        let img = Image::read(dir.path()).unwrap();
        assert_eq!(img.inventory.root_pid, 7);
        let mode = fs::metadata(dir.path().join(META_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn every_way_an_image_can_be_bad_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let good = sample(dir.path());
        let path = dir.path().join(META_FILE);
        let check = |bytes: Vec<u8>, want: &str| {
            fs::write(&path, &bytes).unwrap();
            let err = Image::read(dir.path()).unwrap_err().to_string();
            assert!(err.contains(want), "{err:?} should contain {want:?}");
            assert!(err.contains("meta.crest"), "{err:?} should name the file");
        };
        check(b"ELF".to_vec(), "truncated");
        let mut b = good.clone();
        b[0] = b'X';
        check(b, "bad magic");
        let mut b = good.clone();
        b[8..12].copy_from_slice(&2u32.to_le_bytes());
        check(b, "format version 2");
        let mut b = good.clone();
        b[25] ^= 0x20;
        check(b, "header checksum");
        let mut b = good.clone();
        let last = b.len() - 3;
        b[last] ^= 1;
        check(b, "record checksum mismatch");
        let b = good[..good.len() - 5].to_vec();
        check(b, "truncated record");
    }

    #[test]
    fn staging_is_removed_unless_committed() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("img");
        let tmp = {
            let s = Staging::new(&dest).unwrap();
            s.path().to_path_buf()
        };
        assert!(!tmp.exists() && !dest.exists());
        let mut s = Staging::new(&dest).unwrap();
        fs::write(s.path().join("x"), b"1").unwrap();
        s.commit().unwrap();
        assert!(dest.join("x").exists());
        assert!(
            Staging::new(&dest).is_err(),
            "a non-empty image dir is not overwritten"
        );
    }
}
