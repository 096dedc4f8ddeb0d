//! Support for crest's benchmarks: a "memory hog" target process with a given
//! amount of dirty anonymous memory, image directories on tmpfs, and the
//! dump step and criterion groups the benchmarks share.
//!
//! The hog is the benchmark binary itself, re-executed with `CREST_BENCH_HOG`
//! set: [`hog_main_if_requested`] must be the first thing a bench's `main` calls.

use std::cell::RefCell;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use crest_engine::dump::PreCopyOptions;
use crest_engine::dump::{dump, AfterDump, DumpOptions, Scope};
use crest_engine::model::DumpStats;

const HOG_ENV: &str = "CREST_BENCH_HOG";

/// What a hog holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// `mib` MiB of dirty (non-zero) private anonymous memory.
    Dirty { mib: usize },
    /// A `reserve_gib` GiB MAP_NORESERVE reservation of which the first
    /// `touched_mib` MiB are dirty: dump cost must follow the touched part.
    Sparse {
        reserve_gib: usize,
        touched_mib: usize,
    },
    /// `count` one-page private anonymous mappings, each dirty (alternate
    /// pages read-only so that the kernel keeps them apart).
    ManyVmas { count: usize },
    /// `mib` MiB dirty, of which the first `writing_mib` MiB are written
    /// again and again while the hog runs (a pass every [`WRITE_PERIOD_MS`]):
    /// what a pre-copy dump must copy again while it is frozen.
    Writing { mib: usize, writing_mib: usize },
}

/// How often a [`Workload::Writing`] hog rewrites its working set.
pub const WRITE_PERIOD_MS: u64 = 10;

impl Workload {
    /// The bytes a dump copies: the benchmark's throughput unit.
    pub fn bytes(self) -> u64 {
        match self {
            Workload::Dirty { mib } => (mib as u64) << 20,
            Workload::Sparse { touched_mib, .. } => (touched_mib as u64) << 20,
            Workload::ManyVmas { count } => count as u64 * 4096,
            Workload::Writing { mib, .. } => (mib as u64) << 20,
        }
    }

    pub fn label(self) -> String {
        match self {
            Workload::Dirty { mib } => format!("{mib}MiB"),
            Workload::Sparse {
                reserve_gib,
                touched_mib,
            } => format!("sparse-{reserve_gib}GiB-{touched_mib}MiB"),
            Workload::ManyVmas { count } => format!("{count}-vmas"),
            Workload::Writing { mib, writing_mib } => format!("{mib}MiB-writing-{writing_mib}MiB"),
        }
    }

    fn to_env(self) -> String {
        match self {
            Workload::Dirty { mib } => format!("dirty:{mib}"),
            Workload::Sparse {
                reserve_gib,
                touched_mib,
            } => format!("sparse:{reserve_gib}:{touched_mib}"),
            Workload::ManyVmas { count } => format!("vmas:{count}"),
            Workload::Writing { mib, writing_mib } => format!("writing:{mib}:{writing_mib}"),
        }
    }

    fn from_env(s: &str) -> Option<Workload> {
        let mut it = s.split(':');
        let kind = it.next()?;
        let mut n = || it.next().and_then(|v| v.parse::<usize>().ok());
        Some(match kind {
            "dirty" => Workload::Dirty { mib: n()? },
            "sparse" => Workload::Sparse {
                reserve_gib: n()?,
                touched_mib: n()?,
            },
            "vmas" => Workload::ManyVmas { count: n()? },
            "writing" => Workload::Writing {
                mib: n()?,
                writing_mib: n()?,
            },
            _ => return None,
        })
    }
}

/// The cases every dump/restore benchmark covers.
pub const WORKLOADS: &[Workload] = &[
    Workload::Dirty { mib: 64 },
    Workload::Dirty { mib: 256 },
    Workload::Dirty { mib: 1024 },
    Workload::Sparse {
        reserve_gib: 64,
        touched_mib: 64,
    },
    Workload::ManyVmas { count: 10_000 },
];

fn map(len: usize, flags: i32) -> *mut u8 {
    // SAFETY: a fresh private anonymous mapping, checked for failure.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | flags,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED, "hog mmap");
    p.cast()
}

/// Fills `len` bytes at `p` with non-zero data, every page different.
fn dirty(p: *mut u8, len: usize) {
    // SAFETY: the caller's mapping of `len` writable bytes.
    let mem = unsafe { std::slice::from_raw_parts_mut(p, len) };
    mem.fill(0x5a);
    for (i, page) in mem.chunks_mut(4096).enumerate() {
        page[..8].copy_from_slice(&(i as u64 + 1).to_ne_bytes());
    }
}

/// If this process was started as a hog, become one and never return.
pub fn hog_main_if_requested() {
    let Some(w) = std::env::var(HOG_ENV)
        .ok()
        .and_then(|v| Workload::from_env(&v))
    else {
        return;
    };
    match w {
        Workload::Dirty { mib } => dirty(map(mib << 20, 0), mib << 20),
        Workload::Sparse {
            reserve_gib,
            touched_mib,
        } => dirty(
            map(reserve_gib << 30, libc::MAP_NORESERVE),
            touched_mib << 20,
        ),
        Workload::ManyVmas { count } => {
            let p = map(count * 4096, 0);
            dirty(p, count * 4096);
            for i in (1..count).step_by(2) {
                // SAFETY: a page of the mapping made above.
                let r = unsafe { libc::mprotect(p.add(i * 4096).cast(), 4096, libc::PROT_READ) };
                assert_eq!(r, 0, "hog mprotect");
            }
        }
        Workload::Writing { mib, writing_mib } => {
            let p = map(mib << 20, 0);
            dirty(p, mib << 20);
            println!("ready");
            let len = writing_mib.min(mib) << 20;
            for pass in 0u64.. {
                // SAFETY: the first `len` bytes of the mapping made above.
                let mem = unsafe { std::slice::from_raw_parts_mut(p, len) };
                for page in mem.chunks_mut(4096) {
                    page[8..16].copy_from_slice(&pass.to_ne_bytes());
                }
                std::thread::sleep(std::time::Duration::from_millis(WRITE_PERIOD_MS));
            }
        }
    }
    println!("ready");
    loop {
        // SAFETY: pause() just waits for a signal.
        unsafe { libc::pause() };
    }
}

/// A running hog process.
pub struct Hog {
    pub child: Child,
    pub pid: i32,
}

impl Hog {
    pub fn spawn(w: Workload) -> Result<Hog> {
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.env(HOG_ENV, w.to_env())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        // SAFETY: async-signal-safe syscalls only.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                // Only stdio: fds leaked into the bench runner are not the hog's.
                libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
                Ok(())
            });
        }
        let mut child = cmd.spawn().context("spawn hog")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
        if line.trim() != "ready" {
            bail!("hog did not start: {line:?}");
        }
        let pid = child.id() as i32;
        Ok(Hog { child, pid })
    }
}

impl Drop for Hog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh directory on tmpfs for images (`/dev/shm`), removed on drop.
pub struct ImageDir(pub PathBuf);

impl ImageDir {
    pub fn new(name: &str) -> ImageDir {
        let p = PathBuf::from(format!(
            "/dev/shm/crest-bench-{}-{name}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        ImageDir(p)
    }

    pub fn clear(&self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Drop for ImageDir {
    fn drop(&mut self) {
        self.clear();
    }
}

/// Whether this process may checkpoint (root); benches print why they skip otherwise.
pub fn can_run() -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("crest benchmarks need root (ptrace, clone3 set_tid): skipped");
        return false;
    }
    true
}

/// The `main` of each benchmark binary: becomes a hog when asked to, skips
/// without root, else runs `bench` under criterion's command line.
pub fn bench_main(bench: fn(&mut criterion::Criterion)) {
    hog_main_if_requested();
    if !can_run() {
        return;
    }
    let mut c = criterion::Criterion::default().configure_from_args();
    bench(&mut c);
    c.final_summary();
}

/// A benchmark group with the settings every crest benchmark uses: each
/// sample dumps or restores hundreds of MiB, so few samples, short warm-up.
pub fn group<'a>(
    c: &'a mut criterion::Criterion,
    name: &str,
) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut group = c.benchmark_group(name);
    group
        .sample_size(10)
        .sampling_mode(criterion::SamplingMode::Flat)
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(5));
    group
}

/// Touches and frees `$CREST_BENCH_WARM_GIB` GiB (default 1) before a timed
/// step: this machine gives freed memory back to its host, and memory touched
/// for the first time after that is several times slower, which would make
/// timings bimodal.
pub fn warm() {
    let gib: usize = std::env::var("CREST_BENCH_WARM_GIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    if gib == 0 {
        return;
    }
    let p = map(gib << 30, libc::MAP_NORESERVE);
    // SAFETY: the mapping just made.
    unsafe {
        std::ptr::write_bytes(p, 1, gib << 30);
        libc::munmap(p.cast(), gib << 30);
    }
}

/// The options every benchmark dumps a hog with: its whole tree, into `dir`,
/// pre-copied or not as given, nothing else asked for.
pub fn dump_options(
    pid: i32,
    dir: &ImageDir,
    after: AfterDump,
    pre_copy: Option<PreCopyOptions>,
) -> DumpOptions {
    DumpOptions {
        pid,
        dir: dir.0.clone(),
        after,
        scope: Scope::Tree,
        tcp_established: false,
        callback_timeout: crest_engine::api::DEFAULT_CALLBACK_TIMEOUT,
        save_files: None,
        verify_files_hash: false,
        include_files: vec![],
        pre_copy,
    }
}

/// Dumps the running hog `pid` into `dir` and leaves it running, so that one
/// hog serves every iteration: the dump's wall time and its stats. Memory is
/// warmed and `dir` emptied first, outside the timed part.
pub fn timed_dump(
    pid: i32,
    dir: &ImageDir,
    pre_copy: Option<PreCopyOptions>,
    bar: &indicatif::ProgressBar,
) -> (Duration, DumpStats) {
    warm();
    dir.clear();
    let opts = dump_options(pid, dir, AfterDump::LeaveRunning, pre_copy);
    let t = Instant::now();
    let stats = dump(&opts, bar).expect("dump");
    (t.elapsed(), stats)
}

/// Benchmarks `one_dump` (a dump's wall time and stats) as `id` in two groups:
/// the wall time in `wall_group`, then the target's frozen time, read from
/// the stats, in `frozen_group`. The frozen group takes the frozen times of
/// the dumps already timed before it dumps again, as each dump is costly.
pub fn bench_dump_wall_and_frozen(
    c: &mut criterion::Criterion,
    wall_group: &str,
    frozen_group: &str,
    id: criterion::BenchmarkId,
    throughput: Option<criterion::Throughput>,
    one_dump: impl Fn() -> (Duration, DumpStats),
) {
    // Frozen times of the dumps timed so far, for `frozen_group`.
    let frozen = RefCell::new(Vec::new());
    let dump_keeping_frozen = || {
        let (took, stats) = one_dump();
        frozen
            .borrow_mut()
            .push(Duration::from_micros(stats.frozen_us));
        took
    };
    {
        let mut wall = group(c, wall_group);
        if let Some(throughput) = throughput {
            wall.throughput(throughput);
        }
        wall.bench_function(id.clone(), |b| {
            b.iter_custom(|iters| (0..iters).map(|_| dump_keeping_frozen()).sum())
        });
        wall.finish();
    }
    let mut frozen_times = group(c, frozen_group);
    frozen_times.bench_function(id, |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    if frozen.borrow().is_empty() {
                        dump_keeping_frozen();
                    }
                    frozen.borrow_mut().pop().expect("a dump was timed")
                })
                .sum()
        })
    });
    frozen_times.finish();
}
