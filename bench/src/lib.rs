//! Support for crest's benchmarks: a "memory hog" target process with a given
//! amount of dirty anonymous memory, and image directories on tmpfs.
//!
//! The hog is the benchmark binary itself, re-executed with `CREST_BENCH_HOG`
//! set: [`hog_main_if_requested`] must be the first thing a bench's `main` calls.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context, Result};

const HOG_ENV: &str = "CREST_BENCH_HOG_MIB";

/// If this process was started as a hog, become one and never return.
pub fn hog_main_if_requested() {
    let Some(mib) = std::env::var(HOG_ENV)
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    else {
        return;
    };
    let len = mib << 20;
    // SAFETY: a fresh private anonymous mapping, checked for failure.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED, "hog mmap");
    // SAFETY: `p` maps `len` bytes we own; fill every page with non-zero data.
    let mem = unsafe { std::slice::from_raw_parts_mut(p.cast::<u64>(), len / 8) };
    for (i, w) in mem.iter_mut().enumerate() {
        *w = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    }
    println!("ready");
    loop {
        // SAFETY: pause() just waits for a signal.
        unsafe { libc::pause() };
    }
}

/// A running hog process with `mib` MiB of dirty anonymous memory.
pub struct Hog {
    pub child: Child,
    pub pid: i32,
}

impl Hog {
    pub fn spawn(mib: usize) -> Result<Hog> {
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.env(HOG_ENV, mib.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
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
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(5));
    group
}
