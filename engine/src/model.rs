//! The whole image as typed data: what a dump writes and a restore reads.
//! Each kind owns its types; this module puts them together (the dump's
//! inventory, its table of open files, one record per process) and moves
//! them in and out of the image container ([`crate::image`]) as records
//! of three kinds: `inventory`, `file` and `process`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::fds::table::FdTable;
use crate::fds::{OpenFile, OpenFiles};
use crate::image::{Header, Image, MetaWriter, RecordKind};
use crate::tree::{LostGroup, Member, Zombie};

/// The dump's inventory (one, id 0).
pub const INVENTORY: RecordKind = RecordKind("inventory");
/// An open file (id: its [`crate::fds::table::FileId`]).
pub const FILE: RecordKind = RecordKind("file");
/// A process (id: its PID).
pub const PROCESS: RecordKind = RecordKind("process");

/// Everything the image holds about one process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessImage {
    pub pid: i32,
    pub ppid: i32,
    pub pgid: i32,
    pub sid: i32,
    /// It was stopped (SIGSTOP, job control) when dumped, and is restored stopped.
    #[serde(default)]
    pub stopped: bool,
    /// The main thread first.
    pub threads: Vec<crate::task::ThreadImage>,
    pub state: crate::task::ProcessState,
    pub mm: crate::mm::MmImage,
    /// Its descriptors (each referring to an open file of the dump) and
    /// working directories.
    pub files: FdTable,
    /// The process took part through libcrest: where its state word is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<crate::api::ApiImage>,
    /// File locks it holds, taken again once its descriptors are in place.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub locks: Vec<crate::fds::locks::FileLock>,
    /// A session leader's controlling terminal: the pts index of a pty in the dump.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ctty: Option<u32>,
}

impl ProcessImage {
    /// What the process tree needs of it.
    pub fn member(&self) -> Member {
        Member {
            pid: self.pid,
            ppid: self.ppid,
            pgid: self.pgid,
            sid: self.sid,
            subreaper: self.state.child_subreaper,
        }
    }
}

/// What a dump wrote besides the processes and their files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inventory {
    pub root_pid: i32,
    /// Live processes, parents before children (the order restore creates them).
    pub pids: Vec<i32>,
    /// Children that had exited but were not yet reaped by their parent.
    #[serde(default)]
    pub zombies: Vec<Zombie>,
    /// Pipes with both ends in the dump, with their unread data.
    #[serde(default)]
    pub pipes: Vec<crate::fds::pipe::Pipe>,
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
    pub sysv_shm: Vec<crate::mm::sysvshm::SysvShm>,
    /// Open files whose contents were saved (`crest dump --save-files`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub saved_files: Vec<crate::fds::savefiles::SavedFile>,
    /// The nftables table holding the traffic of connections to peers
    /// outside the dump (`--tcp-established`): restore removes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net_lock: Option<crate::net::netlock::NetLock>,
    pub stats: DumpStats,
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
    pub pre_copy: Option<crate::mm::precopy::PreCopyStats>,
}

/// A whole image: its header, inventory, open files and processes.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    pub dir: PathBuf,
    pub header: Header,
    pub inventory: Inventory,
    pub files: OpenFiles,
    pub processes: Vec<ProcessImage>,
}

impl Checkpoint {
    /// Reads and validates the image in `dir`: the container's checks, then
    /// every record decoded, every pid and file it names present.
    pub fn read(dir: &Path) -> Result<Checkpoint> {
        let image = Image::read(dir)?;
        let bad = |reason: String| Error::bad_image(image.meta_path(), reason);
        for r in &image.records {
            if ![INVENTORY, FILE, PROCESS].iter().any(|k| k.0 == r.kind) {
                return Err(bad(format!(
                    "unknown record kind {:?} at offset {}",
                    r.kind, r.offset
                )));
            }
        }
        let inventory: Inventory = image.one(INVENTORY, 0)?;
        let mut files = Vec::new();
        for (id, f) in image.all::<OpenFile>(FILE)? {
            if u64::from(f.id.0) != id {
                return Err(bad(format!("open file {} recorded as file {id}", f.id)));
            }
            files.push(f);
        }
        let files = OpenFiles::from_entries(files).map_err(|e| bad(e.to_string()))?;
        let processes: Vec<ProcessImage> =
            image.all(PROCESS)?.into_iter().map(|(_, p)| p).collect();
        for pid in &inventory.pids {
            if !processes.iter().any(|p| p.pid == *pid) {
                return Err(bad(format!(
                    "inventory names pid {pid} but it has no process record"
                )));
            }
        }
        for p in &processes {
            if let Some(e) = p.files.fds.iter().find(|e| files.get(e.file).is_none()) {
                return Err(bad(format!(
                    "pid {}: fd {} refers to a missing open file {}",
                    p.pid, e.fd, e.file
                )));
            }
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            header: image.header,
            inventory,
            files,
            processes,
        })
    }

    /// Writes `meta.crest` in `dir`.
    pub fn write(
        dir: &Path,
        header: &Header,
        inventory: &Inventory,
        files: &OpenFiles,
        processes: &[ProcessImage],
    ) -> Result<()> {
        let mut meta = MetaWriter::new(header);
        meta.record(INVENTORY, 0, inventory);
        for f in files.iter() {
            meta.record(FILE, u64::from(f.id.0), f);
        }
        for p in processes {
            meta.record(PROCESS, p.pid as u64, p);
        }
        meta.write_to(dir)
    }

    /// The image as JSON: header, inventory, open files and every process.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "dir": self.dir,
            "header": self.header,
            "inventory": self.inventory,
            "files": self.files,
            "processes": self.processes,
        })
    }
}
