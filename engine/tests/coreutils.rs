//! Programs not written here, checked from outside.

mod common;

use std::fs;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const TIMEOUT: Duration = Duration::from_secs(120);

/// `dd bs=1` copying a file one byte per syscall pair: dumped mid-copy and
/// restored, it must produce exactly the input — offsets of both files, the
/// process's memory and registers all have to be right.
#[test]
fn dd_copying_a_file_byte_by_byte_resumes_mid_copy() {
    require_root!();
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("input");
    let output = tmp.path().join("output");
    let data: Vec<u8> = (0..400_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    fs::write(&input, &data).unwrap();
    let mut cmd = Command::new("dd");
    cmd.arg(format!("if={}", input.display()))
        .arg(format!("of={}", output.display()))
        .args(["bs=1", "status=none"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(tmp.path().join("dd.stderr")).unwrap());
    // SAFETY: async-signal-safe syscalls only.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let pid = child.id() as i32;
    // Wait until it is part-way through.
    let deadline = Instant::now() + TIMEOUT;
    while fs::metadata(&output).map(|m| m.len()).unwrap_or(0) < 20_000 {
        assert!(Instant::now() < deadline, "dd made no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    let img = tmp.path().join("img");
    let out = dump(pid, &img, &[]);
    assert!(out.status.success(), "dump: {}", stderr_of(&out));
    let copied = fs::metadata(&output).unwrap().len();
    assert!(
        copied < data.len() as u64,
        "dd finished before the dump; make the input larger"
    );
    assert!(!child.wait().unwrap().success(), "the dump killed dd");
    let out = run_crest(&["restore", "-D", img.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "restored dd exits 0: {}",
        stderr_of(&out)
    );
    assert_eq!(
        fs::read(&output).unwrap(),
        data,
        "output differs from the input"
    );
}

/// A restored `sleep` is the same process (PID, command line) and exits 0.
#[test]
fn sleep_keeps_its_pid_and_exits_normally() {
    require_root!();
    let tmp = tempfile::tempdir().unwrap();
    let mut cmd = Command::new("sleep");
    cmd.arg("1.5")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: async-signal-safe syscalls only.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let pid = child.id() as i32;
    std::thread::sleep(Duration::from_millis(200));
    let img = tmp.path().join("img");
    let out = dump(pid, &img, &[]);
    assert!(out.status.success(), "dump: {}", stderr_of(&out));
    child.wait().unwrap();
    let mut restore = restore_attached(&img, tmp.path());
    wait_for_file(&tmp.path().join("restored.pid"), TIMEOUT);
    assert_eq!(
        fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap(),
        "sleep\x001.5\x00"
    );
    assert_eq!(
        fs::read_link(format!("/proc/{pid}/exe")).unwrap(),
        fs::canonicalize(which("sleep")).unwrap()
    );
    let st = wait_with_timeout(&mut restore, TIMEOUT);
    assert_eq!(
        st.code(),
        Some(0),
        "{}",
        fs::read_to_string(tmp.path().join("restore.stderr")).unwrap()
    );
}

fn which(prog: &str) -> std::path::PathBuf {
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(prog))
                .find(|p| p.exists())
        })
        .expect("program on PATH")
}
