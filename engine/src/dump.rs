//! `crest dump`: freeze a process, collect its state, write the image, then
//! kill it, let it run, or leave it stopped.
//!
//! Once the target is seized, every exit path goes through [`Frozen`], whose
//! `Drop` puts the registers back, unmaps our scratch page and detaches: a
//! failed dump leaves the process exactly as it was.

use std::path::PathBuf;
use std::time::Instant;

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag};

use crate::error::{Error, Result};
use crate::image::{DumpStats, Header, Image, Inventory, MetaWriter, RecordKind, Staging};
use crate::ptrace::{Regs, Tracee};
use crate::task::{self, Registers, Remote};
use crate::{files, mm, proc, ProcessImage, PAGE_SIZE};

/// What happens to the target after a successful dump.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AfterDump {
    /// Kill it (the default, like CRIU): the image is now the process.
    #[default]
    Kill,
    /// Let it continue as if nothing happened.
    LeaveRunning,
    /// Leave it stopped with SIGSTOP.
    Stop,
}

#[derive(Debug, Clone)]
pub struct DumpOptions {
    pub pid: i32,
    pub dir: PathBuf,
    pub after: AfterDump,
}

/// A seized task. Dropping it undoes everything the dump did to the target.
struct Frozen {
    tracee: Tracee,
    regs: Regs,
    insn: Option<u64>,
    scratch: Option<u64>,
    released: bool,
}

impl Frozen {
    /// Undoes our changes and detaches, optionally with a signal.
    fn release(&mut self, sig: Option<Signal>) -> Result<()> {
        self.released = true;
        if let (Some(insn), Some(scratch)) = (self.insn, self.scratch.take()) {
            self.tracee.remote_ok(
                insn,
                libc::SYS_munmap,
                [scratch, PAGE_SIZE, 0, 0, 0, 0],
                "munmap of crest's scratch page",
            )?;
        }
        let mut regs = Registers::from(&self.regs);
        if self.insn.is_some() {
            // We ran syscalls in it: it now sits at a syscall-exit stop, where the
            // kernel no longer restarts the call it was interrupted in. Do it here.
            task::resume_interrupted_syscall(&mut regs, true);
        }
        self.tracee.set_regs(&regs.to_user_regs())?;
        self.tracee.detach(sig)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if !self.released {
            match self.release(None) {
                Ok(()) | Err(Error::Gone { .. }) => {}
                Err(e) => tracing::error!(
                    pid = self.tracee.pid,
                    "could not resume the target after a failed dump: {e}"
                ),
            }
        }
    }
}

/// Finds a `syscall` instruction (0f 05) in the target's vDSO.
fn find_syscall_insn(pid: i32, maps: &[proc::MapsEntry]) -> Result<u64> {
    let vdso = maps
        .iter()
        .find(|m| m.name == "[vdso]")
        .ok_or_else(|| Error::Refused {
            pid,
            reason: "has no vDSO, so crest cannot run system calls in it".into(),
        })?;
    let mut code = vec![0u8; vdso.len() as usize];
    crate::ptrace::read_mem(pid, vdso.start, &mut code)?;
    code.windows(2)
        .position(|w| w == [0x0f, 0x05])
        .map(|i| vdso.start + i as u64)
        .ok_or_else(|| Error::Refused {
            pid,
            reason: "no syscall instruction found in its vDSO".into(),
        })
}

/// Refuses targets crest must not or cannot touch, before freezing them.
fn precheck(pid: i32, status: &str, seized_by_us: bool) -> Result<()> {
    let threads: u32 = proc::status_field(status, "Threads")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    if threads > 1 {
        return Err(Error::unsupported(
            pid,
            format!("has {threads} threads: multi-threaded processes"),
        ));
    }
    let ours = std::process::id().to_string();
    let tracer = proc::status_field(status, "TracerPid")
        .filter(|t| *t != "0" && !(seized_by_us && *t == ours));
    if let Some(tracer) = tracer {
        return Err(Error::Refused {
            pid,
            reason: format!(
                "is traced by pid {tracer}; crest will not take over another tracer's process"
            ),
        });
    }
    if proc::status_field(status, "State").is_some_and(|s| s.starts_with('Z')) {
        return Err(Error::Refused {
            pid,
            reason: "is a zombie".into(),
        });
    }
    if pid == std::process::id() as i32 {
        return Err(Error::Refused {
            pid,
            reason: "is crest itself".into(),
        });
    }
    Ok(())
}

/// Dumps one single-threaded process into `opts.dir`.
pub fn dump(opts: &DumpOptions, progress: &indicatif::ProgressBar) -> Result<DumpStats> {
    dump_one(opts, progress).map_err(|e| match e {
        // Whatever failed, if the target died meanwhile that is the real reason.
        Error::Gone { .. } | Error::NoSuchProcess { .. } => e,
        _ if proc::is_gone(opts.pid) => Error::Gone {
            pid: opts.pid,
            during: "dump",
        },
        e => e,
    })
}

fn dump_one(opts: &DumpOptions, progress: &indicatif::ProgressBar) -> Result<DumpStats> {
    let pid = opts.pid;
    if !PathBuf::from(format!("/proc/{pid}")).exists() {
        return Err(Error::NoSuchProcess { pid });
    }
    let status = proc::read(pid, "status")?;
    precheck(pid, &status, false)?;
    if proc::read(pid, "maps")?.is_empty() {
        return Err(Error::Refused {
            pid,
            reason: "is a kernel thread".into(),
        });
    }

    let started = Instant::now();
    let tracee = Tracee::seize(pid)?;
    let mut frozen = Frozen {
        tracee,
        regs: tracee.regs()?,
        insn: None,
        scratch: None,
        released: false,
    };
    // Threads may have appeared between the check and the freeze.
    let status = proc::read(pid, "status")?;
    precheck(pid, &status, true)?;

    let maps = proc::maps(pid)?;
    let smaps = proc::read(pid, "smaps")?;
    let vmas = mm::collect_vmas(pid, &maps, &proc::parse_smaps_vmflags(&smaps))?;
    let files = files::collect(pid)?;
    if files.root != "/" {
        return Err(Error::unsupported(
            pid,
            format!("root directory {} (chroot)", files.root),
        ));
    }

    let insn = find_syscall_insn(pid, &maps)?;
    frozen.insn = Some(insn);
    let scratch = tracee.remote_ok(
        insn,
        libc::SYS_mmap,
        [
            0,
            PAGE_SIZE,
            (libc::PROT_READ | libc::PROT_WRITE) as u64,
            (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64,
            u64::MAX,
            0,
        ],
        "mmap of a scratch page",
    )?;
    frozen.scratch = Some(scratch);
    let remote = Remote {
        tracee,
        insn,
        scratch,
    };
    let mut thread = task::collect_thread(&remote)?;
    // The registers as they were before any of our remote calls.
    thread.regs = Registers::from(&frozen.regs);
    let state = task::collect_process(&remote, &status)?;
    let brk = remote.call(libc::SYS_brk, [0; 6], "brk(0)")?;
    tracee.remote_ok(
        insn,
        libc::SYS_munmap,
        [scratch, PAGE_SIZE, 0, 0, 0, 0],
        "munmap of crest's scratch page",
    )?;
    frozen.scratch = None;

    let mut fields =
        mm::parse_stat_mm_fields(&proc::read(pid, "stat")?).ok_or_else(|| Error::Refused {
            pid,
            reason: format!("cannot parse /proc/{pid}/stat"),
        })?;
    fields.brk = brk;
    let auxv_path = format!("/proc/{pid}/auxv");
    let auxv = mm::parse_auxv(&std::fs::read(&auxv_path).map_err(|e| Error::io(&auxv_path, e))?);
    let exe = proc::readlink(pid, "exe")?.to_string_lossy().into_owned();
    if exe.ends_with(" (deleted)") {
        return Err(Error::unsupported(
            pid,
            format!("its executable {exe} was deleted"),
        ));
    }

    let staging = Staging::new(&opts.dir)?;
    let mut stats = DumpStats::default();
    let mem_started = Instant::now();
    progress.set_message(format!("pid {pid}: memory"));
    let chunks = mm::collect_pages(
        pid,
        &vmas,
        &Image::pages_path(staging.path(), pid),
        &mut stats,
    )?;
    stats.memory_us = mem_started.elapsed().as_micros() as u64;

    let stat_ids = |key: &str| -> i32 {
        let s = proc::read(pid, "stat").unwrap_or_default();
        let rest = s.rfind(')').map(|i| &s[i + 2..]).unwrap_or("");
        let f: Vec<&str> = rest.split_whitespace().collect();
        let n = match key {
            "ppid" => 4,
            "pgid" => 5,
            _ => 6,
        };
        f.get(n - 3).and_then(|v| v.parse().ok()).unwrap_or(0)
    };
    let image = ProcessImage {
        pid,
        ppid: stat_ids("ppid"),
        pgid: stat_ids("pgid"),
        sid: stat_ids("sid"),
        threads: vec![thread],
        state,
        mm: mm::MmImage {
            vmas,
            fields,
            auxv,
            exe,
            chunks,
        },
        files,
    };
    stats.frozen_us = started.elapsed().as_micros() as u64;
    let mut meta = MetaWriter::new(&Header::current());
    meta.record(
        RecordKind::Inventory,
        &Inventory {
            root_pid: pid,
            pids: vec![pid],
            stats: stats.clone(),
        },
    );
    meta.record(RecordKind::Process, &image);
    meta.write_to(staging.path())?;
    staging.commit()?;

    match opts.after {
        AfterDump::Kill => {
            frozen.released = true;
            kill(tracee.nix_pid(), Signal::SIGKILL).map_err(|e| Error::sys(pid, "kill", e))?;
            // As its tracer we see its death first; after this its parent can reap it.
            let _ = waitpid(tracee.nix_pid(), Some(WaitPidFlag::__WALL));
        }
        AfterDump::LeaveRunning => frozen.release(None)?,
        AfterDump::Stop => frozen.release(Some(Signal::SIGSTOP))?,
    }
    tracing::info!(
        pid,
        frozen_ms = stats.frozen_us / 1000,
        pages = stats.pages_written,
        "dumped"
    );
    Ok(stats)
}
