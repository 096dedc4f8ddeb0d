//! Memory: the address space of a process and its contents.
//!
//! - [`vma`]: the mappings (VMAs) and what backs each;
//! - [`pages`]: the page files, their one writer and their one reader;
//!   [`pagepipe`] and [`pagecrc`] move a frozen target's pages with one copy
//!   and checksum them inside it; [`precopy`] copies them while it runs;
//! - [`shmem`]: shared anonymous memory, [`sysvshm`]: SysV shm segments;
//! - [`restore`]: the address space rebuilt in the restored process;
//! - here: the mm fields (`PR_SET_MM_MAP`), auxv, and the memory part of a
//!   process's image ([`MmImage`]).

pub mod pagecrc;
pub mod pagepipe;
pub mod pages;
pub mod precopy;
pub mod restore;
pub mod shmem;
pub mod sysvshm;
pub mod vma;

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::sys::remote::RemoteCall;
pub use pages::PageChunk;
pub use vma::{Backing, Vma, VmaLookup};

/// The mm fields PR_SET_MM_MAP restores (from `/proc/PID/stat` and `brk(0)`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MmFields {
    pub start_code: u64,
    pub end_code: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub brk: u64,
    pub start_stack: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MmImage {
    pub vmas: Vec<Vma>,
    pub fields: MmFields,
    pub auxv: Vec<u64>,
    /// `/proc/PID/exe`.
    pub exe: String,
    pub chunks: Vec<PageChunk>,
}

impl MmImage {
    pub fn saved_bytes(&self) -> u64 {
        self.chunks.iter().map(|c| c.len).sum()
    }
}

/// Copies the touched pages of `vmas` from `pid` into its page files in
/// `dir`; returns the chunks, counting the pages written and skipped.
///
/// The touched pages are found with PAGEMAP_SCAN where the kernel has it
/// (cost follows the populated page tables, not the size of the mappings),
/// else by reading `pagemap`. With `frozen` (the target seized and stopped,
/// crest's scratch page mapped in it) the pages move through pipes with one
/// copy ([`pagepipe`]); otherwise, or where the target cannot make a pipe,
/// crest reads them ([`pages::copy_by_reading`]).
pub fn collect_pages(
    pid: i32,
    vmas: &[Vma],
    dir: &Path,
    written_pages: &mut u64,
    skipped_pages: &mut u64,
    frozen: Option<&RemoteCall>,
) -> Result<Vec<PageChunk>> {
    let runs = pages::touched_runs(pid, vmas, skipped_pages)?;
    let copied = match frozen {
        Some(remote) => match pagepipe::copy_pages(remote, &runs, dir)? {
            Some(copied) => copied,
            None => pages::copy_by_reading(pid, &runs, dir)?,
        },
        None => pages::copy_by_reading(pid, &runs, dir)?,
    };
    *written_pages += copied.written_pages;
    *skipped_pages += copied.zero_pages;
    Ok(copied.chunks)
}

/// Reads the mm fields from `/proc/PID/stat` (fields 26–28 and 45–51).
pub fn parse_stat_mm_fields(stat: &str) -> Option<MmFields> {
    // The comm field may contain spaces and parentheses: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|s| s.parse().unwrap_or(0))
        .collect();
    // rest[0] is field 3 (state); field N is rest[N-3].
    let field = |n: usize| f.get(n - 3).copied();
    Some(MmFields {
        start_code: field(26)?,
        end_code: field(27)?,
        start_stack: field(28)?,
        start_data: field(45)?,
        end_data: field(46)?,
        start_brk: field(47)?,
        brk: 0,
        arg_start: field(48)?,
        arg_end: field(49)?,
        env_start: field(50)?,
        env_end: field(51)?,
    })
}

/// Parses `/proc/PID/auxv` (pairs of native u64) up to and including AT_NULL.
pub fn parse_auxv(bytes: &[u8]) -> Vec<u64> {
    let mut out = Vec::new();
    for pair in bytes.chunks_exact(16) {
        let k = u64::from_ne_bytes(pair[..8].try_into().expect("8 bytes"));
        let v = u64::from_ne_bytes(pair[8..].try_into().expect("8 bytes"));
        out.push(k);
        out.push(v);
        if k == 0 {
            break;
        }
    }
    out
}

/// `struct prctl_mm_map` for PR_SET_MM_MAP, as bytes with `auxv_addr` pointing
/// at the auxv copy in the target.
pub fn prctl_mm_map(fields: &MmFields, auxv_addr: u64, auxv_len: usize, exe_fd: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(104);
    for v in [
        fields.start_code,
        fields.end_code,
        fields.start_data,
        fields.end_data,
        fields.start_brk,
        fields.brk,
        fields.start_stack,
        fields.arg_start,
        fields.arg_end,
        fields.env_start,
        fields.env_end,
        auxv_addr,
    ] {
        b.extend_from_slice(&v.to_ne_bytes());
    }
    b.extend_from_slice(&((auxv_len * 8) as u32).to_ne_bytes());
    b.extend_from_slice(&exe_fd.to_ne_bytes());
    b
}

/// Finds `size` bytes of address space free of every range in `taken`, at or
/// above `from`.
pub fn find_gap(taken: &[(u64, u64)], size: u64, from: u64) -> Option<u64> {
    let mut ranges: Vec<(u64, u64)> = taken.to_vec();
    ranges.sort();
    let mut cand = from;
    for (s, e) in ranges {
        if e <= cand {
            continue;
        }
        if s >= cand + size {
            return Some(cand);
        }
        cand = cand.max(e);
    }
    (cand + size <= 0x7fff_ffff_f000).then_some(cand)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_parse_despite_parentheses_in_comm() {
        let mut stat = String::from("42 (a) b) S");
        for n in 4..=52 {
            stat.push_str(&format!(" {n}"));
        }
        let f = parse_stat_mm_fields(&stat).unwrap();
        assert_eq!((f.start_code, f.end_code, f.start_stack), (26, 27, 28));
        assert_eq!((f.start_data, f.end_data, f.start_brk), (45, 46, 47));
        assert_eq!(
            (f.arg_start, f.arg_end, f.env_start, f.env_end),
            (48, 49, 50, 51)
        );
        assert!(parse_stat_mm_fields("42 (x) S 1 2").is_none());
    }

    #[test]
    fn auxv_stops_at_at_null() {
        let mut b = Vec::new();
        for v in [6u64, 4096, 0, 0, 99, 99] {
            b.extend_from_slice(&v.to_ne_bytes());
        }
        assert_eq!(parse_auxv(&b), vec![6, 4096, 0, 0]);
    }

    #[test]
    fn prctl_mm_map_is_104_bytes() {
        assert_eq!(prctl_mm_map(&MmFields::default(), 0, 4, 3).len(), 104);
    }

    #[test]
    fn gaps_avoid_every_taken_range() {
        let taken = [(0x10000, 0x20000), (0x21000, 0x30000)];
        assert_eq!(find_gap(&taken, 0x1000, 0x10000), Some(0x20000));
        assert_eq!(find_gap(&taken, 0x2000, 0x10000), Some(0x30000));
        assert_eq!(find_gap(&taken, 0x1000, 0x40000), Some(0x40000));
    }
}
