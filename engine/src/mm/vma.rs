//! The mappings of an address space (VMAs): what backs each, read from
//! `/proc/PID/maps` and smaps' VmFlags, and refused where crest cannot
//! restore it yet.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::sys::proc::MapsEntry;

/// What backs a VMA.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Backing {
    /// Private anonymous memory (heap, stack, anonymous mmap).
    Anon,
    /// A mapping of a file. Private: pages the process wrote are in the image.
    /// Shared: its contents live in the file, nothing is saved.
    File {
        path: String,
        offset: u64,
        dev: u64,
        inode: u64,
        #[serde(default)]
        shared: bool,
        /// The mapping may be made writable (VM_MAYWRITE): the file must be
        /// reopened for writing when the mapping is shared.
        #[serde(default)]
        may_write: bool,
    },
    /// Shared anonymous memory (MAP_SHARED|MAP_ANONYMOUS, shared across fork),
    /// or a shared mapping of a file unlinked since (`path`: MPICH's deleted
    /// `/dev/shm/mpich_shar_tmp*` segment, mapped by every rank): the object
    /// `inode` is saved once for the whole dump (see `files::FdKind::Shmem`)
    /// and every process maps the same object again.
    SharedAnon {
        inode: u64,
        offset: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        path: Option<String>,
    },
    /// An attachment (or part of one, split by mprotect) of SysV shm segment
    /// `shmid`, saved once for the whole dump (see `crate::mm::sysvshm`).
    SysvShm {
        shmid: i32,
        /// The key it was created with (its mappings' name, `/SYSV<key>`),
        /// which stays when IPC_RMID makes the segment's key private.
        key: i32,
        offset: u64,
        /// Attached writable (VM_MAYWRITE).
        #[serde(default)]
        may_write: bool,
    },
    /// A mapping of memfd `inode` (saved once for the whole dump, see
    /// `crate::fds::memfd`). Private: pages the process wrote are in the image.
    Memfd {
        inode: u64,
        name: String,
        offset: u64,
        shared: bool,
        may_write: bool,
    },
    /// A mapping the kernel provides (`[vdso]`, `[vvar]`, `[vvar_vclock]`).
    Special { name: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vma {
    pub start: u64,
    pub end: u64,
    /// PROT_* bits.
    pub prot: i32,
    pub backing: Backing,
    /// `[heap]`, `[stack]`, or empty.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// VM_GROWSDOWN (the main stack).
    #[serde(default)]
    pub growsdown: bool,
    /// VM_NORESERVE: mapped with MAP_NORESERVE (not charged to overcommit).
    #[serde(default)]
    pub noreserve: bool,
    /// madvise/mlock state, as `/proc/PID/smaps` VmFlags: dc (MADV_DONTFORK),
    /// wf (MADV_WIPEONFORK), dd (MADV_DONTDUMP), hg/nh (MADV_(NO)HUGEPAGE), lo (mlock).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub advice: Vec<String>,
}

/// The VmFlags that [`Vma::advice`] carries, and how each is set again.
pub const ADVICE_FLAGS: &[(&str, Option<i32>)] = &[
    ("dc", Some(libc::MADV_DONTFORK)),
    ("wf", Some(libc::MADV_WIPEONFORK)),
    ("dd", Some(libc::MADV_DONTDUMP)),
    ("hg", Some(libc::MADV_HUGEPAGE)),
    ("nh", Some(libc::MADV_NOHUGEPAGE)),
    ("lo", None), // mlock
];

impl Vma {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }

    /// Whether the pages of `vma` go into the page file (private memory), and if
    /// so whether it maps a file (only its copy-on-write pages differ from the
    /// file, and they are kept even when all zeros).
    pub fn saved_pages_kind(&self) -> Option<bool> {
        match &self.backing {
            Backing::Special { .. }
            | Backing::File { shared: true, .. }
            | Backing::Memfd { shared: true, .. }
            | Backing::SysvShm { .. }
            | Backing::SharedAnon { .. } => None,
            Backing::File { .. } | Backing::Memfd { .. } => Some(true),
            Backing::Anon => Some(false),
        }
    }
}

/// Finds the VMA holding an address in O(log n): images may have tens of
/// thousands of mappings and as many chunks.
pub struct VmaLookup<'a> {
    sorted: Vec<&'a Vma>,
}

impl<'a> VmaLookup<'a> {
    pub fn new(vmas: &'a [Vma]) -> Self {
        let mut sorted: Vec<&Vma> = vmas.iter().collect();
        sorted.sort_by_key(|v| v.start);
        VmaLookup { sorted }
    }

    /// The VMA containing `[addr, addr+len)` entirely, if one does.
    pub fn containing(&self, addr: u64, len: u64) -> Option<&'a Vma> {
        let i = self.sorted.partition_point(|v| v.start <= addr);
        let v = *self.sorted.get(i.checked_sub(1)?)?;
        (addr >= v.start && addr.checked_add(len)? <= v.end).then_some(v)
    }
}

/// Classifies the maps of `pid`, refusing what the engine cannot restore yet.
pub fn collect_vmas(
    pid: i32,
    maps: &[MapsEntry],
    vmflags: &[(u64, Vec<String>)],
) -> Result<Vec<Vma>> {
    // By start address: a process may have tens of thousands of mappings.
    let by_start: std::collections::HashMap<u64, &Vec<String>> =
        vmflags.iter().map(|(s, f)| (*s, f)).collect();
    let has_flag = |start: u64, flag: &str| {
        by_start
            .get(&start)
            .is_some_and(|f| f.iter().any(|x| x == flag))
    };
    let mut vmas = Vec::new();
    for m in maps {
        let prot = (if m.read { libc::PROT_READ } else { 0 })
            | (if m.write { libc::PROT_WRITE } else { 0 })
            | (if m.exec { libc::PROT_EXEC } else { 0 });
        let what = || {
            format!(
                "mapping {:#x}-{:#x} {}",
                m.start,
                m.end,
                if m.name.is_empty() {
                    "(anonymous)"
                } else {
                    &m.name
                }
            )
        };
        let backing = if m.name == "[vsyscall]" {
            continue; // fixed by the kernel, the same in every process
        } else if m.is_special() {
            if m.name == "[uprobes]" {
                return Err(Error::unsupported(
                    pid,
                    format!("{} (uprobes are attached)", what()),
                ));
            }
            Backing::Special {
                name: m.name.clone(),
            }
        } else if m.shared && m.deleted && m.name == "/dev/zero" {
            Backing::SharedAnon {
                inode: m.inode,
                offset: m.offset,
                path: None,
            }
        } else if m.shared && m.deleted && is_unlinked_file(&m.name) && m.inode != 0 {
            // An unlinked file mapped shared: nothing else can reach it by
            // name, so its contents are the object's whole state.
            Backing::SharedAnon {
                inode: m.inode,
                offset: m.offset,
                path: Some(m.name.clone()),
            }
        } else if m.shared && m.name.starts_with("/SYSV") {
            Backing::SysvShm {
                shmid: m.inode as i32,
                key: u32::from_str_radix(&m.name["/SYSV".len()..], 16).unwrap_or(0) as i32,
                offset: m.offset,
                may_write: has_flag(m.start, "mw"),
            }
        } else if m.deleted && m.name.starts_with("/memfd:") {
            Backing::Memfd {
                inode: m.inode,
                name: m.name["/memfd:".len()..].to_string(),
                offset: m.offset,
                shared: m.shared,
                may_write: has_flag(m.start, "mw"),
            }
        } else if m.shared
            && (m.deleted
                || !m.name.starts_with('/')
                || (m.name.starts_with("/dev/") && !m.name.starts_with("/dev/shm/"))
                || m.name.starts_with("/SYSV"))
        {
            return Err(Error::unsupported(
                pid,
                format!("{} is shared memory", what()),
            ));
        } else if m.inode != 0 {
            if m.deleted || !m.name.starts_with('/') {
                return Err(Error::unsupported(
                    pid,
                    format!("{} maps a deleted file", what()),
                ));
            }
            Backing::File {
                path: m.name.clone(),
                offset: m.offset,
                dev: ((m.dev_major as u64) << 8) | m.dev_minor as u64,
                inode: m.inode,
                shared: m.shared,
                may_write: has_flag(m.start, "mw"),
            }
        } else {
            Backing::Anon
        };
        let name = if matches!(m.name.as_str(), "[heap]" | "[stack]") {
            m.name.clone()
        } else {
            String::new()
        };
        vmas.push(Vma {
            start: m.start,
            end: m.end,
            prot,
            backing,
            name,
            growsdown: has_flag(m.start, "gd"),
            noreserve: has_flag(m.start, "nr"),
            advice: ADVICE_FLAGS
                .iter()
                .filter(|(f, _)| has_flag(m.start, f))
                .map(|(f, _)| f.to_string())
                .collect(),
        });
    }
    Ok(vmas)
}

/// Whether a "(deleted)" shared mapping's name is a file that was unlinked,
/// rather than a kernel object shown with a made-up path (SysV shm, memfd,
/// shared hugetlb anonymous memory, devices).
fn is_unlinked_file(name: &str) -> bool {
    // Kernel objects show as names right under / (`/i915`, `/SYSV…`).
    name.starts_with('/')
        && name.rfind('/') > Some(0)
        && !name.starts_with("/SYSV")
        && !name.starts_with("/memfd:")
        && !name.starts_with("/anon_hugepage")
        && (!name.starts_with("/dev/") || name.starts_with("/dev/shm/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vma_lookup_finds_the_containing_mapping() {
        let vma = |start, end| Vma {
            start,
            end,
            prot: 0,
            backing: Backing::Anon,
            name: String::new(),
            growsdown: false,
            noreserve: false,
            advice: vec![],
        };
        let vmas = [vma(0x5000, 0x8000), vma(0x1000, 0x3000)];
        let l = VmaLookup::new(&vmas);
        assert_eq!(l.containing(0x1000, 0x2000).map(|v| v.start), Some(0x1000));
        assert_eq!(l.containing(0x7000, 0x1000).map(|v| v.start), Some(0x5000));
        assert!(l.containing(0x2000, 0x2000).is_none()); // runs past the end
        assert!(l.containing(0x3000, 0x1000).is_none()); // in the gap
        assert!(l.containing(0x0, 0x1000).is_none());
        assert!(l.containing(0x7000, u64::MAX).is_none());
    }

    #[test]
    fn vsyscall_is_skipped_and_shared_device_memory_refused() {
        let maps = crate::sys::proc::parse_maps(
            "1000-2000 rw-p 00000000 00:00 0 [heap]\nffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0 [vsyscall]\n",
        )
        .unwrap();
        let vmas = collect_vmas(1, &maps, &[]).unwrap();
        assert_eq!(vmas.len(), 1);
        assert_eq!(vmas[0].name, "[heap]");
        let shared =
            crate::sys::proc::parse_maps("1000-2000 rw-s 00000000 00:05 9 /dev/fb0\n").unwrap();
        let err = collect_vmas(7, &shared, &[]).unwrap_err();
        assert!(matches!(err, Error::Unsupported { pid: 7, .. }), "{err}");
        assert!(err.to_string().contains("shared memory"));
        for name in ["/dev/fb0", "/i915"] {
            let m = crate::sys::proc::parse_maps(&format!(
                "1000-2000 rw-s 00000000 00:01 5 {name} (deleted)\n"
            ))
            .unwrap();
            assert!(collect_vmas(7, &m, &[]).is_err(), "{name}");
        }
    }

    /// MPICH's segment: an unlinked /dev/shm file every rank maps shared.
    #[test]
    fn an_unlinked_file_mapped_shared_is_a_shared_object() {
        let maps = crate::sys::proc::parse_maps(
            "7f00000000-7f00001000 rw-s 00000000 00:1a 77 /dev/shm/mpich_shar_tmpAbC (deleted)\n",
        )
        .unwrap();
        let vmas = collect_vmas(1, &maps, &[]).unwrap();
        assert_eq!(
            vmas[0].backing,
            Backing::SharedAnon {
                inode: 77,
                offset: 0,
                path: Some("/dev/shm/mpich_shar_tmpAbC".into())
            }
        );
    }
}
