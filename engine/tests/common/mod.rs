//! Helpers for the engine's end-to-end tests: start a workload the way the
//! conformance harness does, dump it, restore it.
#![allow(dead_code)]

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn crest() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_crest"))
}

/// A binary of the `crest-workloads` crate, built beside this test.
pub fn workload(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    let dir = exe.parent().and_then(Path::parent).expect("target/debug");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace` (or build it with `cargo build -p crest-workloads`)",
        path.display()
    );
    path
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Skips the calling test (with a visible reason) unless running as root.
#[macro_export]
macro_rules! require_root {
    () => {
        if !common::is_root() {
            eprintln!("skipped: checkpoint/restore needs root (ptrace, clone3 set_tid)");
            return;
        }
    };
}

/// A started workload in its own session, stdio in files of `dir`.
pub struct Running {
    pub child: Child,
    pub pid: i32,
    pub dir: PathBuf,
}

/// A test that fails half-way must not leave its workload behind (stopped by
/// `dump --stop`, say): the original child is killed and reaped on drop.
impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn start(dir: &Path, program: &Path, args: &[&str], protocol: bool) -> Running {
    fs::create_dir_all(dir).unwrap();
    let mut cmd = Command::new(program);
    if protocol {
        cmd.arg("--ctl").arg(dir);
    }
    cmd.args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(fs::File::create(dir.join("stdout")).unwrap())
        .stderr(fs::File::create(dir.join("stderr")).unwrap());
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            // Descriptors leaked into the test runner are not the workload's.
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            Ok(())
        });
    }
    let child = cmd.spawn().expect("spawn workload");
    let pid = child.id() as i32;
    Running {
        child,
        pid,
        dir: dir.to_path_buf(),
    }
}

pub fn wait_for_file(path: &Path, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn run_crest(args: &[&str]) -> Output {
    Command::new(crest())
        .args(args)
        .output()
        .expect("run crest")
}

pub fn dump(pid: i32, img: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "dump".to_string(),
        "-t".into(),
        pid.to_string(),
        "-D".into(),
        img.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    run_crest(&refs)
}

/// `crest restore -D img` in the background (crest stays the parent).
/// It writes `out_dir/restored.pid` once the process runs.
pub fn restore_attached(img: &Path, out_dir: &Path) -> Child {
    let _ = fs::remove_file(out_dir.join("restored.pid"));
    Command::new(crest())
        .args(["restore", "--pidfile"])
        .arg(out_dir.join("restored.pid"))
        .arg("-D")
        .arg(img)
        .stdin(Stdio::null())
        .stdout(fs::File::create(out_dir.join("restore.stdout")).unwrap())
        .stderr(fs::File::create(out_dir.join("restore.stderr")).unwrap())
        .spawn()
        .expect("spawn crest restore")
}

pub fn wait_with_timeout(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("timed out after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn stderr_of(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn alive(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

/// `/proc/PID/maps` with adjacent anonymous mappings of the same protection
/// merged: the kernel may or may not merge such neighbours (it depends on the
/// history of faults), so only the merged view is comparable across a restore.
pub fn merged_maps(pid: i32) -> Vec<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    let mut out: Vec<(u64, u64, String)> = Vec::new();
    for line in text.lines() {
        let mut f = line.split_whitespace();
        let range = f.next().unwrap_or("");
        let (s, e) = range.split_once('-').unwrap_or(("0", "0"));
        let (s, e) = (
            u64::from_str_radix(s, 16).unwrap_or(0),
            u64::from_str_radix(e, 16).unwrap_or(0),
        );
        let rest: Vec<&str> = f.collect();
        let key = rest.join(" ");
        let anonymous = rest.len() == 4 && rest[3] == "0";
        if let Some(last) = out.last_mut() {
            if anonymous && last.1 == s && last.2 == key {
                last.1 = e;
                continue;
            }
        }
        out.push((s, e, key));
    }
    out.into_iter()
        .map(|(s, e, k)| format!("{s:x}-{e:x} {k}"))
        .collect()
}

/// Spawns `cmd` as the leader of a new session, with only its stdio open
/// (descriptors leaked into the test runner are not the program's).
pub fn spawn_in_own_session(cmd: &mut Command) -> Child {
    // SAFETY: async-signal-safe syscalls only, between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            Ok(())
        });
    }
    cmd.spawn().expect("spawn")
}
