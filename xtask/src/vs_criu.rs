//! `cargo xtask bench --vs-criu`: crest and CRIU on the same workload, one
//! interleaved run, images on the same store. The tools' order alternates
//! between rounds (crest first, then CRIU first), and every restored
//! process's memory is read back against the pattern it was dumped with.
//!
//! The workload is this binary re-executed as a "hog" with N MiB of dirty
//! anonymous memory. Before every timed step a few GiB are touched and freed:
//! this machine returns freed memory to its host, and the first touch of
//! memory given back is several times slower than of memory still held,
//! which would otherwise make whichever tool runs second look faster.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::criu::{self, Criu};

const HOG_ENV: &str = "CREST_XTASK_HOG_MIB";

#[derive(Debug, Clone, clap::Args)]
pub struct VsCriuArgs {
    /// Dirty anonymous memory of the workload, in MiB.
    #[arg(long, default_value_t = 1024)]
    pub mib: usize,
    /// Samples per tool (medians are reported).
    #[arg(long, default_value_t = 5)]
    pub samples: usize,
    /// Directory for the images of both tools (and the dd reference file).
    #[arg(long, default_value = "/dev/shm/crest-vs-criu")]
    pub store: PathBuf,
    /// GiB touched and freed before every timed step.
    #[arg(long, default_value_t = 3)]
    pub warm_gib: usize,
    /// Debian archive URL to provision CRIU from (default:
    /// $CREST_DEBIAN_MIRROR, else the system's apt sources).
    #[arg(long)]
    pub mirror: Option<String>,
}

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
    // SAFETY: `p` maps `len` bytes we own.
    let mem = unsafe { std::slice::from_raw_parts_mut(p.cast::<u8>(), len) };
    // Every page non-zero and different (memset keeps a debug build fast).
    mem.fill(HOG_FILL);
    for (i, page) in mem.chunks_mut(4096).enumerate() {
        page[..8].copy_from_slice(&(i as u64).to_ne_bytes());
    }
    println!("ready {:x}", p as usize);
    // From now on only /dev/null: nothing ties the hog to this process.
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        use std::os::fd::AsRawFd;
        // SAFETY: dup2 onto stdout/stderr.
        unsafe {
            libc::dup2(null.as_raw_fd(), 1);
            libc::dup2(null.as_raw_fd(), 2);
        }
    }
    loop {
        // SAFETY: pause() just waits for a signal.
        unsafe { libc::pause() };
    }
}

/// The hog's memory: every byte this, but each page's first eight, which
/// hold the page's index.
const HOG_FILL: u8 = 0x5a;

/// The first page of `mem` (page `first` of the hog) that is not the
/// hog's pattern.
fn pattern_mismatch(mem: &[u8], first: u64) -> Option<u64> {
    mem.chunks(4096).enumerate().find_map(|(i, page)| {
        let n = first + i as u64;
        let ok = page.len() >= 8
            && page[..8] == n.to_ne_bytes()
            && page[8..].iter().all(|&b| b == HOG_FILL);
        (!ok).then_some(n)
    })
}

/// Reads a restored hog's `mib` MiB at `addr` back (process_vm_readv, 8 MiB
/// at a time) and checks every page against the pattern it was dumped with.
fn check_restored_memory(tool: Tool, pid: i32, addr: usize, mib: usize) -> Result<()> {
    use nix::sys::uio::{process_vm_readv, RemoteIoVec};
    const STEP: usize = 8 << 20;
    let len = mib << 20;
    let mut buf = vec![0u8; STEP];
    let mut off = 0;
    while off < len {
        let n = STEP.min(len - off);
        let got = process_vm_readv(
            nix::unistd::Pid::from_raw(pid),
            &mut [std::io::IoSliceMut::new(&mut buf[..n])],
            &[RemoteIoVec {
                base: addr + off,
                len: n,
            }],
        )
        .with_context(|| {
            format!(
                "{tool:?} restore: reading pid {pid}'s memory at {:#x}",
                addr + off
            )
        })?;
        if got != n {
            bail!(
                "{tool:?} restore: pid {pid}: short read of its memory at {:#x}",
                addr + off
            );
        }
        if let Some(page) = pattern_mismatch(&buf[..n], (off / 4096) as u64) {
            bail!(
                "{tool:?} restore: pid {pid}: page {page} (at {:#x}) is not what was dumped",
                addr + page as usize * 4096
            );
        }
        off += n;
    }
    Ok(())
}

/// A hog, and the address of its memory.
fn spawn_hog(mib: usize) -> Result<(Child, usize)> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.env(HOG_ENV, mib.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    // SAFETY: async-signal-safe syscalls only.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("spawn hog")?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
    let Some(addr) = line
        .trim()
        .strip_prefix("ready ")
        .and_then(|a| usize::from_str_radix(a, 16).ok())
    else {
        bail!("hog did not start: {line:?}");
    };
    Ok((child, addr))
}

/// Touches and frees `gib` GiB so that the next step runs on memory the
/// machine holds (see the module comment).
fn warm(gib: usize) {
    let len = gib << 30;
    if len == 0 {
        return;
    }
    // SAFETY: a fresh private anonymous mapping, unmapped below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return;
    }
    // SAFETY: `p` maps `len` bytes we own.
    let mem = unsafe { std::slice::from_raw_parts_mut(p.cast::<u8>(), len) };
    mem.fill(1);
    // SAFETY: unmapping exactly the mapping made above.
    unsafe { libc::munmap(p, len) };
}

/// Kills `pid` (a restored process, reparented to us as subreaper) and reaps it.
fn kill_and_reap(pid: i32) {
    // SAFETY: plain kill/waitpid of a process we are the (sub)reaper of.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, std::ptr::null_mut(), 0);
    }
}

/// CPU time (user + system) of the waited-for children so far.
fn children_cpu() -> Duration {
    // SAFETY: getrusage fills the struct we pass.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Runs `cmd` to completion: its wall time and its CPU time (all its
/// threads and waited-for children), the latter barely affected by other
/// load on the machine.
fn run_timed(cmd: Command, what: &str, log: &Path) -> Result<Duration> {
    run_measured(cmd, what, log).map(|(wall, _)| wall)
}

fn run_measured(mut cmd: Command, what: &str, log: &Path) -> Result<(Duration, Duration)> {
    let cpu0 = children_cpu();
    let t = Instant::now();
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {what}"))?;
    let took = t.elapsed();
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}(log: {})",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            log.display()
        );
    }
    Ok((took, children_cpu().saturating_sub(cpu0)))
}

/// One sample of one tool.
#[derive(Debug, Clone, Copy)]
struct Sample {
    dump: Duration,
    restore: Duration,
    frozen: Duration,
    dump_cpu: Duration,
    restore_cpu: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tool {
    Crest,
    /// `crest dump --pre-copy`: frozen only for what changed since the
    /// copy made while it ran (the hog writes nothing meanwhile).
    CrestPreCopy,
    Criu,
}

struct Tools {
    crest: PathBuf,
    criu: Criu,
}

fn resident_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

fn sample(tool: Tool, tools: &Tools, a: &VsCriuArgs) -> Result<Sample> {
    let dir = a.store.join(match tool {
        Tool::Crest => "crest",
        Tool::CrestPreCopy => "crest-pre-copy",
        Tool::Criu => "criu",
    });
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let (mut hog, addr) = spawn_hog(a.mib)?;
    let pid = hog.id() as i32;
    warm(a.warm_gib);
    let log = dir.join("dump.log");
    let cmd = match tool {
        Tool::Crest | Tool::CrestPreCopy => {
            let mut c = Command::new(&tools.crest);
            c.args(["dump", "-t", &pid.to_string(), "-D"]).arg(&dir);
            if tool == Tool::CrestPreCopy {
                c.arg("--pre-copy");
            }
            c
        }
        Tool::Criu => {
            let mut c = tools.criu.command();
            c.args(["dump", "-t", &pid.to_string(), "-D"])
                .arg(&dir)
                .arg("-o")
                .arg(&log);
            c
        }
    };
    let dump = run_measured(cmd, &format!("{tool:?} dump"), &log);
    let _ = hog.kill();
    let _ = hog.wait();
    let (dump, dump_cpu) = dump?;
    let frozen = match tool {
        Tool::Crest | Tool::CrestPreCopy => crest_frozen(&tools.crest, &dir)?,
        Tool::Criu => {
            let st = criu_dump_stats(&dir.join("stats-dump"))?;
            Duration::from_micros(st.frozen_us)
        }
    };

    warm(a.warm_gib);
    let log = dir.join("restore.log");
    let cmd = match tool {
        Tool::Crest | Tool::CrestPreCopy => {
            let mut c = Command::new(&tools.crest);
            c.args(["restore", "-d", "-D"]).arg(&dir);
            c
        }
        Tool::Criu => {
            let mut c = tools.criu.command();
            c.args(["restore", "-d", "-D"])
                .arg(&dir)
                .arg("-o")
                .arg(&log);
            c
        }
    };
    // The CPU of a restore includes the restored process's own (CRIU's
    // restorer runs in it): counted once it is reaped.
    let cpu0 = children_cpu();
    let restore = run_timed(cmd, &format!("{tool:?} restore"), &log);
    let rss = resident_kib(pid);
    // Read back before it is killed (not timed): the restore must have put
    // back every page as dumped.
    let checked = restore
        .as_ref()
        .ok()
        .map(|_| check_restored_memory(tool, pid, addr, a.mib));
    kill_and_reap(pid);
    let restore_cpu = children_cpu().saturating_sub(cpu0);
    let restore = restore?;
    if let Some(c) = checked {
        c?;
    }
    if rss < (a.mib as u64) << 10 {
        bail!(
            "{tool:?} restore: pid {pid} has {rss} KiB resident, less than the {} MiB dumped",
            a.mib
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Sample {
        dump,
        restore,
        frozen,
        dump_cpu,
        restore_cpu,
    })
}

fn crest_frozen(crest: &Path, dir: &Path) -> Result<Duration> {
    let out = Command::new(crest)
        .args(["show", "--json"])
        .arg(dir)
        .output()
        .context("crest show")?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("crest show --json")?;
    let us = v["inventory"]["stats"]["frozen_us"]
        .as_u64()
        .context("no inventory.stats.frozen_us in the image")?;
    Ok(Duration::from_micros(us))
}

/// The figures of CRIU's `stats-dump` this comparison uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CriuDumpStats {
    pub freezing_us: u64,
    pub frozen_us: u64,
    pub memdump_us: u64,
    pub memwrite_us: u64,
    pub pages_written: u64,
}

fn varint(b: &[u8], i: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*i)?;
        *i += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// Decodes `stats-dump`: a service-image magic, the stats magic, a u32
/// length and a `stats_entry` protobuf whose field 1 is `dump_stats_entry`
/// (1 freezing_time, 2 frozen_time, 3 memdump_time, 4 memwrite_time, all µs;
/// 7 pages_written). Decoded by hand: it is five varints.
pub fn parse_criu_dump_stats(img: &[u8]) -> Option<CriuDumpStats> {
    const SERVICE_MAGIC: u32 = 0x5510_5940;
    const STATS_MAGIC: u32 = 0x5709_3306;
    let word = |at: usize| Some(u32::from_le_bytes(img.get(at..at + 4)?.try_into().ok()?));
    if word(0)? != SERVICE_MAGIC || word(4)? != STATS_MAGIC {
        return None;
    }
    let len = word(8)? as usize;
    let entry = img.get(12..12 + len)?;
    let mut i = 0;
    while i < entry.len() {
        let key = varint(entry, &mut i)?;
        if key & 7 != 2 {
            // Not length-delimited: skip a varint (only other kind used here).
            varint(entry, &mut i)?;
            continue;
        }
        let n = varint(entry, &mut i)? as usize;
        let body = entry.get(i..i + n)?;
        i += n;
        if key >> 3 != 1 {
            continue;
        }
        let mut s = CriuDumpStats::default();
        let mut j = 0;
        while j < body.len() {
            let k = varint(body, &mut j)?;
            if k & 7 != 0 {
                return None;
            }
            let v = varint(body, &mut j)?;
            match k >> 3 {
                1 => s.freezing_us = v,
                2 => s.frozen_us = v,
                3 => s.memdump_us = v,
                4 => s.memwrite_us = v,
                7 => s.pages_written = v,
                _ => {}
            }
        }
        return Some(s);
    }
    None
}

fn criu_dump_stats(path: &Path) -> Result<CriuDumpStats> {
    let b = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
    parse_criu_dump_stats(&b).with_context(|| format!("{}: not a CRIU stats image", path.display()))
}

/// Writes `mib` MiB of zeros to the store with dd (1 MiB blocks), as the
/// reference for what the store absorbs.
fn dd(store: &Path, mib: usize) -> Result<Duration> {
    let f = store.join("dd.img");
    let mut c = Command::new("dd");
    c.arg("if=/dev/zero")
        .arg(format!("of={}", f.display()))
        .args(["bs=1M", &format!("count={mib}")])
        .stderr(Stdio::null());
    let took = run_timed(c, "dd", &f);
    let _ = std::fs::remove_file(&f);
    took
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn build_crest() -> Result<PathBuf> {
    let st = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .current_dir(crate::support::workspace_root())
        .args(["build", "--release", "-p", "crest-engine", "--bin", "crest"])
        .status()
        .context("cargo build crest")?;
    if !st.success() {
        bail!("building crest (release) failed ({st})");
    }
    Ok(crate::support::target_dir().join("release").join("crest"))
}

pub fn main(a: VsCriuArgs) -> Result<i32> {
    if a.samples == 0 || a.mib == 0 {
        bail!("--samples and --mib must be positive");
    }
    let criu = criu::ensure(a.mirror.as_deref())?;
    let crest = build_crest()?;
    // Restored processes (detached from crest and criu) become our children.
    // SAFETY: prctl on ourselves.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    std::fs::create_dir_all(&a.store)?;
    let tools = Tools { crest, criu };
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    eprintln!(
        "crest {} vs CRIU {} ({}); {} MiB, {} samples, store {}, load {}",
        tools.crest.display(),
        tools.criu.version,
        tools.criu.origin,
        a.mib,
        a.samples,
        a.store.display(),
        load.trim()
    );
    let mut crest = Vec::new();
    let mut criu = Vec::new();
    let mut pre_copy = Vec::new();
    let mut dds = Vec::new();
    for i in 0..a.samples {
        warm(a.warm_gib);
        dds.push(dd(&a.store, a.mib)?);
        // Alternate who goes first, so that neither tool always meets the
        // machine in the state the other left it in.
        let order = if i % 2 == 0 {
            [Tool::Crest, Tool::Criu, Tool::CrestPreCopy]
        } else {
            [Tool::Criu, Tool::Crest, Tool::CrestPreCopy]
        };
        for tool in order {
            let s = sample(tool, &tools, &a)?;
            eprintln!(
                "sample {}/{} {tool:?}: dump {:.0} ms (CPU {:.0}), restore {:.0} ms (CPU {:.0}), frozen {:.0} ms",
                i + 1,
                a.samples,
                s.dump.as_secs_f64() * 1e3,
                s.dump_cpu.as_secs_f64() * 1e3,
                s.restore.as_secs_f64() * 1e3,
                s.restore_cpu.as_secs_f64() * 1e3,
                s.frozen.as_secs_f64() * 1e3
            );
            match tool {
                Tool::Crest => crest.push(s),
                Tool::CrestPreCopy => pre_copy.push(s),
                Tool::Criu => criu.push(s),
            }
        }
    }
    let bytes = (a.mib as f64) * 1048576.0;
    let gibs = |d: Duration| bytes / d.as_secs_f64() / (1u64 << 30) as f64;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let dd_med = median(dds.clone());
    println!(
        "\n{} MiB dirty anonymous memory, images on {}, medians of {} interleaved samples",
        a.mib,
        a.store.display(),
        a.samples
    );
    println!(
        "\n| | crest | CRIU {} | crest/CRIU speed |",
        tools.criu.version
    );
    println!("|---|---|---|---|");
    type Pick = fn(&Sample) -> Duration;
    let rows: [(&str, Pick, bool); 5] = [
        ("dump", |s| s.dump, true),
        ("restore", |s| s.restore, true),
        ("frozen", |s| s.frozen, false),
        ("dump CPU (user+sys)", |s| s.dump_cpu, false),
        ("restore CPU (user+sys)", |s| s.restore_cpu, false),
    ];
    for (name, pick, rate) in rows {
        let c = median(crest.iter().map(pick).collect());
        let r = median(criu.iter().map(pick).collect());
        let cell = |d: Duration| {
            if rate {
                format!("{:.0} ms ({:.2} GiB/s)", ms(d), gibs(d))
            } else {
                format!("{:.0} ms", ms(d))
            }
        };
        println!(
            "| {name} | {} | {} | {:.2}× |",
            cell(c),
            cell(r),
            r.as_secs_f64() / c.as_secs_f64()
        );
    }
    let p = median(pre_copy.iter().map(|s| s.frozen).collect());
    let r = median(criu.iter().map(|s| s.frozen).collect());
    println!(
        "| frozen, crest dump --pre-copy (CRIU cannot pre-dump without soft-dirty) | {:.0} ms | {:.0} ms | {:.2}× |",
        ms(p),
        ms(r),
        r.as_secs_f64() / p.as_secs_f64()
    );
    println!(
        "| dd to the store (1 MiB blocks) | {:.0} ms ({:.2} GiB/s) | | |",
        ms(dd_med),
        gibs(dd_med)
    );
    let c_dump = median(crest.iter().map(|s| s.dump).collect());
    println!(
        "\ncrest dump reaches {:.0}% of dd's rate to the store. crest's frozen time runs from the first freeze to the image being complete; CRIU's is its stats-dump frozen_time (freezing not included).",
        100.0 * dd_med.as_secs_f64() / c_dump.as_secs_f64()
    );
    // This machine's memory speed changes between rounds; a ratio within one
    // round compares like with like.
    let round = |name: &str, num: &[Duration], den: &[Duration], percent: bool| {
        let show = |x: f64| {
            if percent {
                format!("{:.0}%", x * 100.0)
            } else {
                format!("{x:.2}×")
            }
        };
        let r = paired_ratios(num, den);
        let (lo, hi) = r
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
        println!(
            "{name}, round by round: median {} (from {} to {})",
            show(median_f64(&r)),
            show(lo),
            show(hi)
        );
    };
    println!();
    let pick = |v: &[Sample], f: fn(&Sample) -> Duration| v.iter().map(f).collect::<Vec<_>>();
    let crest_dumps = pick(&crest, |s| s.dump);
    round(
        "crest/CRIU dump speed",
        &pick(&criu, |s| s.dump),
        &crest_dumps,
        false,
    );
    round(
        "crest/CRIU restore speed",
        &pick(&criu, |s| s.restore),
        &pick(&crest, |s| s.restore),
        false,
    );
    round("crest dump rate / dd's", &dds, &crest_dumps, true);
    Ok(0)
}

/// `num[i] / den[i]` for each round `i`.
fn paired_ratios(num: &[Duration], den: &[Duration]) -> Vec<f64> {
    num.iter()
        .zip(den)
        .map(|(n, d)| n.as_secs_f64() / d.as_secs_f64())
        .collect()
}

fn median_f64(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hog_pattern_is_checked_page_by_page() {
        let mut mem = vec![HOG_FILL; 3 * 4096];
        for (i, page) in mem.chunks_mut(4096).enumerate() {
            page[..8].copy_from_slice(&(10 + i as u64).to_ne_bytes());
        }
        assert_eq!(pattern_mismatch(&mem, 10), None);
        assert_eq!(pattern_mismatch(&mem, 11), Some(11));
        mem[2 * 4096 + 100] ^= 1;
        assert_eq!(pattern_mismatch(&mem, 10), Some(12));
    }

    #[test]
    fn ratios_are_taken_round_by_round() {
        let ms = Duration::from_millis;
        let r = paired_ratios(&[ms(800), ms(1000), ms(600)], &[ms(400), ms(800), ms(600)]);
        assert_eq!(r, vec![2.0, 1.25, 1.0]);
        assert_eq!(median_f64(&r), 1.25);
        assert_eq!(median_f64(&[1.0, 3.0, 2.0, 4.0]), 2.5);
        assert!(median_f64(&[]).is_nan());
    }

    #[test]
    fn criu_stats_decode() {
        // service magic, stats magic, len, stats_entry{dump{1:5,2:300,3:7,4:9,7:262144}}
        let dump: Vec<u8> = vec![
            0x08, 5, 0x10, 0xac, 0x02, 0x18, 7, 0x20, 9, 0x38, 0x80, 0x80, 0x10,
        ];
        let mut entry = vec![0x0a, dump.len() as u8];
        entry.extend(&dump);
        let mut img = Vec::new();
        img.extend(0x5510_5940u32.to_le_bytes());
        img.extend(0x5709_3306u32.to_le_bytes());
        img.extend((entry.len() as u32).to_le_bytes());
        img.extend(&entry);
        let s = parse_criu_dump_stats(&img).unwrap();
        assert_eq!(
            s,
            CriuDumpStats {
                freezing_us: 5,
                frozen_us: 300,
                memdump_us: 7,
                memwrite_us: 9,
                pages_written: 262144
            }
        );
        assert!(parse_criu_dump_stats(&img[..10]).is_none());
        assert!(parse_criu_dump_stats(&[0; 16]).is_none());
    }
}
