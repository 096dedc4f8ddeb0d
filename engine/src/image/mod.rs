//! The image container: a directory holding `meta.crest` (a fixed header and
//! checksummed records) and the blobs beside it (page files and other
//! contents, named by kind and id). It knows no kind of state: it hands out
//! records and blobs by (kind, id); each kind owns its serde types, its
//! record kind and its blob names (the engine's model module assembles the whole).
//!
//! `meta.crest` layout (little endian):
//! ```text
//! 0   8  magic "CRESTIMG"
//! 8   4  format version
//! 12  4  header length H
//! 16  4  crc32c of the header bytes
//! 20  H  header (JSON: format version, arch, engine version, kernel)
//! then records until EOF, each:
//!     16 kind (ASCII, NUL-padded)   8 id   4 payload length L   4 crc32c of payload
//!     L  payload (JSON)
//! ```
//! The header is readable without decoding anything else, so a tool can say
//! which version wrote an image it cannot read.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub mod crc;

pub const MAGIC: &[u8; 8] = b"CRESTIMG";
/// Bumped whenever a record's meaning changes; readers refuse other versions.
/// 2: records carry a kind name and an id; descriptors refer to a table of
/// open files.
pub const FORMAT_VERSION: u32 = 2;
pub const META_FILE: &str = "meta.crest";
/// Cap on the metadata file and any one record, so a hostile image cannot make
/// us allocate without bound.
const MAX_META_BYTES: u64 = 1 << 30;
/// Bytes of a record's header: kind, id, payload length, checksum.
const RECORD_HEADER: usize = KIND_BYTES + 16;
const KIND_BYTES: usize = 16;

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

/// The kind of a record: a name of at most 16 ASCII bytes, chosen by the
/// module that owns the record's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordKind(pub &'static str);

/// One record as read: its kind, its id, where it starts in `meta.crest`,
/// and its (checksummed) payload.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub kind: String,
    pub id: u64,
    pub offset: usize,
    payload: Vec<u8>,
}

/// A file of the image beside `meta.crest`: `KIND-ID.img`, or
/// `KIND-ID.PART.img` for the further parts of one written in several.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blob {
    pub kind: &'static str,
    pub id: u64,
    pub part: u8,
}

impl Blob {
    pub const fn new(kind: &'static str, id: u64) -> Blob {
        Blob { kind, id, part: 0 }
    }

    pub const fn part(self, part: u8) -> Blob {
        Blob { part, ..self }
    }

    /// Its file name.
    pub fn name(&self) -> String {
        match self.part {
            0 => format!("{}-{}.img", self.kind, self.id),
            n => format!("{}-{}.{n}.img", self.kind, self.id),
        }
    }

    /// Its path in image directory `dir`.
    pub fn path(&self, dir: &Path) -> PathBuf {
        dir.join(self.name())
    }

    /// Creates it in `dir`, readable by its owner only.
    pub fn create(&self, dir: &Path) -> Result<fs::File> {
        create_private(&self.path(dir))
    }
}

/// An image as read from disk: its header and its records, every checksum
/// verified. What the records mean is up to their kinds.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    pub dir: PathBuf,
    pub header: Header,
    pub records: Vec<Record>,
}

impl Image {
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
        let mut records = Vec::new();
        while off < bytes.len() {
            let rec = bytes
                .get(off..off + RECORD_HEADER)
                .ok_or_else(|| bad(format!("truncated record header at offset {off}")))?;
            let name = &rec[..KIND_BYTES];
            let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(KIND_BYTES)];
            let kind = std::str::from_utf8(name)
                .ok()
                .filter(|k| !k.is_empty() && k.is_ascii())
                .ok_or_else(|| bad(format!("unreadable record kind at offset {off}")))?
                .to_string();
            let id =
                u64::from_le_bytes(rec[KIND_BYTES..KIND_BYTES + 8].try_into().expect("8 bytes"));
            let (len, crc) = (
                u32_at(rec, KIND_BYTES + 8) as usize,
                u32_at(rec, KIND_BYTES + 12),
            );
            let payload = bytes
                .get(off + RECORD_HEADER..off + RECORD_HEADER + len)
                .ok_or_else(|| {
                    bad(format!(
                        "truncated record at offset {off}: {len} bytes announced"
                    ))
                })?;
            if crc32c::crc32c(payload) != crc {
                return Err(bad(format!("record checksum mismatch at offset {off}")));
            }
            records.push(Record {
                kind,
                id,
                offset: off,
                payload: payload.to_vec(),
            });
            off += RECORD_HEADER + len;
        }
        Ok(Image {
            dir: dir.to_path_buf(),
            header,
            records,
        })
    }

    /// The path of `meta.crest`, for errors about its records.
    pub fn meta_path(&self) -> PathBuf {
        self.dir.join(META_FILE)
    }

    /// Decodes `record` as a `T`; a bad record is an error naming its offset.
    pub fn decode<T: DeserializeOwned>(&self, record: &Record) -> Result<T> {
        serde_json::from_slice(&record.payload).map_err(|e| {
            Error::bad_image(
                self.meta_path(),
                format!("record at offset {}: {e}", record.offset),
            )
        })
    }

    /// Every record of `kind`, decoded, with its id, in the order written.
    pub fn all<T: DeserializeOwned>(&self, kind: RecordKind) -> Result<Vec<(u64, T)>> {
        self.records
            .iter()
            .filter(|r| r.kind == kind.0)
            .map(|r| Ok((r.id, self.decode(r)?)))
            .collect()
    }

    /// The record of `kind` with `id`, decoded; its absence is an error.
    pub fn one<T: DeserializeOwned>(&self, kind: RecordKind, id: u64) -> Result<T> {
        let r = self
            .records
            .iter()
            .find(|r| r.kind == kind.0 && r.id == id)
            .ok_or_else(|| Error::bad_image(self.meta_path(), format!("no {} record", kind.0)))?;
        self.decode(r)
    }

    /// The path of `blob` in this image.
    pub fn blob(&self, blob: Blob) -> PathBuf {
        blob.path(&self.dir)
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

    pub fn record<T: Serialize>(&mut self, kind: RecordKind, id: u64, value: &T) {
        assert!(
            kind.0.len() <= KIND_BYTES && kind.0.is_ascii() && !kind.0.is_empty(),
            "record kind {:?} is 1 to {KIND_BYTES} ASCII bytes",
            kind.0
        );
        let payload = serde_json::to_vec(value).expect("image types serialise");
        let mut name = [0u8; KIND_BYTES];
        name[..kind.0.len()].copy_from_slice(kind.0.as_bytes());
        self.buf.extend_from_slice(&name);
        self.buf.extend_from_slice(&id.to_le_bytes());
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

    const THING: RecordKind = RecordKind("thing");

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Thing {
        n: u32,
    }

    fn sample(dir: &Path) -> Vec<u8> {
        let mut w = MetaWriter::new(&Header::current());
        w.record(THING, 7, &Thing { n: 1 });
        w.record(THING, 9, &Thing { n: 2 });
        w.write_to(dir).unwrap();
        fs::read(dir.join(META_FILE)).unwrap()
    }

    #[test]
    fn round_trip_and_file_mode() {
        let dir = tempfile::tempdir().unwrap();
        sample(dir.path());
        let img = Image::read(dir.path()).unwrap();
        assert_eq!(
            img.all::<Thing>(THING).unwrap(),
            vec![(7, Thing { n: 1 }), (9, Thing { n: 2 })]
        );
        assert_eq!(img.one::<Thing>(THING, 9).unwrap(), Thing { n: 2 });
        let err = img.one::<Thing>(RecordKind("other"), 0).unwrap_err();
        assert!(err.to_string().contains("no other record"), "{err}");
        let mode = fs::metadata(dir.path().join(META_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn blobs_are_named_by_kind_and_id() {
        assert_eq!(Blob::new("pages", 42).name(), "pages-42.img");
        assert_eq!(Blob::new("pages", 42).part(1).name(), "pages-42.1.img");
        assert_eq!(
            Blob::new("shmem", 7).path(Path::new("/i")),
            Path::new("/i/shmem-7.img")
        );
    }

    #[test]
    fn every_way_an_image_can_be_bad_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let good = sample(dir.path());
        let path = dir.path().join(META_FILE);
        let check = |bytes: Vec<u8>, want: &str| {
            fs::write(&path, &bytes).unwrap();
            let err = Image::read(dir.path())
                .and_then(|img| img.all::<Thing>(THING))
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{err:?} should contain {want:?}");
            assert!(err.contains("meta.crest"), "{err:?} should name the file");
        };
        check(b"ELF".to_vec(), "truncated");
        let mut b = good.clone();
        b[0] = b'X';
        check(b, "bad magic");
        let mut b = good.clone();
        b[8..12].copy_from_slice(&3u32.to_le_bytes());
        check(b, "format version 3");
        let mut b = good.clone();
        b[25] ^= 0x20;
        check(b, "header checksum");
        let mut b = good.clone();
        let last = b.len() - 3;
        b[last] ^= 1;
        check(b, "record checksum mismatch");
        let b = good[..good.len() - 5].to_vec();
        check(b, "truncated record");
        // A payload that is not the record's type: named by its offset.
        let mut w = MetaWriter::new(&Header::current());
        w.record(THING, 1, &"not a thing");
        let other = tempfile::tempdir().unwrap();
        w.write_to(other.path()).unwrap();
        let err = Image::read(other.path())
            .unwrap()
            .all::<Thing>(THING)
            .unwrap_err()
            .to_string();
        assert!(err.contains("record at offset"), "{err}");
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
